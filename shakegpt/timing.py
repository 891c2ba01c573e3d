"""Measuring speed in plain PyTorch: a device's matmul peak, a model's FLOPs per training step, and a
bare training loop that times each step. The bench and the GPU check build on these."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from shakegpt.corpus import RandomWindows, cut_windows
from shakegpt.model import GPT, GPTConfig


def sync(device: str) -> None:
    """Wait for the device's queued work (a GPU's steps run after the host has moved on)."""
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, sizes=(1024, 2048, 3072), reps: int = 3, device: str = "cpu") -> float:
    """Best measured FLOP/s of a square matmul in `dtype` on `device` (the MFU denominator)."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b  # warm-up: oneDNN (cuBLAS) picks its kernel on the first call
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def flops_per_step(cfg: GPTConfig, batch_size: int, seq_len: int) -> float:
    n = GPT(cfg).num_params(non_embedding=True)
    return (6 * n + 12 * cfg.n_layer * cfg.d_model * seq_len) * batch_size * seq_len


class Loop:
    """One optimizer step at a time of a model in a plain PyTorch loop; records each step's time."""

    def __init__(
        self,
        model: GPT,
        opt: torch.optim.Optimizer,
        windows: RandomWindows,
        autocast: bool,
        clip: float | None,
        sched=None,
        device: str = "cpu",
    ):
        """On a GPU (`device="cuda"`) the windows are cut there, as training does, and each step
        ends with a sync so that its time is the device's."""
        self.model, self.opt, self.windows, self.autocast, self.clip, self.sched = (
            model,
            opt,
            windows,
            autocast,
            clip,
            sched,
        )
        self.device = device
        self.ids = windows.ids.to(device)
        self.n, self.times = 0, []

    def step(self) -> None:
        t = time.perf_counter()
        if self.device == "cpu":
            x, y = self.windows.batch(self.n)
        else:
            x, y = cut_windows(self.ids, self.windows.starts(self.n).to(self.device), self.windows.seq_len)
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            loss = F.cross_entropy(self.model(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        self.n += 1
        self.times.append(time.perf_counter() - t)


def mfu_peak(peak: dict[str, float]) -> float:
    """The MFU denominator: the machine's best measured matmul peak (bf16 where the CPU runs it
    natively, fp32 where bf16 is emulated and slower)."""
    return max(peak.values())
