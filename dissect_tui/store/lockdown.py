"""Make a cache connection read-only in fact: DuckDB's own settings, not a list of allowed statements.

A read-only DuckDB connection cannot change its database, but SQL can still reach everything
else: ``COPY … TO`` and ``EXPORT DATABASE`` write files, ``ATTACH … (READ_WRITE)`` opens another
database (or the same file through a hard link) for writing, ``INSTALL`` downloads extensions into
``~/.duckdb``, ``read_csv('http://…')`` autoloads one, ``CALL enable_logging(storage='file')`` and
``SET profiling_output`` write logs, ``SET GLOBAL`` changes the connection every cursor shares.
:func:`lock_down` switches all of that off on the database instance and then locks the
configuration, so no statement can switch it back on:

- ``enable_external_access = false``: no file or network access beyond the open cache (COPY, EXPORT,
  ATTACH, read_csv/read_parquet/glob, INSTALL/LOAD of extension files, log and profile files);
- no extension installed or loaded on demand, no community or unsigned extensions;
- no persistent secrets (they would be written to ``~/.duckdb``);
- no Python replacement scans (a query naming a Python variable must not read the caller's objects);
- ``lock_configuration = true``: every later ``SET``/``RESET``/``PRAGMA`` of a setting is refused.

What still works: every read of the cache, temporary tables and variables of one cursor (in
memory), and DuckDB's own spilling of large intermediates to its temporary folder. The browser's
own features do not need more: thumbnails come from the cache, exports are written by pyarrow and
the sidecar is SQLite.
"""

from __future__ import annotations

import os
from typing import Any

import duckdb

from dissect_tui.errors import CacheError

# Emptied first, while they still may be: files and folders readable despite external access off.
# DuckDB then adds the database's own files back (FILE.wal, the spill folder FILE.tmp/).
ALLOW_LISTS = ("allowed_paths", "allowed_directories")
# (setting, value), in the order they are set: external access goes off, and the lock comes last.
SETTINGS: tuple[tuple[str, Any], ...] = (
    ("autoinstall_known_extensions", False),
    ("autoload_known_extensions", False),
    ("allow_community_extensions", False),
    ("allow_unsigned_extensions", False),
    ("allow_persistent_secrets", False),
    ("python_enable_replacements", False),
    ("enable_external_access", False),
    ("lock_configuration", True),
)


def _current(con: duckdb.DuckDBPyConnection, name: str) -> Any:
    return con.execute("SELECT current_setting(?)", [name]).fetchall()[0][0]


def is_locked_down(con: duckdb.DuckDBPyConnection) -> bool:
    """True when every setting of :data:`SETTINGS` holds on ``con``'s database (cursors share it)
    and the allow-lists name nothing but the database's own files."""
    try:
        if not all(_current(con, name) == value for name, value in SETTINGS):
            return False
        rows = con.execute(
            "SELECT path FROM duckdb_databases() WHERE database_name = current_database()"
        ).fetchall()
        own = rows[0][0] if rows and rows[0][0] else None
        temp = str(_current(con, "temp_directory") or "")
        allowed = [str(p) for name in ALLOW_LISTS for p in (_current(con, name) or [])]
    except duckdb.Error:
        return False
    spill = os.path.abspath(temp) if temp else None  # DuckDB's spill folder, relative to the cwd
    return all((own is not None and p.startswith(own)) or os.path.abspath(p) == spill for p in allowed)


def lock_down(con: duckdb.DuckDBPyConnection) -> None:
    """Switch off external access, extension installs and setting changes for ``con``'s database.

    Applies to the whole database instance, so to every cursor of ``con``. Idempotent; a connection
    whose configuration someone else locked in another state raises CacheError.
    """
    if _current(con, "lock_configuration"):
        if not is_locked_down(con):
            raise CacheError("this connection's configuration is locked with external access still on")
        return
    try:
        for name in ALLOW_LISTS:
            con.execute(f"SET GLOBAL {name} = []")
        for name, value in SETTINGS:
            # SET takes no bound parameters; every value here is one of our constants.
            con.execute(f"SET GLOBAL {name} = {'true' if value else 'false'}")
    except duckdb.Error as exc:
        raise CacheError(f"cannot make the connection read-only: {str(exc).splitlines()[0]}") from None
    if not is_locked_down(con):
        raise CacheError("cannot make the connection read-only: a setting did not take")
