"""What a run records about itself for TensorBoard's HParams tab: its settings as one flat dict,
and its parameter counts."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from shakegpt.console import FILE_ONLY
from shakegpt.model import GPT, original_formula_params

log = logging.getLogger(__name__)


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


def param_counts(model: GPT, seq_len: int) -> dict[str, int]:
    """The model's exact parameter count and the original runs' formula's, logged with the breakdown."""
    parts = model.param_breakdown()
    exact, original = sum(parts.values()), original_formula_params(model.cfg, seq_len)
    log.info(
        "parameters: %s exact (%s); %s by the original runs' formula (its LayerNorms are (seq, d_model) planes)",
        f"{exact:,}",
        ", ".join(f"{k} {v:,}" for k, v in parts.items() if v),
        f"{original:,}",
        extra=FILE_ONLY,  # the terminal's header says it shorter
    )
    return {"params_exact": exact, "params_original_formula": original}
