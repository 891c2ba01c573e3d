"""Position encodings behind one small interface.

A position encoding can act at three places in the network, and each one uses only what it needs:

* ``embed(x, offset)``: add absolute position information to the token embeddings (sinusoidal, learned);
* ``rotate(q, k, offset)``: rotate queries and keys by their position (RoPE);
* ``attn_bias(t, offset, dtype, device)``: an additive attention bias that already contains the causal
  mask (ALiBi). ``None`` means "plain causal attention", which keeps attention on the fused kernel.

``offset`` is the absolute position of the first token in the current chunk (0 for training; the
number of cached tokens when generating with a KV cache).

Each encoding is registered by name (``@register("rope")``) and built from the model config by its
``from_config``; ``check`` refuses a config it cannot work with. A new encoding is one class here
and one yaml in conf/model/pos_encoding/.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shakegpt.errors import ConfigError

POS_ENCODINGS: dict[str, type[PositionEncoding]] = {}


def register(name: str):
    """Class decorator: make a position encoding available as `model.pos_encoding=<name>`."""

    def add(cls: type[PositionEncoding]) -> type[PositionEncoding]:
        POS_ENCODINGS[name] = cls
        return cls

    return add


class PositionEncoding(nn.Module):
    """No position information at all: the causal mask alone lets the model infer position."""

    @classmethod
    def from_config(cls, cfg) -> PositionEncoding:
        """Build from a GPTConfig (max_seq_len, d_model, n_head, head_dim, rope_base, ...)."""
        return cls()

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ConfigError for a GPTConfig this encoding cannot work with."""

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return q, k

    def attn_bias(self, t: int, offset: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        return None


@register("sinusoidal")
class Sinusoidal(PositionEncoding):
    """Fixed sin/cos table of "Attention is all you need" (the original runs' "PE function")."""

    @classmethod
    def from_config(cls, cfg) -> Sinusoidal:
        return cls(cfg.max_seq_len, cfg.d_model)

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_seq_len, d_model)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: d_model // 2])
        # not persistent: it is a function of the config, so checkpoints need not carry it
        self.register_buffer("table", table, persistent=False)

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return x + self.table[offset : offset + x.size(1)]  # (B, T, C) + (T, C)


@register("learned")
class Learned(PositionEncoding):
    """A trained table of one vector per position (v3's "Embedding", nanoGPT's wpe)."""

    @classmethod
    def from_config(cls, cfg) -> Learned:
        return cls(cfg.max_seq_len, cfg.d_model)

    def __init__(self, max_seq_len: int, d_model: int):
        super().__init__()
        self.table = nn.Embedding(max_seq_len, d_model)

    def embed(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        pos = torch.arange(offset, offset + x.size(1), device=x.device)
        return x + self.table(pos)


@register("rope")
class Rope(PositionEncoding):
    """Rotary embeddings: rotate each (even, odd) pair of q/k channels by a position-dependent angle,
    so that q·k depends only on the distance between positions."""

    @classmethod
    def from_config(cls, cfg) -> Rope:
        return cls(cfg.max_seq_len, cfg.head_dim, cfg.rope_base)

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.head_dim % 2:
            raise ConfigError(f"rope needs an even head size, got d_model/n_head = {cfg.head_dim}")

    def __init__(self, max_seq_len: int, head_dim: int, base: float = 10000.0):
        super().__init__()
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (hd/2,)
        angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq  # (T, hd/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _turn(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, T, hd/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2).type_as(x)

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        t = q.size(-2)
        cos, sin = self.cos[offset : offset + t], self.sin[offset : offset + t]
        return self._turn(q, cos, sin), self._turn(k, cos, sin)


@register("alibi")
class Alibi(PositionEncoding):
    """ALiBi: no embedding; each head penalises attention linearly in the query-key distance."""

    @classmethod
    def from_config(cls, cfg) -> Alibi:
        return cls(cfg.n_head)

    def __init__(self, n_head: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_head), persistent=False)

    def attn_bias(self, t: int, offset: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        q_pos = torch.arange(offset, offset + t, device=device)[:, None]
        k_pos = torch.arange(0, offset + t, device=device)[None, :]
        dist = (q_pos - k_pos).float()  # (Tq, Tk), >= 0 where attention is allowed
        bias = -self.slopes[:, None, None] * dist  # (H, Tq, Tk)
        bias = bias.masked_fill(dist < 0, float("-inf"))
        return bias.to(dtype)


register("none")(PositionEncoding)


def alibi_slopes(n_head: int) -> torch.Tensor:
    """Geometric slopes 2^(-8/n), 2^(-16/n), ...; for a head count that is not a power of two the
    ALiBi paper takes the slopes of the next lower power of two and fills in every other slope of
    the next higher one."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_head).is_integer():
        slopes = geometric(n_head)
    else:
        low = 2 ** math.floor(math.log2(n_head))
        slopes = geometric(low) + geometric(2 * low)[0::2][: n_head - low]
    return torch.tensor(slopes, dtype=torch.float32)


def build_pos_encoding(cfg) -> PositionEncoding:
    """The position encoding a GPTConfig names."""
    if cfg.pos_encoding not in POS_ENCODINGS:
        raise ConfigError(f"unknown pos_encoding {cfg.pos_encoding!r}; choose one of {', '.join(POS_ENCODINGS)}")
    return POS_ENCODINGS[cfg.pos_encoding].from_config(cfg)
