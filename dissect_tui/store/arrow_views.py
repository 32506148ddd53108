"""Arrow data shown to SQL under a name for the length of a statement or two."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import duckdb


@contextlib.contextmanager
def registered(con: duckdb.DuckDBPyConnection, name: str, data: Any) -> Iterator[None]:
    """``data`` (an Arrow table or record-batch reader) readable as ``name`` inside the block.

    After a failed statement DuckDB has aborted the transaction and refuses the unregister too
    ("Current transaction is aborted"): that second error must not replace the first, which says
    what went wrong (a full disk, a constraint). The view then goes with the connection or the
    rollback."""
    con.register(name, data)
    try:
        yield
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.unregister(name)
        raise
    con.unregister(name)
