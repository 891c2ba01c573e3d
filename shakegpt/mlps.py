"""The feed-forward activations a block can use, registered by name: `model.mlp=<name>` picks one.

Every feed-forward is d_model -> d_ff -> d_model (`shakegpt.model.FeedForward`); an entry gives the
function applied between the two projections and how many d_ff-wide halves the first one makes
(SwiGLU's gate and value: 2). A new one is one function here, decorated with `@register_mlp("name")`,
and one yaml in conf/model/mlp/.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MLPSpec:
    activation: Callable[[torch.Tensor], torch.Tensor]  # (..., halves * d_ff) -> (..., d_ff)
    halves: int


MLPS: dict[str, MLPSpec] = {}


def register_mlp(name: str, halves: int = 1):
    """Decorator: make `activation` available as `model.mlp=<name>`."""

    def add(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        MLPS[name] = MLPSpec(activation, halves)
        return activation

    return add


@register_mlp("gelu")
def gelu(h: torch.Tensor) -> torch.Tensor:  # GPT-2
    return F.gelu(h)


@register_mlp("relu2")
def relu2(h: torch.Tensor) -> torch.Tensor:  # ReLU squared (modded-nanogpt)
    return F.relu(h).square()


@register_mlp("swiglu", halves=2)
def swiglu(h: torch.Tensor) -> torch.Tensor:  # a SiLU gate times a second projection
    gate, value = h.chunk(2, dim=-1)
    return F.silu(gate) * value
