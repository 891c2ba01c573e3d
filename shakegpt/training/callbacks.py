"""shakegpt's own Lightning callbacks: the step progress bar, the original runs' log line, text samples,
the TensorBoard HParams entry and Custom Scalars layout, and the checkpoint saved when a run is
interrupted; the TensorBoard logger; and the checkpoint writer that never leaves a truncated file."""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from shakegpt.errors import ShakeGPTError
from shakegpt.sampling import TEMPERATURE, TOP_K, TOP_P
from shakegpt.training.record import RunRecord

log = logging.getLogger(__name__)


def hms(seconds: float) -> str:
    """Seconds -> 'h:mm:ss', hours unbounded (the original runs' clock format: '42:26:43', not '1 day, …')."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def original_log_line(
    elapsed: float,
    step: int,
    total: int,
    remain: float,
    train_loss: float,
    val_loss: float,
    train_acc: float,
    val_acc: float,
) -> str:
    """`T+ 0:40:01 - step 7657/9652: train loss 1.5231, val loss 1.6900; train acc  0.4141, val acc 0.3893;
    t_remain 0:10:41`: the original shakeGPT runs' line (`remain` nan: unknown, shown as '?')."""
    return (
        f"T+ {hms(elapsed)} - step {step}/{total}: "
        f"train loss {train_loss:.4f}, val loss {val_loss:.4f}; "
        f"train acc {train_acc:7.4f}, val acc {val_acc:.4f}; "
        f"t_remain {hms(remain) if math.isfinite(remain) else '?'}"
    )


class StepProgressBar(TQDMProgressBar):
    """A bar over optimizer steps up to `trainer.max_steps` (training batches are an endless stream,
    so Lightning's per-epoch bar has no total); tqdm then shows elapsed and remaining time.
    `min_refresh`: it redraws at most every that many steps (train() sets it on a GPU, where each
    redraw reads the loss and so waits for the step)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_refresh = 1

    @property
    def refresh_rate(self) -> int:
        rate = super().refresh_rate
        return max(rate, self.min_refresh) if rate > 0 else rate

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = trainer.global_step  # after a resume: rate and ETA count only this run's steps
        bar.n = trainer.global_step
        bar.set_description("step")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if bar is not None and not bar.disable and (step % self.refresh_rate == 0 or step == bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=True)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the run directory names the run
        return metrics


class StepLines(L.Callback):
    """Where the output is not a terminal (a file, a pipe, a scheduler's log), progress as plain log
    lines instead of a bar's carriage returns: one every `every` steps (validations add the original
    runs' log line). The loss is read when Lightning's logging reads it anyway."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = max(1, int(every))
        self._start: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.monotonic(), trainer.global_step)

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any) -> None:
        step = trainer.global_step
        if step % self.every and step != trainer.max_steps:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        t0, step0 = self._start or (time.monotonic(), step)
        per_step = (time.monotonic() - t0) / max(1, step - step0)
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        log.info("step %d%s: train loss %.4f, %.2f s/step", step, total, float(loss), per_step)


class OriginalLogLine(L.Callback):
    """After every validation, print the original shakeGPT runs' line:
    `T+ 0:40:01 - step 7657/9652: train loss 1.5231, val loss 1.6900; train acc  0.4141, val acc 0.3893; t_remain 0:10:41`
    Train figures are the mean over the steps since the previous validation."""

    def __init__(self) -> None:
        self.start: float | None = None
        self.start_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start, self.start_step = time.perf_counter(), trainer.global_step

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.start is None:
            return
        m = trainer.callback_metrics
        if "val/loss" not in m or "train/loss_avg" not in m:
            return
        elapsed = time.perf_counter() - self.start
        step, total = trainer.global_step, trainer.max_steps
        done = step - self.start_step  # after a resume, the pace is this run's own
        remain = elapsed / done * (total - step) if done > 0 and total > 0 else math.nan
        line = original_log_line(
            elapsed, step, total, remain, m["train/loss_avg"], m["val/loss"], m["train/acc_avg"], m["val/acc"]
        )
        log.info(line)
        # above the progress bar, and also where no logging handler is set up (a notebook)
        bar = next((c for c in trainer.callbacks if isinstance(c, TQDMProgressBar)), None)
        if bar is not None and bar.is_enabled and not logging.getLogger().handlers:
            bar.print(line)


