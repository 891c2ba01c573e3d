"""The CPU speed devices the model uses, kept apart from the reference model in model.py:

- `ByteDropout`: dropout whose keep-mask is drawn as random bytes, about 5x cheaper than torch's
  `bernoulli_` on the CPU (which otherwise takes a sixth of a training step);
- `linear`: `F.linear` whose one-row fp32 matmul (the one-token generation step) is split across
  threads.

Both do exactly what their torch counterparts do elsewhere (other devices, shapes, dtypes, grads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ByteDropout(nn.Module):
    """Inverted dropout whose keep-mask is drawn as random bytes: one 64-bit draw serves eight
    elements, so masks cost about a fifth of `bernoulli_` on the CPU. An element is kept when its
    byte is >= round(256 * p), so the rate is p rounded to a multiple of 1/256 (0.1 -> 0.102,
    0.2 -> 0.199). Other devices use `F.dropout`, which is already cheap there."""

    def __init__(self, p: float, fast: bool = True):
        super().__init__()
        self.p, self.fast = p, fast
        self.threshold = round(256 * p)
        self.scale = 256 / (256 - self.threshold) if self.threshold < 256 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        if not self.fast or x.device.type != "cpu" or torch.compiler.is_compiling():  # (compiled: no in-place random_)
            return F.dropout(x, self.p, True)
        n = x.numel()
        words = torch.empty((n + 7) // 8, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
        keep = words.view(torch.uint8)[:n].view(x.shape) >= self.threshold
        return x * keep.to(x.dtype).mul_(self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}, fast={self.fast}"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` for the one-token generation step. A one-row fp32 matmul runs on
    one core and is bound by reading the weight; splitting the weight's output rows into one batch
    per thread lets every core read its share (about 2x at the v3 shape on 2 cores). Other shapes,
    dtypes and devices, and anything that needs gradients, take `F.linear` unchanged."""
    if torch.compiler.is_compiling() or x.device.type != "cpu" or torch.is_grad_enabled():
        return F.linear(x, weight, bias)  # (asked first: torch.compile would break its graph at the thread count)
    out, inp = weight.shape
    k = torch.get_num_threads()
    if x.numel() != inp or k < 2 or out % k or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return F.linear(x, weight, bias)
    y = torch.bmm(x.reshape(1, 1, inp).expand(k, 1, inp), weight.view(k, out // k, inp).transpose(1, 2))
    y = y.view(*x.shape[:-1], out)
    return y if bias is None else y + bias
