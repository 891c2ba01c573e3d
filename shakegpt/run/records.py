"""What a run directory records about its run, read back: its scalars, its last text sample, a summary
of its val loss (best, last, steps, time), and a sweep's jobs as one table. Each comes from the run's
own record (`record.jsonl`, `shakegpt.training.record`), whatever loggers it had; runs made before
shakegpt kept one are read from their TensorBoard event files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from omegaconf import OmegaConf

from shakegpt.errors import EVENT_FILES, JOB_ERROR_FILE, ConfigError
from shakegpt.training.record import RECORD_FILE

MAX_ERROR_CHARS = 120  # of a failed job's error, in a sweep's table


def is_run(path: Path) -> bool:
    """Whether `path` is a run's directory: its record, its event files, or (runs made before the
    event files were written beside the checkpoints) a tensorboard/ folder."""
    return (path / RECORD_FILE).is_file() or any(path.glob(EVENT_FILES)) or (path / "tensorboard").is_dir()


def _events(run_dir: str | Path):
    """A loaded EventAccumulator of a run directory (its event files, or a tensorboard/ folder's in runs
    made before they were written beside the checkpoints)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # not its "No path found after …" notes

    run_dir = Path(run_dir)
    tb = run_dir / "tensorboard" if (run_dir / "tensorboard").is_dir() else run_dir
    if not any(tb.glob(EVENT_FILES)):
        raise ConfigError(
            f"no {RECORD_FILE} nor TensorBoard event files in {run_dir}; give a run directory made by train.py"
        )
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _record(run_dir: str | Path) -> list[dict] | None:
    """The entries of a run's record, or None where it has none (a run made before shakegpt kept one).
    A line cut short by a killed process is skipped."""
    path = Path(run_dir) / RECORD_FILE
    if not path.is_file():
        return None
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar a run logged: tag -> [(step, value, seconds since the run's first entry)], in
    step order. `run_dir` is a run directory (its record, else its event files) or a folder of event files."""
    entries = _record(run_dir)
    if entries is None:
        return _tensorboard_scalars(run_dir)
    start = min((e["time"] for e in entries), default=0.0)
    scalars: dict[str, list[tuple[int, float, float]]] = {}
    for e in entries:
        for tag, value in e.get("scalars", {}).items():
            scalars.setdefault(tag, []).append((e["step"], float(value), e["time"] - start))
    # a resumed run logs again the steps after its checkpoint: the later entry of a step is the one kept
    return {tag: sorted({s: (s, v, t) for s, v, t in evs}.values()) for tag, evs in scalars.items()}


def run_hparams(run_dir: str | Path) -> dict:
    """The hyperparameters a run's module was built with (the latest, for a resumed run), or {} for a
    run without a record."""
    entries = _record(run_dir) or []
    return next((e["hparams"] for e in reversed(entries) if "hparams" in e), {})


def _tensorboard_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    acc = _events(run_dir)
    events = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
    start = min((e[0].wall_time for e in events.values() if e), default=0.0)
    return {tag: [(e.step, e.value, e.wall_time - start) for e in evs] for tag, evs in events.items()}


def last_sample(run_dir: str | Path) -> str | None:
    """The last text sample a run wrote, or None."""
    entries = _record(run_dir)
    if entries is not None:
        samples = [e["sample"] for e in entries if "sample" in e]
        return samples[-1] if samples else None
    acc = _events(run_dir)
    tags = [t for t in acc.Tags()["tensors"] if t.startswith("sample")]
    if not tags:
        return None
    text = acc.Tensors(tags[0])[-1].tensor_proto.string_val[0].decode("utf-8")
    # the TextSample callback indents every line by four spaces (a markdown code block): undo that
    return "\n".join(line.removeprefix("    ") for line in text.split("\n"))


def summarize(run_dir: str | Path) -> dict:
    """Best and last val loss, steps and training seconds of a run, from its record."""
    s = read_scalars(run_dir)
    val = s.get("val/loss", [])
    if not val:
        raise ConfigError(f"{run_dir} has no val/loss yet: it has not validated once")
    best = min(val, key=lambda e: e[1])
    train_end = max(e[2] for evs in s.values() for e in evs)
    return {
        "best_val_loss": round(best[1], 4),
        "best_step": best[0],
        "last_val_loss": round(val[-1][1], 4),
        "steps": max(e[0] for evs in s.values() for e in evs),
        "train_seconds": round(train_end, 1),
        "seconds_to_best": round(best[2], 1),
    }


def sweep_table(sweep_dir: str | Path) -> str:
    """A sweep's jobs as a markdown table, best val loss first: job, the overrides that differ
    between jobs, best val loss and its step. A job that failed (its error in the last column) or
    never validated is listed last as failed."""
    sweep_dir = Path(sweep_dir)
    jobs = []
    for job in sorted(p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()):
        overrides = _job_overrides(job)
        error = job / JOB_ERROR_FILE
        try:
            s = summarize(job)
            best, step = s["best_val_loss"], s["best_step"]
        except ConfigError:  # no record or no validation: the job failed before it validated
            best, step = None, None
        if error.is_file():  # it may have validated before it failed: its figures are not a result
            text = error.read_text().strip().splitlines()[0]
            best, step = None, text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"
        jobs.append((job.name.split("_", 1)[0], overrides, best, step))
    if not jobs:
        raise ConfigError(f"{sweep_dir} holds no sweep jobs (no */.hydra/overrides.yaml)")
    keys = sorted({k for _, o, _, _ in jobs for k in o})
    differ = [k for k in keys if len({o.get(k) for _, o, _, _ in jobs}) > 1]
    jobs.sort(key=lambda j: (j[2] is None, j[2] if j[2] is not None else 0.0, int(j[0]) if j[0].isdigit() else 0))
    rows = ["| job | " + " | ".join(differ or ["overrides"]) + " | best val loss | at step |"]
    rows.append("|---" * (len(differ or ["overrides"]) + 3) + "|")
    for num, o, best, step in jobs:
        cells = [o.get(k, "") for k in differ] if differ else [" ".join(f"{k}={v}" for k, v in o.items())]
        result = f"**{best:.4f}** | {step:,}" if best is not None else f"failed | {step or '—'}"
        rows.append(f"| {num} | " + " | ".join(cells) + f" | {result} |")
    return "\n".join(rows)


def _job_overrides(job: Path) -> dict[str, str]:
    """A sweep job's command-line overrides (.hydra/overrides.yaml) as key -> value."""
    return dict(str(o).split("=", 1) for o in OmegaConf.load(job / ".hydra" / "overrides.yaml") if "=" in str(o))
