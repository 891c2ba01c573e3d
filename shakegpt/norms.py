"""The norms a block can use, registered by name: `model.norm=<name>` picks one.

Each entry builds the module from the model config and says whether it is causal (a position's
output depends on that position alone). A new norm is one function here, decorated with
`@register_norm("name")`, and one yaml in conf/model/norm/. Its parameters are never decayed and
never given to Muon (`shakegpt.optim`), whatever their shape: the model names them as norm parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NormSpec:
    build: Callable[..., nn.Module]  # GPTConfig -> module acting on (B, T, d_model)
    causal: bool


NORMS: dict[str, NormSpec] = {}


def register_norm(name: str, causal: bool = True):
    """Decorator: make `build(cfg) -> nn.Module` available as `model.norm=<name>`."""

    def add(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        NORMS[name] = NormSpec(build, causal)
        return build

    return add


@register_norm("layernorm")
def layernorm(cfg) -> nn.Module:
    return nn.LayerNorm(cfg.d_model, bias=cfg.bias)


@register_norm("rmsnorm")
def rmsnorm(cfg) -> nn.Module:
    return nn.RMSNorm(cfg.d_model)


class SeqLayerNorm(nn.Module):
    """The original shakeGPT runs' LayerNorm: over each sequence's whole (seq, d_model) plane, with a
    gain and a bias per position and channel. Every position's output depends on the mean and
    variance of all positions, later ones included: the model is not causal. A sequence shorter
    than `seq_len` is normalized over its own (T, d_model) plane with the first T rows of the gain
    and bias."""

    def __init__(self, seq_len: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(seq_len, d_model))
        self.bias = nn.Parameter(torch.zeros(seq_len, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, C = x.shape[-2:]
        return F.layer_norm(x, (T, C), self.weight[:T], self.bias[:T])


@register_norm("seq_layernorm", causal=False)
def seq_layernorm(cfg) -> nn.Module:
    return SeqLayerNorm(cfg.max_seq_len, cfg.d_model)
