"""One training run from a composed Hydra config: build data, model, callbacks, logger and Trainer,
fit, and return the run's metrics (`train`); and the same as one job of the command line (`run_job`).
The command itself is `shakegpt.commands.train`."""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from shakegpt.errors import RunInterrupted, ShakeGPTError, TrainingFailed
from shakegpt.hardware import emulated_bf16_warning, physical_cores, step_choices
from shakegpt.logs import FILE_ONLY
from shakegpt.run.checks import check_train_config, take_checked_up_front
from shakegpt.run.console import header, resume_command, summary
from shakegpt.run.failures import describe_failure, describe_interruption, lost_ranks_reported, stopping_signal
from shakegpt.run.hparams import differing, hparams_of, param_counts
from shakegpt.run.requeue import hand_over_to_submitit, preempted_by, slurm_plugins, stop_on_preemption
from shakegpt.run.rundir import (
    end_stopped_sweep,
    record_job_failure,
    remove_if_empty,
    run_identity,
    sweeper_records_failures,
)
from shakegpt.run.signals import (
    as_interrupt,
    at_each_step,
    hand_over_to_lightning,
    stopped_before_training,
    take_back_from_lightning,
)
from shakegpt.run.sweep_ddp import sweep_job
from shakegpt.training.callbacks import (
    AtomicCheckpointIO,
    HParamsWithMetric,
    ScalarsLayout,
    StepLines,
    StepProgressBar,
)
from shakegpt.training.checkpoint import check_resumable
from shakegpt.training.module import LitGPT
from shakegpt.training.record import RunRecord

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a user's error (bad value) surfaces as itself, not wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ShakeGPTError):
            raise e.__cause__ from None
        raise