class TextSample(L.Callback):
    """At the end of every validation, generate text from a fixed prompt and seed and write it to
    TensorBoard (TEXT tab) and the run's record, so the run's progress can be read as well as plotted."""

    def __init__(
        self,
        prompt: str = "\n",
        num_chars: int = 300,
        *,
        temperature: float = TEMPERATURE,
        top_k: int | None = TOP_K,
        top_p: float | None = TOP_P,
        seed: int = 0,
    ):
        self.prompt, self.num_chars, self.seed = prompt, num_chars, seed
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.num_chars <= 0:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, (TensorBoardLogger, RunRecord))]
        if not loggers:
            return
        text = pl_module.generate_text(self.prompt, self.num_chars, seed=self.seed, **self.sampling)
        for lg in loggers:
            if isinstance(lg, RunRecord):
                lg.log_sample(text, trainer.global_step)
            else:  # TensorBoard renders text as markdown: indent it as a code block to keep the line breaks
                lg.experiment.add_text("sample", "    " + text.replace("\n", "\n    "), trainer.global_step)


class HParamsWithMetric(L.Callback):
    """Write the run's entry in TensorBoard's HParams tab (and its settings to the other trackers): a
    column for each setting in `differing` (integers, booleans and strings as themselves), the values
    of all its settings, `name` as the run's name in the table (its trial ID), and the best and the
    last val loss as the metric columns. Their values come from the scalars logged at each
    validation, so the tab never shows a placeholder (Lightning's `hp_metric = -1`). The run's status
    (finished, or failed or stopped) is written at its end."""

    METRICS = (("val/loss_best", "best val loss"), ("val/loss", "last val loss"))

    def __init__(self, params: dict[str, Any], differing: list[str] | tuple[str, ...] = (), name: str = ""):
        self.params = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
        self.differing, self.name = [k for k in differing if k in self.params], name

    def _write(self, trainer: L.Trainer, summaries: list) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                writer = lg.experiment._get_file_writer()
                for summary in summaries:
                    writer.add_summary(summary)
                writer.flush()

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from shakegpt.training.tb_summaries import hparams_start

        self._write(trainer, hparams_start(self.params, self.differing, self.METRICS, self.name))
        # other trackers (CSV, MLflow) get the same flat settings the HParams tab shows, beside the
        # module's nested hyperparameters that Lightning gives every logger
        for lg in trainer.loggers:
            if not isinstance(lg, (TensorBoardLogger, RunRecord)):
                lg.log_hyperparams(self.params)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from shakegpt.training.tb_summaries import hparams_end

        self._write(trainer, [hparams_end("STATUS_SUCCESS")])

    @rank_zero_only
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from shakegpt.training.tb_summaries import hparams_end

        self._write(trainer, [hparams_end("STATUS_FAILURE")])  # stopped, crashed or diverged: not finished


