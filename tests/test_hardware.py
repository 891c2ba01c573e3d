"""`trainer.precision=auto` and the device a run trains on, decided from what torch reports on Linux,
macOS and Windows, on a CPU, a CUDA GPU and an Apple GPU (MPS). Each case mocks torch's answers the
way that machine gives them, and hides /proc/cpuinfo, so nothing Linux-only can decide."""

import platform
from pathlib import Path

import pytest
import torch

from shakegpt import hardware
from shakegpt.fast_cpu import ByteDropout, linear

# what torch.cpu.get_capabilities() answers (abridged) on the CPUs these cases stand for
X86_AVX512_BF16 = {
    "architecture": "x86_64",
    "avx2": True,
    "avx512_f": True,
    "avx512_bf16": True,
    "num_physical_cores": 8,
}
X86_AMX = {"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": True, "amx_tile": True, "num_physical_cores": 32}
X86_AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_bf16": False, "num_physical_cores": 4}
APPLE_M = {"architecture": "aarch64", "neon": True, "bf16": True, "num_physical_cores": 10}  # ARM's bf16 flag


@pytest.fixture
def machine(monkeypatch):
    """Make torch answer as a given machine: its CPU's capabilities, CUDA (and its bf16), MPS."""
    real_read_text = Path.read_text

    def no_proc(path, *args, **kwargs):
        assert not str(path).startswith("/proc"), f"{path} read: precision must come from torch"
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", no_proc)

    def be(caps: dict, cuda: bool = False, cuda_bf16: bool = False, mps: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
        hardware.cpu_capabilities.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    yield be
    hardware.cpu_capabilities.cache_clear()


@pytest.mark.parametrize(
    ("system", "machine_says", "accelerator", "device", "precision"),
    [
        # Linux
        ("linux", dict(caps=X86_AVX512_BF16), "auto", "cpu", "bf16-mixed"),
        ("linux", dict(caps=X86_AMX), "cpu", "cpu", "bf16-mixed"),
        ("linux", dict(caps=X86_AVX2), "auto", "cpu", "32-true"),  # bf16 emulated: slower than fp32
        ("linux", dict(caps=X86_AVX2, cuda=True, cuda_bf16=True), "auto", "cuda", "bf16-mixed"),
        ("linux", dict(caps=X86_AVX2, cuda=True, cuda_bf16=False), "gpu", "cuda", "16-mixed"),  # e.g. a T4
        ("linux", dict(caps=X86_AVX512_BF16, cuda=True, cuda_bf16=True), "cpu", "cpu", "bf16-mixed"),
        # macOS: Apple silicon (its CPU's ARM bf16 flag is no reason for bf16 autocast), an Intel Mac
        ("darwin", dict(caps=APPLE_M, mps=True), "auto", "mps", "32-true"),
        ("darwin", dict(caps=APPLE_M, mps=True), "gpu", "mps", "32-true"),
        ("darwin", dict(caps=APPLE_M, mps=True), "mps", "mps", "32-true"),
        ("darwin", dict(caps=APPLE_M, mps=True), "cpu", "cpu", "32-true"),
        ("darwin", dict(caps=X86_AVX2), "auto", "cpu", "32-true"),
        # Windows
        ("windows", dict(caps=X86_AVX512_BF16), "auto", "cpu", "bf16-mixed"),
        ("windows", dict(caps=X86_AVX2), "cpu", "cpu", "32-true"),
        ("windows", dict(caps=X86_AVX2, cuda=True, cuda_bf16=True), "auto", "cuda", "bf16-mixed"),
    ],
)
def test_auto_precision_follows_what_torch_reports(
    monkeypatch, machine, system, machine_says, accelerator, device, precision
):
    monkeypatch.setattr(
        platform, "system", lambda: {"linux": "Linux", "darwin": "Darwin", "windows": "Windows"}[system]
    )
    machine(**machine_says)
    assert hardware.device_kind(accelerator) == device
    assert hardware.auto_precision(accelerator, d_model=384) == precision
    assert hardware.resolve_precision("auto", accelerator, 384) == precision


def test_a_narrow_model_stays_in_fp32_even_with_native_bf16(machine):
    machine(caps=X86_AVX512_BF16)
    assert hardware.auto_precision("cpu", d_model=hardware.BF16_MIN_D_MODEL - 1) == "32-true"
    assert hardware.auto_precision("cpu", d_model=hardware.BF16_MIN_D_MODEL) == "bf16-mixed"


def test_threads_follow_the_physical_cores_torch_counts(machine):
    machine(caps=X86_AMX)
    assert hardware.physical_cores() == 32
    machine(caps={"architecture": "x86_64"})  # torch without a core count: the OS's count
    assert hardware.physical_cores() >= 1


def test_older_torch_answers_the_bf16_questions(monkeypatch):
    """torch releases before `torch.cpu.get_capabilities` still say whether AVX512-BF16 and AMX are there."""
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    hardware.cpu_capabilities.cache_clear()
    try:
        assert hardware.cpu_has_fast_bf16()
    finally:
        hardware.cpu_capabilities.cache_clear()


def test_on_a_gpu_the_emulated_bf16_warning_is_not_given(machine):
    machine(caps=X86_AVX2, mps=True)
    assert hardware.emulated_bf16_warning("bf16-mixed", "auto") is None  # trains on the Apple GPU
    assert hardware.emulated_bf16_warning("bf16-mixed", "cpu") is not None


def test_the_cpu_speed_devices_leave_other_devices_to_torch(monkeypatch):
    """Byte-mask dropout and the one-row matmul split act on CPU tensors only; on any other device
    (here the meta device, which has no data) they hand the call to torch's own."""
    x = torch.ones(4, 64, device="meta")
    drop = ByteDropout(0.1).train()
    assert drop(x).device.type == "meta"
    w = torch.ones(64, 64, device="meta")
    with torch.no_grad():
        assert linear(x[:1], w).shape == (1, 64)
    calls = []
    original = torch.Tensor.random_

    def counted(self, *a, **k):
        calls.append(self.device.type)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "random_", counted)
    drop(x)
    drop(torch.ones(4, 64))
    assert calls == ["cpu"]  # the byte mask was drawn for the CPU tensor only