def train(
    cfg: DictConfig, choices: dict[str, str] | None = None, differ: list[str] | None = None, name: str = ""
) -> dict[str, float]:
    """Fit the model that `cfg` describes; return the final callback metrics as floats. `choices`
    (the config groups' options), `differ` (the keys that set this run apart) and `name` label the
    run in TensorBoard's HParams tab."""
    if not take_checked_up_front(cfg.paths.output_dir):  # a command line's run was checked before its directory
        check_train_config(cfg, cfg.paths.output_dir, check_ckpt=False)  # the checkpoint: below, with the vocabulary
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the vocabulary comes from the corpus and is saved with the model
    module = LitGPT(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        vocab=datamodule.tokenizer.chars,
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )
    if cfg.model.get("vocab_size") is None:  # the presets' null: the size LitGPT derived from the corpus
        with open_dict(cfg):
            cfg.model.vocab_size = module.config.vocab_size
    ckpt_path = None
    if cfg.get("ckpt_path"):
        ckpt_path = check_resumable(
            cfg.ckpt_path, module.config, cfg.trainer.max_steps, module.hparams.vocab, module.hparams.name
        )
    fast = step_choices(
        cfg.trainer.accelerator,
        cfg.trainer.precision,
        cfg.get("compile", "auto"),
        module.config.d_model,
        cfg.trainer.get("log_every_n_steps", 50),
    )
    precision = fast.precision
    if precision != cfg.trainer.precision:
        fp16 = cfg.trainer.precision in ("16-mixed", "16")  # what Lightning would run silently: said
        log.info("trainer.precision=%s -> %s", cfg.trainer.precision, precision, extra=None if fp16 else FILE_ONLY)
    slow = emulated_bf16_warning(precision, cfg.trainer.accelerator)
    if slow and rank_zero_only.rank == 0:  # once, not once per DDP process
        log.warning("warning: %s", slow)
    if fast.cuda:
        log.info(
            "on CUDA: torch.compile %s, the loss read every %d steps, training windows cut on the GPU",
            "on" if fast.compile else "off",
            fast.finite_check_every,
            extra=FILE_ONLY,
        )
    module.use_step_choices(fast.compile, fast.finite_check_every)
    datamodule.cut_on_device = fast.cut_on_device
    if "OMP_NUM_THREADS" not in os.environ:  # DDP sets it to cores / processes
        torch.set_num_threads(physical_cores())
    params = hparams_of(cfg, choices) | param_counts(module.model, cfg.data.seq_len) | {"trainer.precision": precision}

    callbacks = [build(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    # Lightning refuses a bar or a checkpoint callback it was told not to use: leave them out instead
    for switch, kind in (("enable_progress_bar", ProgressBar), ("enable_checkpointing", Checkpoint)):
        if not cfg.trainer.get(switch, True):
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    for bar in callbacks:  # each refresh reads the loss: on a GPU, a wait for the step to finish
        if isinstance(bar, StepProgressBar):
            bar.min_refresh = fast.finite_check_every
    extra = {}
    if not sys.stdout.isatty():  # a file, a pipe, a scheduler's log: no bars' carriage returns in it
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        extra["enable_progress_bar"] = False
    if not any(isinstance(c, ProgressBar) for c in callbacks):  # progress as a log line every N steps
        callbacks.append(StepLines(cfg.trainer.get("log_every_n_steps", 50)))
    callbacks += [
        HParamsWithMetric(params, differing(params, cfg, choices, differ or []), name),
        ScalarsLayout(),
        SignalsNoted(),
    ]
    # the config's loggers, and the run's own record, which the summary, sweep tables and `results` read
    loggers = [build(lg) for lg in (cfg.get("logger") or {}).values() if lg is not None]
    loggers.append(RunRecord(cfg.paths.output_dir))
    interval, steps = cfg.trainer.get("val_check_interval"), cfg.trainer.get("max_steps", -1)
    if isinstance(interval, int) and 0 < steps < interval:  # a shortened run still validates (at its end)
        log.info("trainer.val_check_interval=%d > trainer.max_steps=%d: validating at step %d", interval, steps, steps)
        extra["val_check_interval"] = steps
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers,
        precision=precision,
        plugins=[AtomicCheckpointIO(), *slurm_plugins()],
        **extra,
    )
    if trainer.is_global_zero:
        device = f"{trainer.num_devices} x {trainer.strategy.root_device.type}"
        log.info(
            "%s",
            header(
                (choices or {}).get("model", "model"),
                params["params_exact"],
                params["params_original_formula"],
                datamodule.corpus_path,
                len(datamodule.train_ids) + len(datamodule.val_ids),
                len(datamodule.tokenizer.chars),
                device,
                precision,
            ),
        )
    hand_over_to_lightning()
    stop_on_preemption(trainer)  # in a submitit job: its preemption signal stops at the next step
    try:
        # weights_only: resuming reads tensors and plain data, never code from the file
        with lost_ranks_reported(trainer, Path(cfg.paths.output_dir)):
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except ShakeGPTError:
        raise
    except (SystemExit, KeyboardInterrupt) as e:
        signum = stopping_signal(e)
        if signum is None:
            raise
        close_bars(trainer)  # drawn to their end now, so that the line below is the last on the terminal
        if trainer.global_step == 0:  # nothing trained, nothing to keep: as a stop before fit
            raise as_interrupt(signum) from None
        line = describe_interruption(signum, Path(cfg.paths.output_dir), trainer.global_step)
        raise RunInterrupted(line, signum) from None
    except Exception as e:
        raise TrainingFailed(describe_failure(e, Path(cfg.paths.output_dir), trainer.global_step)) from e
    take_back_from_lightning()  # a signal noted in the last step: stop before the sample, as during it

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if "val/loss_best" not in metrics and math.isfinite(module.best_val_loss):
        # a resumed run that ended before its next validation: the best so far is the checkpoint's
        metrics["val/loss_best"] = module.best_val_loss
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the next job of a sweep starts new ranks: it must not find this job's process group
        torch.distributed.destroy_process_group()
    if trainer.is_global_zero:
        if cfg.sample.num_chars > 0:
            s = cfg.sample
            text = module.generate_text(
                s.prompt, s.num_chars, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=s.seed
            )
            print(f"\n--- sample after {trainer.global_step} steps ---\n{text}\n---", flush=True)
        ckpt = trainer.checkpoint_callback
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        score = float(ckpt.best_model_score) if best else None
        log.info("%s", summary(Path(cfg.paths.output_dir), best, score, trainer.global_step))
    return metrics


class SignalsNoted(L.Callback):
    """A signal the handlers noted but nobody acted on (`shakegpt.run.signals`) stops the run at the
    next step."""

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        at_each_step(trainer.received_sigterm)


def close_bars(trainer: L.Trainer) -> None:
    """Close the progress bars of a run that stops: tqdm would otherwise redraw them at exit, after
    the line saying why the run stopped."""
    for bar_callback in trainer.callbacks:
        if isinstance(bar_callback, TQDMProgressBar):
            for name in ("val_progress_bar", "train_progress_bar"):
                try:
                    bar = getattr(bar_callback, name)
                except (AttributeError, TypeError):  # not made yet
                    continue
                bar.close()


def stopped(e: RunInterrupted, run_dir: Path) -> None:
    """End the program for a signal mid-run: one line with the command that resumes the run where it
    was, and the exit code 130 or 143."""
    end_stopped_sweep()
    print(f"stopped: {e}; resume with: {resume_command(run_dir)}", file=sys.stderr, flush=True)
    raise SystemExit(e.exit_code)


def run_job(cfg: DictConfig) -> float | None:
    """One training job as the command line runs it, inside Hydra (a single run or a sweep's job): train,
    tell a user's error in one line, and return the metric a sweeper optimizes (`optimized_metric`)."""
    torch.set_float32_matmul_precision("high")
    # a deprecation inside Lightning that users can do nothing about
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    differ, name = run_identity()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with sweep_job():
            metrics = train(cfg, dict(HydraConfig.get().runtime.choices), differ, name)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM before Lightning's handling began (the corpus, the model)
        stopped_before_training(e, run_dir)
    except RunInterrupted as e:
        log.info("stopped: %s", e, extra=FILE_ONLY)
        if preempted_by() is not None:
            log.info("requeued by submitit: the job resumes from that state in %s", run_dir)
        hand_over_to_submitit()  # preempted in a submitit job: it requeues the job and ends the process
        stopped(e, run_dir)
    except ShakeGPTError as e:  # the user's to fix, or a failure told in one line: no traceback on screen
        # train.log gets the message and the cause's traceback; the terminal gets one "error: …" line below
        log.error("%s", e, exc_info=e.__cause__, extra=FILE_ONLY)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # one failed job must not end the sweep: the others still run
            record_job_failure(Path(hc.runtime.output_dir), e)
            if sweeper_records_failures(hc.sweeper):
                raise  # Optuna records the trial as failed
            which = " ".join(o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in differ)
            print(f"error: job {hc.job.num} ({which}): {e}", file=sys.stderr, flush=True)
            return None  # the grid goes on; the sweep's table lists this job as failed, and it exits 1
        remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        raise SystemExit(f"error: {e}") from None
    name = cfg.get("optimized_metric")
    if name and name not in metrics:  # (a run too short to validate): a sweeper must not take a number
        log.warning(
            "warning: optimized_metric=%s was not logged by this run; logged: %s", name, ", ".join(sorted(metrics))
        )
        return math.nan
    return metrics[name] if name else None
