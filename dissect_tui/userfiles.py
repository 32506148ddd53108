"""Opening files a user names (concept lists, probe lists and images, weights): regular files only.

``open()`` on a FIFO blocks until someone writes to it, ``/dev/zero`` never ends, a socket fails
with an obscure error, and ``Path.is_file()`` answers False for all of them, so they used to be
reported as "not found" or "empty file". Here a non-regular file is refused by name and kind
before a byte is read: the file is opened with ``O_NONBLOCK`` (opening a FIFO then returns at
once) and ``O_NOCTTY``, and checked with ``fstat`` on the open descriptor, so a file swapped
between a check and the open cannot slip through.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["FileTooLarge", "NotRegularFile", "file_kind", "non_regular_kind", "open_regular", "read_regular"]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISLNK, "a symbolic link"),
)


class NotRegularFile(OSError):
    """The path exists but is a FIFO, a device, a socket or a folder; ``kind`` says which."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


class FileTooLarge(OSError):
    def __init__(self, path: str | os.PathLike, size: int, limit: int) -> None:
        super().__init__(f"{path} is {size / 2**20:.0f} MiB (more than {limit / 2**20:.0f} MiB)")
        self.size = size
        self.limit = limit


def file_kind(mode: int) -> str:
    """'a regular file', 'a FIFO (named pipe)', 'a character device', ... for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def non_regular_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder, else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return file_kind(mode)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """``open(path, "rb")`` for regular files only; raises NotRegularFile (never blocks), or the
    OSError of the open (FileNotFoundError, PermissionError ...)."""
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    )
    flags |= getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, file_kind(mode))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int) -> bytes:
    """The whole regular file, refusing one larger than ``limit`` bytes (FileTooLarge)."""
    with open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise FileTooLarge(Path(path), size, limit)
        data = fh.read(limit + 1)
    if len(data) > limit:  # grew while reading
        raise FileTooLarge(Path(path), len(data), limit)
    return data
