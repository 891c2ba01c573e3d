"""Where shakegpt's Hydra configs are, and the resolvers they use.

An installed wheel carries a copy of the repository's top-level `conf/` inside the package as
`shakegpt/conf/` (setup.py copies it at build time); a checkout or an editable install reads the
top-level `conf/` itself. Users add presets of their own without editing either: see
docs/configuration.md (`--config-dir`, `hydra.searchpath`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

PACKAGE = Path(__file__).resolve().parent.parent  # shakegpt/


def checkout() -> Path | None:
    """The repository shakegpt runs from (a source tree or an editable install), or None when it is
    an installed package."""
    return PACKAGE.parent if (PACKAGE.parent / "pyproject.toml").is_file() else None


def find_conf_dir() -> Path:
    """The checkout's `conf/` when shakegpt runs from one (a stale packaged copy never wins), else
    the installed package's copy."""
    root = checkout()
    if root is not None and (root / "conf" / "train.yaml").is_file():
        return root / "conf"
    if (PACKAGE / "conf" / "train.yaml").is_file():
        return PACKAGE / "conf"
    raise FileNotFoundError(
        f"shakegpt's configs are missing: neither {PACKAGE / 'conf'} (an installed wheel) nor "
        f"{PACKAGE.parent / 'conf'} (a checkout) holds train.yaml; reinstall shakegpt"
    )


CONF_DIR = str(find_conf_dir())

MAX_NAME_BYTES = 120  # of a sweep job directory's overrides part; file systems allow 255 bytes a name


def path_safe(text: Any) -> str:
    """A sweep job's overrides as one directory name: `/` -> `-`, at most MAX_NAME_BYTES bytes; a
    longer one is cut on a character boundary and ends in a hash of the whole, so names stay distinct."""
    s = str(text).replace("/", "-")
    raw = s.encode("utf-8")
    if len(raw) <= MAX_NAME_BYTES:
        return s
    digest = hashlib.sha1(raw).hexdigest()[:10]
    head = raw[: MAX_NAME_BYTES - len(digest) - 1].decode("utf-8", errors="ignore")
    return f"{head}~{digest}"


OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
