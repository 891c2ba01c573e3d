"""What a run records about itself for TensorBoard's HParams tab: its settings as one flat dict,
and its parameter counts."""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, OmegaConf

from shakegpt.logs import FILE_ONLY
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
    for group in PRESET_GROUPS:  # model/pos_encoding's choice is model.pos_encoding already
        if choices and choices.get(group):
            flat[f"preset.{group}"] = choices[group]
    return flat


PRESET_GROUPS = ("model", "experiment")


def differing(params: dict[str, Any], cfg: DictConfig, choices: dict[str, str] | None, keys: list[str]) -> list[str]:
    """The names in `params` of the settings that tell this run from its neighbours: the keys of
    `keys` (what a sweep varies, or a run's command-line overrides, as Hydra writes them:
    `optim.lr`, `model/pos_encoding`, `+trainer.foo`), a preset as `preset.<group>`. A key the flat
    dict lacks (`trainer.val_check_interval`, a group such as `data`) is added to `params` with its
    value. Hydra's own keys are left out."""
    names: list[str] = []
    for raw in keys:
        key = raw.lstrip("+~")
        if key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        dotted = key.replace("/", ".")
        for name in (key, f"preset.{key}", dotted):
            if name in params:
                break
        else:
            if choices and key in choices:  # a config group: the option chosen
                name, value = f"preset.{key}", choices[key]
            else:
                name, value = key, OmegaConf.select(cfg, key, default=None)
            params[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
        if name not in names:
            names.append(name)
    return names


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
