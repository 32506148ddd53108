"""Signals during a command: SIGTERM and SIGHUP end a command exactly like Ctrl-C.

``cli.main`` runs each command inside :func:`command_signals`. While it runs, SIGTERM and SIGHUP
(an SSH disconnect) raise :class:`Terminated`, a ``KeyboardInterrupt``, so every cleanup that
runs for Ctrl-C (the cache writer's abort, the export's temporary file) runs for them too, and
the command exits 128 + the signal number. A signal whose handler is not the default (``nohup``
ignores SIGHUP) is left alone, and the previous handlers are restored afterwards.

A Python signal handler only runs between bytecodes of the main thread, so a long DuckDB
statement (COMMIT, a `sql` query) would otherwise hold the signal back until it ends. A small
thread wakes on the signal (``signal.set_wakeup_fd``) and interrupts the DuckDB connections the
store registered with :func:`track`; DuckDB then raises its own interrupt error, which
:func:`is_interrupt` recognises. It does so for Ctrl-C as well: DuckDB watches SIGINT itself,
but misses it at times during a long statement (observed with duckdb 2.0.1).

:func:`deferred` holds these signals back while files are being cleaned up, so a second Ctrl-C
cannot leave half of a cleanup undone. This module imports nothing heavy (no duckdb).
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HANDLED = (signal.SIGTERM, signal.SIGHUP)
_DEFERRED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived during a command."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_state_lock = threading.Lock()
_connections: weakref.WeakSet[Any] = weakref.WeakSet()
_received: int | None = None  # the first SIGTERM/SIGHUP of the running command
_settled = False  # the command has ended: signals are only recorded now


def track(con: Any) -> Any:
    """Register a DuckDB connection or cursor to interrupt on SIGTERM/SIGHUP; returns it."""
    with _state_lock:
        _connections.add(con)
    return con


def _interrupt_connections() -> None:
    with _state_lock:
        live = list(_connections)
    for con in live:
        try:
            con.interrupt()
        except Exception:  # noqa: BLE001 - a closed connection has nothing to interrupt
            pass


def received_signal() -> int | None:
    """The SIGTERM/SIGHUP that ended the running command, if one did."""
    return _received


def is_interrupt(exc: BaseException) -> bool:
    """Ctrl-C, SIGTERM/SIGHUP, or DuckDB's report of a statement interrupted by one of them."""
    if isinstance(exc, KeyboardInterrupt):
        return True
    if isinstance(exc, RuntimeError) and str(exc) == "Query interrupted":  # DuckDB on SIGINT
        return True
    cls = type(exc)
    return cls.__name__ == "InterruptException" and cls.__module__ in ("duckdb", "_duckdb")


def exit_code(exc: BaseException) -> int:
    """128 + the number of the signal that interrupted the command (130 for Ctrl-C)."""
    if isinstance(exc, Terminated):
        return 128 + exc.signum
    return 128 + (_received or signal.SIGINT)


def signal_name(code: int) -> str:
    try:
        return signal.Signals(code - 128).name
    except ValueError:
        return f"signal {code - 128}"


def _handler(signum: int, frame: Any) -> None:
    global _received
    if _received is not None:
        return  # the first one is already ending the command; let its cleanup finish
    _received = signum
    if not _settled:
        raise Terminated(signum)


def settle() -> None:
    """The command has ended (returned or raised): from now on signals are recorded, not raised,
    so reporting the ending cannot itself be interrupted. Reset when command_signals ends."""
    global _settled
    _settled = True


# After a signal, the connections are interrupted again every REPEAT_EVERY seconds for
# REPEAT_FOR seconds: an interrupt that lands just before a statement starts is lost, and that
# statement (a `sql` query) would run on for hours.
REPEAT_EVERY = 0.1
REPEAT_FOR = 3.0


def _watch(fd: int) -> None:
    repeat_until = 0.0
    while True:
        now = time.monotonic()
        try:
            ready, _, _ = select.select([fd], [], [], REPEAT_EVERY if now < repeat_until else None)
        except (OSError, ValueError):
            return
        if not ready:
            _interrupt_connections()
            continue
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:
            return  # the write end was closed: the command is over
        if any(b in _DEFERRED for b in data):  # Ctrl-C too: DuckDB's own check misses it at times
            _interrupt_connections()
            repeat_until = time.monotonic() + REPEAT_FOR


@contextmanager
def command_signals() -> Iterator[None]:
    """SIGTERM/SIGHUP raise Terminated for the duration of the block (main thread only)."""
    global _received, _settled
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}
    for signum in HANDLED:
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _handler)
    watcher: threading.Thread | None = None
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        old_wakeup: int | None = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):
        old_wakeup = None
    if old_wakeup == -1:
        watcher = threading.Thread(target=_watch, args=(read_fd,), name="dissect-tui-signals", daemon=True)
        watcher.start()
    elif old_wakeup is not None:  # somebody else's wakeup fd (an event loop): keep theirs
        signal.set_wakeup_fd(old_wakeup)
    _received = None
    _settled = False
    try:
        yield
    finally:
        with deferred():
            if watcher is not None:
                signal.set_wakeup_fd(-1)
            for number, handler in previous.items():
                signal.signal(number, handler)
            os.close(write_fd)
            if watcher is not None:
                watcher.join()
            os.close(read_fd)
            _received = None
            _settled = False


@contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT, SIGTERM and SIGHUP back until the block ends, then deliver the first one.

    For cleanups that must not stop halfway. Python-level handlers are swapped for one that
    only records (a thread's signal mask would not do: DuckDB's threads would take the signal).
    Only in the main thread, where handlers can be changed; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        pending.append(signum)

    previous: dict[int, Any] = {}
    for signum in _DEFERRED:
        handler = signal.getsignal(signum)
        if callable(handler):
            previous[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if pending:
            previous[pending[0]](pending[0], None)
