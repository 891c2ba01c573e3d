"""One training run from a composed Hydra config: build data, model, callbacks, logger and Trainer,
fit, and return the run's metrics. `train.py` at the top level is the command-line entry."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint, ProgressBar
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from shakegpt.callbacks import AtomicCheckpointIO, HParamsWithMetric
from shakegpt.checkpoint import check_resumable
from shakegpt.checks import check_train_config
from shakegpt.configs import CONF_DIR
from shakegpt.errors import ConfigError, ShakeGPTError, TrainingFailed
from shakegpt.failures import describe_failure, report_lost_ranks
from shakegpt.hardware import physical_cores, resolve_precision
from shakegpt.model import seed_formula_params
from shakegpt.module import LitGPT

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`hydra.utils.instantiate`, but a user's error (bad value) surfaces as itself, not wrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ShakeGPTError):
            raise e.__cause__ from None
        raise


def hparams_of(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's hyperparameters as one flat dict (model.*, data.*, optim.*, a few trainer.*), for
    TensorBoard's HParams tab; the preset names chosen on the command line are included."""
    keep = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: cfg.data[k] for k in ("batch_size", "seq_len")},
        "optim": OmegaConf.to_container(cfg.optim, resolve=True),
        "trainer": {k: cfg.trainer.get(k) for k in ("max_steps", "precision", "devices", "gradient_clip_val")},
        "seed": cfg.seed,
    }
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = node

    walk("", keep)
    for group in ("model", "model/pos_encoding", "experiment"):
        if choices and choices.get(group):
            flat[f"preset.{group}"] = choices[group]
    return flat


def log_param_counts(module: LitGPT, seq_len: int) -> dict[str, int]:
    parts = module.model.param_breakdown()
    exact, seed = sum(parts.values()), seed_formula_params(module.config, seq_len)
    log.info(
        "parameters: %s exact (%s); %s by the seed's formula (its LayerNorms are (seq, d_model) planes)",
        f"{exact:,}",
        ", ".join(f"{k} {v:,}" for k, v in parts.items() if v),
        f"{seed:,}",
    )
    return {"params_exact": exact, "params_seed_formula": seed}


def check_vocabulary(ckpt_path: Path, ckpt_vocab: str, vocab: str) -> None:
    """A checkpoint to resume from must have been trained on this corpus's vocabulary."""
    if ckpt_vocab != vocab:
        raise ConfigError(
            f"ckpt_path={ckpt_path} was trained on a vocabulary of {len(ckpt_vocab)} characters, this corpus has "
            f"{len(vocab)}; resume with the corpus it was trained on (data.path)"
        )


def train(cfg: DictConfig, choices: dict[str, str] | None = None) -> dict[str, float]:
    """Fit the model that `cfg` describes; return the final callback metrics as floats."""
    check_train_config(cfg, cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")  # the vocabulary comes from the corpus and sizes nothing, but is saved with the model
    module = LitGPT(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        vocab=datamodule.tokenizer.chars,
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )
    ckpt_path = None
    if cfg.get("ckpt_path"):
        ckpt_path, ckpt_hp = check_resumable(cfg.ckpt_path, module.config, cfg.trainer.max_steps)
        check_vocabulary(ckpt_path, ckpt_hp["vocab"], module.hparams.vocab)
    precision = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator, module.config.d_model)
    if precision != cfg.trainer.precision:
        log.info("trainer.precision=%s -> %s", cfg.trainer.precision, precision)
    if "OMP_NUM_THREADS" not in os.environ:  # DDP sets it to cores / processes
        torch.set_num_threads(physical_cores())
    params = hparams_of(cfg, choices) | log_param_counts(module, cfg.data.seq_len) | {"trainer.precision": precision}

    callbacks = [build(c) for c in cfg.get("callbacks", {}).values() if c is not None]
    # Lightning refuses a bar or a checkpoint callback it was told not to use: leave them out instead
    for switch, kind in (("enable_progress_bar", ProgressBar), ("enable_checkpointing", Checkpoint)):
        if not cfg.trainer.get(switch, True):
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    callbacks.append(HParamsWithMetric(params))
    loggers = [build(lg) for lg in cfg.get("logger", {}).values() if lg is not None]
    extra = {}
    interval, steps = cfg.trainer.get("val_check_interval"), cfg.trainer.get("max_steps", -1)
    if isinstance(interval, int) and 0 < steps < interval:  # a shortened run still validates (at its end)
        log.info("trainer.val_check_interval=%d > trainer.max_steps=%d: validating at step %d", interval, steps, steps)
        extra["val_check_interval"] = steps
    trainer: L.Trainer = build(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        precision=precision,
        plugins=[AtomicCheckpointIO()],
        **extra,
    )
    report_lost_ranks(trainer, Path(cfg.paths.output_dir))
    try:
        # weights_only: resuming reads tensors and plain data, never code from the file
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except ShakeGPTError:
        raise
    except Exception as e:
        raise TrainingFailed(describe_failure(e, Path(cfg.paths.output_dir), trainer.global_step)) from e

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # the next job of a sweep starts new ranks: it must not find this job's process group
        torch.distributed.destroy_process_group()
    if trainer.is_global_zero:
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            log.info("best checkpoint: %s (val loss %.4f)", ckpt.best_model_path, ckpt.best_model_score)
        if cfg.sample.num_chars > 0:
            s = cfg.sample
            text = module.generate_text(s.prompt, s.num_chars, s.temperature, s.top_k, s.seed)
            print(f"\n--- sample after {trainer.global_step} steps ---\n{text}\n---", flush=True)
    return metrics


def remove_if_empty(run_dir: Path) -> None:
    """Delete the directory of a run that stopped before training started: it holds only Hydra's
    record and a log ending in the error just printed, and would clutter outputs/."""
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)


@contextmanager
def sweep_job():
    """Inside a Hydra multirun, make Lightning's DDP launcher start this job's other ranks, not a sweep.

    Lightning starts ranks 1.. by running `sys.argv` again with `hydra.run.dir=<HydraConfig run.dir>`
    appended. Under `-m`, sys.argv is the whole sweep, so every rank would start a sweep of its own
    (Lightning #11300, Hydra #2070). For the job's duration the argv becomes this job's own overrides
    and the run dir this job's directory, so rank 1 joins this job, in it, once. Afterwards the
    environment is restored: the launcher leaves LOCAL_RANK, WORLD_SIZE, MASTER_PORT… behind, and
    the next job would take them to mean its ranks were started by someone else, and wait forever."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        yield
        return
    argv, env = sys.argv, dict(os.environ)
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    try:
        with sweep_job():
            metrics = train(cfg, dict(HydraConfig.get().runtime.choices))
    except ShakeGPTError as e:  # the user's to fix, or a failure told in one line: no traceback on screen
        log.error("%s", e)
        if e.__cause__ is not None:
            traceback_to_log_file(e.__cause__)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # one failed job of a sweep (an Optuna trial with a bad value) must not end the sweep
        remove_if_empty(Path(HydraConfig.get().runtime.output_dir))
        raise SystemExit(f"error: {e}") from None
    name = cfg.get("optimized_metric")
    if name:
        if name not in metrics:
            raise KeyError(f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}")
        return metrics[name]
    return None


def traceback_to_log_file(e: BaseException) -> None:
    """Write the traceback of a failure to the run's log file (not to the terminal)."""
    text = "".join(traceback.format_exception(e))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.stream.write(text)
                handler.flush()
            finally:
                handler.release()
