"""shakegpt's own record of a run, kept whatever loggers the config names (TensorBoard, CSV, none):
every scalar the run logs and every text sample, one JSON object a line in `<run dir>/record.jsonl`.
The closing summary, a sweep's table and `results` read it back (`shakegpt.run.records`), so they
work with any logger. Lines are appended and flushed one at a time: a resumed run adds to its
record, and a killed one leaves every line it finished."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

RECORD_FILE = "record.jsonl"
log = logging.getLogger(__name__)


class RunRecord(Logger):
    """A Lightning logger that writes the run's record (see the module). Steps are the ones the log
    line and the checkpoints give (`shakegpt.training.trackers.OptimizerSteps` explains the one added), and there is no
    flat `epoch` scalar."""

    def __init__(self, save_dir: str | Path):
        super().__init__()
        self._dir = Path(save_dir)
        self._warned = False

    @property
    def name(self) -> str:
        return "record"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self._dir)

    @property
    def path(self) -> Path:
        return self._dir / RECORD_FILE

    def _append(self, entry: dict[str, Any]) -> None:
        """One line more; where it cannot be written (a full disk) training goes on, and it says so once:
        the checkpoints matter more than the record."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"time": time.time(), **entry}, ensure_ascii=False) + "\n")
        except OSError as e:
            if not self._warned:
                log.warning("warning: the run's record %s cannot be written (%s); training goes on", self.path, e)
                self._warned = True

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        # JSON has no NaN or infinity: a diverged loss is kept as a string, as Python writes it
        scalars = {k: v if math.isfinite(v) else str(v) for k, v in scalars.items()}
        self._append({"step": None if step is None else step + 1, "scalars": scalars})

    @rank_zero_only
    def log_sample(self, text: str, step: int) -> None:
        self._append({"step": step, "sample": text})

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The module's hyperparameters as it was built (the model's vocabulary size derived from the
        corpus included), which `.hydra/config.yaml` may leave null."""
        params = dict(params) if isinstance(params, Mapping) else vars(params)
        self._append({"hparams": json.loads(json.dumps(params, default=str))})
