"""What this machine can do fast, and the precision that follows from it (`trainer.precision=auto`)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import torch

# below this width a model is too small for bf16 to pay on a CPU: measured at the v1 shape
# (d_model 32) bf16 autocast made a step 1.3x slower (its casts cost more than its matmuls save)
BF16_MIN_D_MODEL = 128


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run natively (AMX or AVX512-BF16), so bf16 autocast pays."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's matmul units, so more threads don't help)."""
    try:
        cores = {
            (block.get("physical id"), block.get("core id"))
            for block in (
                dict(kv.split(":", 1) for kv in para.splitlines() if ":" in kv)
                for para in Path("/proc/cpuinfo").read_text().split("\n\n")
            )
            if block.get("core id") is not None
        }
        if cores:
            return len(cores)
    except OSError:
        pass
    return os.cpu_count() or 1


def resolve_precision(precision: str, accelerator: str, d_model: int) -> str:
    """`precision` as given, or for "auto" the one `auto_precision` picks."""
    return auto_precision(accelerator, d_model) if precision == "auto" else precision


def auto_precision(accelerator: str, d_model: int) -> str:
    """Lightning's `precision` for `trainer.precision=auto`: bf16 mixed precision where the hardware
    runs bf16 natively and the model is wide enough to profit, full fp32 elsewhere."""
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("cpu", "auto") and cpu_has_fast_bf16() and d_model >= BF16_MIN_D_MODEL:
        return "bf16-mixed"
    return "32-true"
