"""Errors that reach the user as one clear line (the CLI prints them without a traceback)."""


class UserError(Exception):
    """Bad input or an impossible request; the message says what to do instead."""


class OfflineError(UserError):
    """A download was needed and could not happen; the message names the local-file option."""


class CacheError(UserError):
    """A cache file is missing, not a DuckDB file, of another schema version, empty or locked."""
