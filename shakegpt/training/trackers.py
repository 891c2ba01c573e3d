"""The trackers a run logs to, as Lightning loggers: `logger=tensorboard` (the default), `csv`,
`mlflow`, or several (`logger=[tensorboard,mlflow]`). Each is Lightning's own with the steps and
scalars made alike (`OptimizerSteps`), so every tracker shows the same numbers at the same steps.

`MLflowLogger` is Lightning's `MLFlowLogger` for a tracking store that several processes share: the
SQLite file MLflow recommends (`outputs/mlflow.db`, one for every run, so `mlflow ui` compares
them). A fresh store's tables and the experiment are created by whichever process comes first; two
jobs of a parallel sweep doing it at once made one fail (seen with two processes on a fresh store).
Here the first touch of the store happens under a lock file beside it, so they take turns.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

try:
    import fcntl
except ImportError:  # Windows: no flock; one process at a time there
    fcntl = None


class OptimizerSteps:
    """A logger mixin with two changes to what Lightning hands its loggers:
    - scalars are written at the step the log line, the text samples and the checkpoint names
      give: Lightning hands its loggers the number of optimizer steps done *before* the one being
      logged (the validation after step 100 arrives as step 99), so one is added here;
    - no `epoch` scalar: training is an endless stream of batches, so the epoch stays 0 and would
      be the first chart a user sees."""

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        metrics = {k: v for k, v in metrics.items() if k != "epoch"}
        super().log_metrics(metrics, None if step is None else step + 1)


class RunTensorBoardLogger(OptimizerSteps, TensorBoardLogger):
    """Lightning's TensorBoard logger, at optimizer steps, without `epoch`."""


class RunCSVLogger(OptimizerSteps, CSVLogger):
    """Lightning's CSV logger, at optimizer steps, without `epoch`."""


def sqlite_path(tracking_uri: str | None) -> Path | None:
    """The database file of a `sqlite:///…` tracking URI (None for any other store)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri.removeprefix("sqlite:///"))


@contextlib.contextmanager
def store_lock(tracking_uri: str | None):
    """Hold `<database>.lock` while the store is opened (its folder is made first)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class MLflowLogger(OptimizerSteps, MLFlowLogger):
    """Lightning's MLFlowLogger, at optimizer steps, without `epoch`; creating its store and experiment takes turns with other processes.
    With `run_dir`, the MLflow run is named after the run directory and tagged with its path."""

    NEEDS = ("mlflow", "shakegpt[mlflow]")  # checked before a run starts (shakegpt.run.checks.check_loggers)

    def __init__(self, *args: Any, run_dir: str | None = None, **kwargs: Any):
        if run_dir is not None:
            kwargs.setdefault("run_name", Path(run_dir).name)
            kwargs["tags"] = {"run_dir": str(run_dir), **(kwargs.get("tags") or {})}
        with store_lock(kwargs.get("tracking_uri")):
            super().__init__(*args, **kwargs)

    @property
    def experiment(self) -> Any:
        if self._initialized:
            return super().experiment
        with store_lock(self._tracking_uri):
            return super().experiment
