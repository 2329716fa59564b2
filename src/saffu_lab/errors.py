"""Errors that `train.py` reports as one clear line, before any training starts."""


class SaffuLabError(Exception):
    """Base class: the message names the bad value and the fix."""


class ConfigError(SaffuLabError):
    """A config value is out of range or inconsistent."""


class DataError(SaffuLabError):
    """A corpus is missing, empty, malformed or unreachable."""
