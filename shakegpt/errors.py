"""Errors a user can cause and fix, and the small value checks that raise them. Their messages name
the bad value and what is accepted; the entry points print them as one line instead of a traceback."""

import functools
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any


class ShakeGPTError(Exception):
    """Base of the errors whose message tells the user what to change."""


class ConfigError(ShakeGPTError, ValueError):
    """A configuration value is out of range, unknown or inconsistent with another."""


class DataError(ShakeGPTError, RuntimeError):
    """The corpus cannot be found, fetched or read."""


class DivergedError(ShakeGPTError, RuntimeError):
    """The training loss became NaN or infinite."""


class TrainingFailed(ShakeGPTError, RuntimeError):
    """Training stopped after it had started (a full disk, a lost DDP rank, out of memory); the
    message says what happened and which checkpoint to resume from, the cause is chained."""


class RunInterrupted(ShakeGPTError, RuntimeError):
    """A signal stopped training (Ctrl-C, SIGTERM); the program exits with the shell's convention,
    128 + the signal's number (130, 143), so a scheduler or a `&&` chain sees a run that did not finish."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class CheckpointError(ShakeGPTError, RuntimeError):
    """A checkpoint or exported bundle is missing, unreadable, or does not fit its model."""


JOB_ERROR_FILE = "error.txt"  # in a failed sweep job's directory: the one-line error, for the sweep's table
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's, in a run's directory itself (written, read, cleaned up)


def exit_on_user_error(entry):
    """Wrap a command-line entry point: a ShakeGPTError ends the program with `error: <message>`
    on one line and exit code 1, instead of a traceback."""

    @functools.wraps(entry)
    def wrapper(*args, **kwargs):
        try:
            return entry(*args, **kwargs)
        except ShakeGPTError as e:
            raise SystemExit(f"error: {e}") from None

    return wrapper


def _canonical(v: Any) -> Any:
    """The same values in any key order, as list or tuple, give the same form; other types differ."""
    if isinstance(v, Mapping) or type(v).__name__ == "DictConfig":
        return tuple(sorted((str(k), _canonical(x)) for k, x in v.items()))
    if is_sequence(v):
        return tuple(_canonical(x) for x in v)
    return (type(v).__name__, repr(v))


def checked_once(check):
    """A value check that runs once per distinct argument values: a run's config is checked up front
    (before its directory exists) and its parts again where they are built (LitGPT, the datamodule),
    so the second call with the same values returns at once. Only for checks that depend on their
    arguments alone, not on files or the machine. `check.runs` counts the times it really ran."""
    passed: set[str] = set()

    @functools.wraps(check)
    def wrapper(*args, **kwargs):
        key = repr(_canonical((args, kwargs)))
        if key in passed:
            return None
        wrapper.runs += 1
        result = check(*args, **kwargs)
        if len(passed) >= 256:  # a long-lived process (a notebook, a sweep) keeps only recent values
            passed.clear()
        passed.add(key)
        return result

    wrapper.runs = 0
    wrapper.forget = passed.clear  # check every value again (a test that counts runs)
    return wrapper


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def is_sequence(v: Any) -> bool:
    """A list, a tuple or an OmegaConf ListConfig (without importing OmegaConf)."""
    return isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig"


def positive_int(key: str, v: Any, why: str = "") -> None:
    if not is_int(v) or v <= 0:
        raise ConfigError(f"{key}={v!r} is invalid; it must be a positive integer{why}")


def non_negative_int(key: str, v: Any) -> None:
    if not is_int(v) or v < 0:
        raise ConfigError(f"{key}={v!r} is invalid; it must be an integer >= 0")
