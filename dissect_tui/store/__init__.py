"""DuckDB cache: schema, writer, reader. The only package in dissect-tui that speaks SQL."""

from dissect_tui.store.reader import (
    CacheReader,
    LayerInfo,
    cache_name,
    find_caches,
    open_cache,
    resolve_cache,
)
from dissect_tui.store.schema import SCHEMA_VERSION
from dissect_tui.store.writer import CacheWriter

__all__ = [
    "SCHEMA_VERSION",
    "CacheReader",
    "CacheWriter",
    "LayerInfo",
    "cache_name",
    "find_caches",
    "open_cache",
    "resolve_cache",
]
