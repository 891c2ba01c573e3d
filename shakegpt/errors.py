"""Errors a user can cause and fix. Their messages name the bad value and what is accepted; the
entry points print them as one line instead of a traceback."""


class ShakeGPTError(Exception):
    """Base of the errors whose message tells the user what to change."""


class ConfigError(ShakeGPTError, ValueError):
    """A configuration value is out of range, unknown or inconsistent with another."""


class DataError(ShakeGPTError, RuntimeError):
    """The corpus cannot be found, fetched or read."""


class CheckpointError(ShakeGPTError, RuntimeError):
    """A checkpoint or exported bundle is missing, unreadable, or does not fit its model."""
