"""What a training run shows in the terminal: log lines that never break the progress bar, a short
header, and a closing summary that says where the run is and what to do with it."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path


def header(
    preset: str, params: int, original: int, corpus: Path, n_chars: int, vocab: int, device: str, precision: str
) -> str:
    """Three short lines: the model, the data, where it runs."""
    return (
        f"model    {preset}: {params:,} parameters ({original:,} by the original runs' formula)\n"
        f"data     {corpus.name}: {n_chars:,} characters, {vocab} distinct\n"
        f"device   {device}, {precision}"
    )


def shown(path: Path) -> str:
    """A path as a user would type it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def quoted(value: str) -> str:
    """A string as a quoted value of Hydra's override grammar."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override(key: str, value: str) -> str:
    """`key=value` as a shell argument that Hydra reads back as `value`: a sweep job's directory
    (`…/1_model=v3,optim.lr=0.001`) holds characters that Hydra's grammar would take for a sweep."""
    if re.fullmatch(r"[\w./@:+-]*", value):
        return f"{key}={value}"
    if not re.search(r"[\"$`\\!']", value):  # double quotes keep it whole and readable
        return f'"{key}={quoted(value)}"'
    return shlex.quote(f"{key}={quoted(value)}")


def summary(run_dir: Path, best: str | None, best_loss: float | None, steps: int) -> str:
    """Where the finished run is, its best checkpoint, and the commands to look at it."""
    run_dir = shown(run_dir)
    ckpt = override("ckpt_path", run_dir)
    lines = [f"run      {run_dir} ({steps} steps)"]
    if best:
        lines.append(f"best     {Path(best).name} (val loss {best_loss:.4f})")
    lines += [
        f"watch    tensorboard --logdir {shlex.quote(run_dir)}",
        f"sample   python -m shakegpt sample {ckpt}",
        f"resume   this run's command + {ckpt} trainer.max_steps=<more>",
    ]
    return "\n".join(lines)


# Hydra overrides that name where a run goes or how a sweep was split up: the resume command sets its own
NOT_REPEATED = ("ckpt_path", "hydra.run.dir", "hydra.sweep.dir", "hydra.mode", "hydra.job.env_set", "hydra.job.config")


def program() -> str:
    """How the running command was started, as a user would type it again."""
    name = Path(sys.argv[0]).name
    if name == "train.py":
        return f"python {shlex.quote(shown(Path(sys.argv[0])))}"
    return name if name.startswith("shakegpt-") else "python -m shakegpt"


def resume_command(run_dir: Path) -> str:
    """The command that resumes the run in `run_dir`, in that directory: the program and overrides it
    was started with, plus ckpt_path and hydra.run.dir naming the directory."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    given = [*hc.overrides.hydra, *hc.overrides.task]
    kept = [o for o in given if not o.split("=", 1)[0].lstrip("+~").startswith(NOT_REPEATED)]
    where = shown(run_dir)
    return " ".join(
        [program(), *(shlex.quote(o) for o in kept), override("ckpt_path", where), override("hydra.run.dir", where)]
    )
