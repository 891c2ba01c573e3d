"""Where shakegpt's Hydra configs are, and the resolvers they use.

An installed wheel carries a copy of the repository's top-level `conf/` inside the package as
`shakegpt/conf/` (setup.py copies it at build time); a checkout or an editable install reads the
top-level `conf/` itself. Users add presets of their own without editing either: see
docs/configuration.md (`--config-dir`, `hydra.searchpath`).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
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


# characters Hydra's override grammar takes only inside a quoted value
GRAMMAR_CHARS = "!()[]{},:='\"\\ and spaces, emoji, ..."


def composition_error_line(e: Exception) -> str:
    """Hydra's multi-line message for an unknown option, an unknown key or an unreadable override,
    as one line naming what was typed and the nearest valid choices."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, name = e.missing_cfg_file.rsplit("/", 1)
        near = difflib.get_close_matches(name, e.options, n=2, cutoff=0.4)
        hint = f"did you mean {' or '.join(near)}? " if near else ""
        return f"{group}={name}: no such option; {hint}the options of {group}: {', '.join(e.options)}"
    cause = e.__cause__
    if getattr(cause, "full_key", None) and getattr(cause, "parent_node", None) is not None:
        key, parent = str(cause.full_key), cause.parent_node
        prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
        keys = [str(k) for k in parent if not str(k).startswith("_")]
        near = difflib.get_close_matches(key.rsplit(".", 1)[-1], keys, n=3, cutoff=0.5)
        hint = f"did you mean {' or '.join(prefix + k for k in near)}? " if near else ""
        return f"{key} is not a key; {hint}(+{key}=… adds a new one; --cfg job lists them all)"
    if isinstance(e, OverrideParseException):
        typed = str(e).splitlines()[0].split(": ", 1)[-1]
        return (
            f"cannot read {typed!r}: a value with {GRAMMAR_CHARS} needs quotes Hydra can see, "
            """e.g. 'prompt="Alas, poor Yorick!"' (single quotes for the shell, double for Hydra)"""
        )
    return " ".join(str(e).split("\n\n")[0].split())


@contextlib.contextmanager
def hydra_errors_in_one_line():
    """Around a Hydra entry point: a config that cannot be composed ends in one `error: …` line
    (Hydra would print several, or a parser's trace) and exit code 1."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises the error instead of printing it: told here
    try:
        yield
    except (MissingConfigException, ConfigCompositionException, OverrideParseException) as e:
        raise SystemExit(f"error: {composition_error_line(e)}") from None
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous
