"""Files a command may replace, one writer per cache, and leftovers of killed runs.

* :func:`writable_target` decides where an output goes: a regular file or a new name is fine;
  a folder, a device, a FIFO or a socket is refused; a symbolic link is followed, so the file
  it points to is replaced and the link itself stays as it was.
* :class:`WriteLock`: one process at a time writes a cache. ``fcntl.flock`` on ``.NAME.lock``
  beside it, so the operating system releases the lock when the process dies, however it dies;
  the lock file holds the owner's PID (named in the refusal) and is removed when released.
  Locks are kept per process in a registry: the indexer takes the lock when it checks its
  target, minutes before its CacheWriter (which reuses it) exists.
* :func:`remove_stale_temporaries` deletes ``.NAME.tmp-PID`` files (and DuckDB's ``.wal`` and
  ``.tmp`` spill folder beside them) whose process is gone, e.g. after a SIGKILL, and says so
  through :func:`note`.

No SQL here; imported by ``cli.main``, so it stays light.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dissect_tui.errors import CacheError, UserError

# -- notes -------------------------------------------------------------------------------------
_note_handlers: list[Callable[[str], None]] = []


def note(message: str) -> None:
    """Tell the user something they should know but that is not an error (one line)."""
    if _note_handlers:
        _note_handlers[-1](message)
    else:
        print(f"note: {message}", file=sys.stderr)


@contextmanager
def notes_to(handler: Callable[[str], None]) -> Iterator[None]:
    """Send notes to ``handler`` for the duration of the block."""
    _note_handlers.append(handler)
    try:
        yield
    finally:
        _note_handlers.remove(handler)


# -- where an output may go ----------------------------------------------------------------------
_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def writable_target(path: Path, option: str, error: type[UserError] = CacheError) -> Path:
    """The file to write for output ``path``: the path itself, or the file a symlink points to.

    Raises ``error`` for a folder, a device, a FIFO, a socket, or a link to nothing. Existence
    of a regular file is the caller's business (is it ours to replace?).
    """
    path = Path(path)
    try:
        st = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return path  # a new file (a file in the way of its folder is the caller's error to report)
    except OSError as exc:
        raise error(f"cannot look at {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        real = Path(os.path.realpath(path))
        try:
            st = real.stat()
        except FileNotFoundError:
            raise error(
                f"{path} is a symbolic link to {real}, which does not exist; give {option} a file path "
                "(the link is not replaced)"
            ) from None
        except OSError as exc:
            raise error(f"{path} is a symbolic link that cannot be followed: {exc.strerror}") from None
        path = real
    if stat.S_ISDIR(st.st_mode):
        return path  # the caller says "is a folder" with a hint of its own
    if not stat.S_ISREG(st.st_mode):
        raise error(
            f"{path} is {describe_kind(st.st_mode)}, not a regular file; refusing to replace it: "
            f"choose another {option}"
        )
    return path


# -- stale temporaries ---------------------------------------------------------------------------
def tmp_name(final: Path, pid: int | None = None) -> Path:
    """``.NAME.tmp-PID`` beside ``final``: where a new version of it is built."""
    return final.with_name(f".{final.name}.tmp-{os.getpid() if pid is None else pid}")


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # somebody else's process
    except OSError:
        return True  # cannot tell: keep its files
    return True


def remove_stale_temporaries(final: Path) -> list[str]:
    """Remove ``.NAME.tmp-PID`` and torchrun rank shards ``.NAME.rankR.tmp-PID`` (+ ``.wal``, +
    DuckDB's ``.tmp`` spill folder) of dead processes.

    Only names of exactly those patterns, of PIDs that are not running here, are touched; one
    note says what was removed. Returns the removed names. Callers hold the cache's write lock,
    so no run that could still use these files is going on (a shard of another machine's rank
    belongs to the last run on this cache, which has ended).
    """
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}(?:\.rank\d+)?\.tmp-(\d+)(\.wal|\.tmp)?")
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return []
    removed: list[str] = []
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        try:
            if m.group(2) == ".tmp":
                if not entry.is_dir(follow_symlinks=False) or not _only_duckdb_spill(Path(entry.path)):
                    continue
                shutil.rmtree(entry.path)
            else:
                if not entry.is_file(follow_symlinks=False):
                    continue
                os.unlink(entry.path)
        except OSError:
            continue
        removed.append(entry.name)
    if removed:
        shown = ", ".join(removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        note(
            f"removed {len(removed)} leftover temporary file(s) of an interrupted run in {final.parent}: {shown}"
        )
    return removed


def _only_duckdb_spill(folder: Path) -> bool:
    try:
        return all(
            e.is_file(follow_symlinks=False) and e.name.startswith("duckdb_temp") for e in os.scandir(folder)
        )
    except OSError:
        return False


def remove_db_files(path: Path) -> None:
    """A DuckDB file this process created, with its WAL and spill folder (missing parts are fine)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass
    spill = path.with_name(path.name + ".tmp")
    if spill.is_dir() and not spill.is_symlink() and _only_duckdb_spill(spill):
        shutil.rmtree(spill, ignore_errors=True)


# -- one writer per cache -------------------------------------------------------------------------
def lock_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.lock")


class WriteLock:
    """An exclusive, non-blocking ``flock`` on ``.NAME.lock`` beside ``final``."""

    def __init__(self, final: Path) -> None:
        self.final = Path(final)
        self.path = lock_path(self.final)
        self.fd: int | None = None
        self.writer_active = False  # a CacheWriter of this process is building the cache

    def acquire(self) -> None:
        import fcntl

        while True:
            flags = os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | flags, 0o666)
            except PermissionError:
                try:  # another user's lock file in a shared folder: flock works on a read-only fd
                    fd = os.open(self.path, os.O_RDONLY | flags)
                except OSError as exc:
                    raise CacheError(f"cannot open the lock file {self.path}: {exc.strerror}") from None
            except OSError as exc:
                raise CacheError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                owner = _read_pid(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f"process {owner}" if owner else "another process"
                    raise CacheError(
                        f"{self.final} is being written by {who} (dissect-tui); wait for it to finish, "
                        "or write to another file"
                    ) from None
                raise CacheError(f"cannot lock {self.path}: {exc.strerror}") from None
            # The previous holder may have removed the file between our open and our lock:
            # then we hold a lock on a file nobody else will ever open. Start again.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # opened read-only: the lock holds, only the PID in it is somebody else's
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: nobody can be between open and lock
        except OSError:
            pass
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


_held: dict[str, WriteLock] = {}


def _key(final: Path) -> str:
    return os.path.abspath(final)


def acquire(final: Path) -> WriteLock:
    """This process's write lock on ``final`` (taken now, or already held)."""
    key = _key(final)
    held = _held.get(key)
    if held is not None:
        return held
    lock = WriteLock(Path(key))
    lock.acquire()
    _held[key] = lock
    return lock


def holds(final: Path) -> bool:
    """Whether this process holds the write lock on ``final``."""
    return _key(final) in _held


def release(final: Path) -> None:
    lock = _held.pop(_key(final), None)
    if lock is not None:
        lock.release()


def release_all() -> None:
    """Release every lock this process holds (end of a command, interpreter exit)."""
    while _held:
        _, lock = _held.popitem()
        lock.release()


atexit.register(release_all)
