"""The sampling settings (temperature, top-k, top-p): their one set of defaults and their check.

Imports no torch, so a command line refuses a bad value at once (`shakegpt.generate` samples).
"""

from __future__ import annotations

from typing import Any

from shakegpt.errors import ConfigError, is_int, is_number

# the one set of sampling defaults: this API, `python -m shakegpt sample` and training's text
# samples (conf/sampling/default.yaml, tested to agree)
TEMPERATURE: float = 0.8
TOP_K: int | None = None
TOP_P: float | None = None


def check_sampling(temperature: Any, top_k: Any, top_p: Any, prefix: str = "") -> None:
    """Refuse sampling settings that cannot work, naming the key (`prefix` + name) and the value."""
    if not is_number(temperature) or temperature <= 0:
        raise ConfigError(f"{prefix}temperature={temperature!r} is invalid; it must be > 0")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ConfigError(f"{prefix}top_k={top_k!r} is invalid; it must be an integer >= 1, or null for no limit")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ConfigError(f"{prefix}top_p={top_p!r} is invalid; it must be in (0, 1], or null for no limit")
