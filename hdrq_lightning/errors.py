"""Errors raised at the boundary: each message says what is wrong and how to fix it.

The CLI catches :class:`HdrqError` and prints its message as one paragraph (no traceback).
"""


class HdrqError(Exception):
    """Base class of every user-facing error of hdrq-lightning."""


class ConfigError(HdrqError, ValueError):
    """A configuration value is out of range, unknown or inconsistent."""


class DataError(HdrqError, FileNotFoundError):
    """A data set root, domain or class folder is missing or malformed."""


class ArtifactError(HdrqError, FileNotFoundError):
    """A stage input (run dir, checkpoint, weights) is missing or incompatible."""
