"""How run directories are named and claimed, and the Hydra callback that checks a run's config
before Hydra makes its directory.

Names (conf/hydra/default.yaml):
- a run: `outputs/runs/<date>_<time>_<model preset>`, e.g. `outputs/runs/2026-11-30_19-42-07_v3`;
  a second run started in the same second gets `..._v3-2`, a third `..._v3-3`. The name is claimed
  with an atomic `mkdir`, so two runs started together never share a directory.
- a sweep: `outputs/multiruns/<date>_<time>` (claimed the same way), one sub-directory per job,
  `<job number>_<its overrides>`, with a group's `/` written `-`; overrides longer than
  `shakegpt.configs.MAX_NAME_BYTES` are cut and end in a hash of the whole (`path_safe`), so every
  name fits any file system (255 bytes a name) and stays distinct.
A directory given on the command line (`hydra.run.dir=…`, `hydra.sweep.dir=…`) is used as given.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from shakegpt.errors import ShakeGPTError

MAX_CLAIM_TRIES = 1000


def claim(base: Path) -> Path:
    """Create `base`, or `base-2`, `base-3`, … whichever is free first, atomically: of several
    processes claiming the same name at once, each gets its own directory."""
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, MAX_CLAIM_TRIES + 1):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"{base} and {MAX_CLAIM_TRIES - 1} numbered variants of it exist already")


def given_on_command_line(config: DictConfig, key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in config.hydra.overrides.hydra)


def quoted(value: str) -> str:
    """A string as a quoted value of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class PrepareRun(Callback):
    """Before Hydra makes a run's directory: check the whole config (one line naming the bad value,
    nothing created), then claim a directory no other run uses. For a sweep, claim its directory;
    each job's config is checked when the job starts, so one bad job fails alone."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from shakegpt.checks import check_train_config

        HydraConfig.instance().set_config(config)  # so that ${hydra:...} resolves in the checks
        explicit = given_on_command_line(config, "hydra.run.dir")
        target = Path(str(config.hydra.run.dir))
        try:
            self._set_output_dir(config, target)
            check_train_config(config, target)
            if not explicit:
                target = claim(target)
                self._set_output_dir(config, target)
        except ShakeGPTError as e:  # the user's to fix: one line, and nothing made
            raise SystemExit(f"error: {e}") from None
        except OSError as e:  # checked writable a moment ago: the disk changed under us
            raise SystemExit(f"error: the run directory {target} cannot be made: {e.strerror or e}") from None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if given_on_command_line(config, "hydra.sweep.dir"):
            return
        HydraConfig.instance().set_config(config)
        try:
            sweep_dir = str(claim(Path(str(config.hydra.sweep.dir))))
        except OSError as e:
            raise SystemExit(
                f"error: hydra.sweep.dir={config.hydra.sweep.dir} cannot be made: {e.strerror or e}"
            ) from None
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweep.dir = sweep_dir
            # each job's config is composed again from the sweep's overrides: it must name this one
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted(sweep_dir)}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """The sweep's jobs, best first, on the terminal and in <sweep dir>/summary.md."""
        from shakegpt.results import sweep_table

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            text = sweep_table(sweep_dir)
        except (ShakeGPTError, OSError):
            return  # no job got as far as a directory of its own: nothing to sum up
        with contextlib.suppress(OSError):  # a read-only sweep directory: the table is still printed
            (sweep_dir / "summary.md").write_text(text + "\n")
        print(f"\nsweep {sweep_dir}, best first:\n{text}", flush=True)

    @staticmethod
    def _set_output_dir(config: DictConfig, target: Path) -> None:
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.run.dir = str(target)
            config.hydra.runtime.output_dir = str(target.absolute())


def remove_if_empty(run_dir: Path) -> None:
    """Delete the directory of a run that stopped before training started: it holds only Hydra's
    record and a log ending in the error just printed, and would clutter outputs/."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