class ScalarsLayout(L.Callback):
    """TensorBoard's Custom Scalars tab, laid out to answer "is it learning": train loss (averaged
    since the previous validation) and val loss on one chart, then accuracy, the learning rate and
    the speed."""

    # TensorBoard reads each tag as a regular expression: anchored, `val/loss` is not also `val/loss_best`
    LAYOUT: ClassVar[dict] = {
        "is it learning": {
            "loss: train (mean since the last validation) and val": ["Multiline", ["^train/loss_avg$", "^val/loss$"]],
            "accuracy: train (mean since the last validation) and val": ["Multiline", ["^train/acc_avg$", "^val/acc$"]],
        },
        "schedule and speed": {
            "learning rate": ["Multiline", ["^train/lr$"]],
            "tokens per second": ["Multiline", ["^wallclock/tokens_per_s$"]],
            "milliseconds per step": ["Multiline", ["^wallclock/step_ms$"]],
        },
    }

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                lg.experiment.add_custom_scalars(self.LAYOUT)


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose `last.ckpt` is the state of the latest validation and of the end of the
    run, whether or not val loss improved. (Lightning 2.6 writes `last` only beside a new best, so a
    run whose val loss has turned up would leave `last.ckpt` at its best step.) Best-by-val-loss
    checkpoints are kept as ModelCheckpoint keeps them."""

    def __init__(self, *args: Any, save_last: bool = True, **kwargs: Any) -> None:
        # a second run in the same directory is refused before it starts, so `last.ckpt` is always
        # this run's: never `last-v1.ckpt` beside another run's
        kwargs.setdefault("enable_version_counter", False)
        # ModelCheckpoint keeps the best ones; `last.ckpt` is written here, with the Trainer's own
        # save_checkpoint, so that no private method of ModelCheckpoint is relied on
        super().__init__(*args, save_last=False, **kwargs)
        self.keep_last = bool(save_last)
        self._last_step_written: int | None = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A run resumed into another directory keeps the best val loss so far and where its
        checkpoint is, so it writes a best checkpoint only when it beats that one. (Lightning forgets
        the score when the directory changes, and would call the resumed run's first validation its
        best.) The earlier run's files stay: ModelCheckpoint deletes only inside its own directory."""
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)
            return
        self.best_model_score = state_dict["best_model_score"]
        self.kth_best_model_path = state_dict.get("kth_best_model_path", self.kth_best_model_path)
        self.kth_value = state_dict.get("kth_value", self.kth_value)
        self.best_k_models = state_dict.get("best_k_models", self.best_k_models)
        self.best_model_path = state_dict["best_model_path"]

    def _write_last(self, trainer: L.Trainer) -> None:
        if (
            self.keep_last
            and self.dirpath is not None
            and not trainer.sanity_checking
            and trainer.state.fn == "fit"
            and trainer.global_step > 0
            and self._last_step_written != trainer.global_step
        ):
            path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            trainer.save_checkpoint(path, weights_only=False)  # the full state; every rank calls it, rank 0 writes
            self.last_model_path, self._last_step_written = str(path), trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._write_last(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._write_last(trainer)


class InterruptCheckpoint(Checkpoint):
    """On Ctrl-C, SIGTERM or a crash, save `<dirpath>/<filename>.ckpt` (weights, optimizer, schedule,
    step) so the run can resume with ckpt_path=…. Not before the first step (nothing to keep), not
    after a divergence (those weights are what went wrong) and not on a full or read-only disk (it
    cannot be written; the last good checkpoint stays). (Lightning's own OnExceptionCheckpoint would
    also make every later `fit` in the same directory resume silently from whatever checkpoint it
    finds there; a run resumes only when given ckpt_path.)"""

    def __init__(self, dirpath: str | Path, filename: str = "interrupted"):
        super().__init__()
        if not filename:
            raise ValueError("InterruptCheckpoint needs a filename")
        self.path = Path(dirpath) / f"{filename}.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0 or isinstance(exception, ShakeGPTError):
            return
        if not getattr(pl_module, "loss_was_finite", lambda: True)():  # a deferred check had not looked yet
            return
        if isinstance(exception, OSError) and exception.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES):
            return
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # the full state: resumable
        except OSError as e:  # the failure being handled is the one to report
            log.warning("could not write %s: %s", self.path, e)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file beside its destination, flush it to disk, then
    rename it into place: a kill or a full disk during the write leaves the previous checkpoint
    whole and no truncated file under the checkpoint's name. Remote paths (s3://, ...) keep
    Lightning's own writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with signals_held():
            try:
                with open(tmp, "wb") as f:
                    writer = _WriteErrors(f)
                    try:
                        torch.save(checkpoint, writer)
                    except Exception as e:
                        # torch's zip writer reports a failed write (a full disk) as "unexpected pos":
                        # raise the write's own error instead
                        if writer.error is not None:
                            raise writer.error from e
                        raise
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)  # atomic on POSIX and Windows within one file system
            except OSError as e:  # name the checkpoint, not the temporary file or the open stream
                raise OSError(e.errno, e.strerror or str(e), str(path)) from e
            finally:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def signals_held():
    """Hold Ctrl-C and SIGTERM while the block runs, then deliver them. A KeyboardInterrupt raised
    inside torch's checkpoint writer comes out of it as "unexpected pos", a crash instead of a stop;
    held, the signal stops the run just after the checkpoint is whole. Only signals with a Python
    handler are held (the default ones kill the process, as they would anyway)."""
    if threading.current_thread() is not threading.main_thread():  # handlers are set from the main thread only
        yield
        return
    came: list[int] = []
    held = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        if callable(signal.getsignal(signum)):
            held[signum] = signal.signal(signum, lambda s, frame: came.append(s))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(came):
            os.kill(os.getpid(), signum)  # its own handler runs now, as if it came at this moment


class _WriteErrors:
    """A binary file that remembers the first OSError its writes raised."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()
