"""What this machine can do fast, and the precision that follows from it (`trainer.precision=auto`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

from shakegpt.errors import ConfigError, checked_once

# below this width a model is too small for bf16 to pay on a CPU: measured at the v1 shape
# (d_model 32) bf16 autocast made a step 1.3x slower (its casts cost more than its matmuls save)
BF16_MIN_D_MODEL = 128


@cache
def cpu_capabilities() -> Mapping[str, Any]:
    """What torch reports of this machine's CPU: instruction sets (avx512_bf16, amx_bf16, ... on x86;
    neon, bf16, sve ... on ARM) and core counts, the same on Linux, macOS and Windows. Older torch
    releases (before `torch.cpu.get_capabilities`) answer the two bf16 questions only."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    caps: dict[str, Any] = {}
    for name, ask in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        if hasattr(torch.cpu, ask):
            caps[name] = bool(getattr(torch.cpu, ask)())
    return caps


def cpu_has_fast_bf16() -> bool:
    """True where bf16 matmuls run natively on an x86 CPU (AMX or AVX512-BF16), so bf16 autocast pays.
    ARM CPUs stay in fp32: bf16 autocast there has not been measured to pay for this project's shapes."""
    caps = cpu_capabilities()
    return bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's matmul units, so more threads don't help)."""
    cores = cpu_capabilities().get("num_physical_cores")
    return int(cores) if cores else (os.cpu_count() or 1)


def device_kind(accelerator: str) -> str:
    """The device Lightning trains on for `trainer.accelerator` on this machine: "cuda", "mps" or
    "cpu" (any other accelerator as named). Lightning's own order: with `auto` and `gpu`, an Apple
    GPU (MPS) comes before CUDA."""
    if accelerator in ("auto", "gpu"):
        if torch.backends.mps.is_available():
            return "mps"
        if torch.cuda.is_available():
            return "cuda"
        return "cpu" if accelerator == "auto" else "cuda"
    return accelerator


def on_cuda(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` setting trains on CUDA GPUs on this machine."""
    return device_kind(accelerator) == "cuda"


def on_cpu(accelerator: str) -> bool:
    """Whether Lightning's `accelerator` setting trains on this machine's CPU."""
    return device_kind(accelerator) == "cpu"


# on a CPU, Lightning runs fp16 mixed precision as bf16 (CPU autocast has no fp16 matmuls): named as it runs
CPU_FP16_AS = {"16-mixed": "bf16-mixed", "16": "bf16-mixed"}


def resolve_precision(precision: str, accelerator: str, d_model: int) -> str:
    """`precision` as it will run: for "auto" the one `auto_precision` picks; fp16 mixed precision
    on a CPU as the bf16 Lightning runs there (so the header, the log and HParams say bf16)."""
    if precision == "auto":
        return auto_precision(accelerator, d_model)
    if on_cpu(accelerator) and precision in CPU_FP16_AS:
        return CPU_FP16_AS[precision]
    return precision


def auto_precision(accelerator: str, d_model: int) -> str:
    """Lightning's `precision` for `trainer.precision=auto`: bf16 mixed precision where the hardware
    runs bf16 natively and the model is wide enough to profit, full fp32 elsewhere. Decided from what
    torch reports, so it is the same on Linux, macOS and Windows. An Apple GPU (MPS) trains in fp32:
    fp16 autocast there needs a gradient scaler, which users of other projects found wrong on MPS."""
    device = device_kind(accelerator)
    if device == "cuda":
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if device == "cpu" and cpu_has_fast_bf16() and d_model >= BF16_MIN_D_MODEL:
        return "bf16-mixed"
    return "32-true"


def emulated_bf16_warning(precision: str, accelerator: str) -> str | None:
    """A line for a run asked to train in bf16 on a CPU that has no native bf16 (no AMX or
    AVX512-BF16): there every bf16 matmul is emulated, tens of times slower than fp32."""
    if not on_cpu(accelerator) or not precision.startswith("bf16") or cpu_has_fast_bf16():
        return None
    return (
        f"trainer.precision={precision} on a CPU without native bf16 (no AMX or AVX512-BF16): its matmuls "
        "are emulated, far slower than fp32 here; trainer.precision=auto picks 32-true on this machine"
    )


@checked_once
def check_compile(value: Any) -> None:
    if not (value == "auto" or isinstance(value, bool)):
        raise ConfigError(f"compile={value!r} is not one of auto, true, false")


@dataclass(frozen=True)
class StepChoices:
    """How a training step runs on the device `trainer.accelerator` picks (`step_choices`)."""

    cuda: bool
    precision: str  # Lightning's precision: bf16-mixed on a GPU with bf16, see auto_precision
    compile: bool  # torch.compile the model's training forward
    finite_check_every: int  # read the loss on the host every N steps (1: every step): its finiteness, the bar
    cut_on_device: bool  # training windows cut from a copy of the corpus on the device, not on the host


def step_choices(accelerator: str, precision: str, compile: bool | str, d_model: int, log_every: int) -> StepChoices:
    """The standard choices that make a step fastest where it runs. On CUDA: bf16 autocast (flash
    attention follows from it: scaled_dot_product_attention picks its flash kernel for bf16),
    fused AdamW (`shakegpt.optim`, wherever the parameters are on cpu or cuda), `torch.compile`
    with `compile=auto`, and no host round-trip per step: the finite-loss check and the progress bar
    read the loss only every `log_every` steps (when Lightning's logging reads it anyway), and the
    training windows are cut on the GPU from start offsets drawn on the host. On a CPU each step
    checks its loss at once (it costs nothing there) and is not compiled (slower on this project's
    2-core CPU), as before."""
    cuda = on_cuda(accelerator)
    check_compile(compile)
    every = max(1, int(log_every)) if cuda else 1
    return StepChoices(
        cuda=cuda,
        precision=resolve_precision(precision, accelerator, d_model),
        compile=cuda if compile == "auto" else bool(compile),
        finite_check_every=every,
        cut_on_device=cuda,
    )
