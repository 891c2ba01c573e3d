"""The GPU path. Without a GPU: the CUDA choices are made where CUDA is (mocked), and the training
step they select (the loss checked every N steps, windows cut on the device) trains exactly what the
CPU step trains. With one (`pytest -m gpu`, skipped with a reason elsewhere): a few training steps,
the KV cache against the full forward, and a GPU checkpoint resumed on a CPU and back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tarfile
from dataclasses import replace
from itertools import islice

import pytest
import torch
from omegaconf import OmegaConf

import shakegpt.run.train as train_mod
from shakegpt.corpus import RandomWindows, cut_windows
from shakegpt.errors import ConfigError, DivergedError
from shakegpt.hardware import StepChoices, step_choices
from shakegpt.run.train import train

from .conftest import ROOT

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_on_cuda_the_fast_standard_choices_are_made(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert step_choices("auto", "auto", "auto", d_model=32, log_every=25) == StepChoices(
        cuda=True, precision="bf16-mixed", compile=True, finite_check_every=25, cut_on_device=True
    )
    # the user's word wins: fp32, no compile; and a forced CPU run on a GPU machine stays the CPU path
    assert step_choices("gpu", "32-true", False, 384, 50).compile is False
    assert step_choices("gpu", "32-true", False, 384, 50).precision == "32-true"
    assert step_choices("cpu", "auto", "auto", 384, 50).cuda is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a pre-Ampere GPU
    assert step_choices("auto", "auto", "auto", 384, 50).precision == "16-mixed"


def test_on_a_cpu_each_step_is_checked_and_nothing_is_compiled(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    c = step_choices("auto", "auto", "auto", d_model=384, log_every=50)
    assert (c.cuda, c.compile, c.finite_check_every, c.cut_on_device) == (False, False, 1, False)
    assert step_choices("cpu", "auto", True, 384, 50).compile is True  # asked for: compiled anyway


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_a_bad_compile_value_is_named(make_cfg, value):
    cfg = make_cfg(f"compile={'null' if value is None else value}")
    with pytest.raises(ConfigError, match=r"compile=.* is not one of auto, true, false"):
        train(cfg)


def test_windows_cut_on_the_device_are_the_host_windows():
    ids = torch.randint(0, 60, (500,), dtype=torch.uint8)
    host = RandomWindows(ids, 4, 16, seed=3, rank=1, start=7)
    offsets = RandomWindows(ids, 4, 16, seed=3, rank=1, start=7, starts_only=True)
    for (x, y), starts in islice(zip(host, offsets, strict=False), 3):
        assert starts.shape == (4,)
        cx, cy = cut_windows(ids, starts, 16)
        assert torch.equal(x, cx) and torch.equal(y, cy) and cx.dtype == torch.long


@pytest.mark.parametrize("pos", ["learned", "rope", "alibi", "sinusoidal", "none"])
def test_the_training_forward_compiles_whole(pos):
    """torch.compile traces the training forward as one graph (a break splits it, and each side
    compiles and runs apart): every encoding, with dropout, QK-norm, soft-capping and ReLU²."""
    from shakegpt.model import GPT, GPTConfig

    cfg = GPTConfig(
        vocab_size=66,
        d_model=32,
        n_layer=2,
        n_head=4,
        d_ff=64,
        max_seq_len=16,
        pos_encoding=pos,
        mlp="relu2",
        dropout=0.1,
        attn_dropout=0.1,
        qk_norm=True,
        logit_softcap=30.0,
    )
    explained = torch._dynamo.explain(GPT(cfg))(torch.randint(0, 65, (2, 16)))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]


def gpu_path_on_cpu(monkeypatch, compile: bool = False, every: int = 2) -> list:
    """Make train() take the GPU's step choices on this CPU: windows cut by the datamodule's device
    hook, the loss looked at every `every` steps, the training forward compiled if asked."""
    compiled = []
    real = train_mod.step_choices

    def choices(*args):
        return replace(real(*args), compile=compile, finite_check_every=every, cut_on_device=True)

    monkeypatch.setattr(train_mod, "step_choices", choices)
    if compile:  # record what would be compiled rather than spend a minute compiling it
        monkeypatch.setattr(torch, "compile", lambda m, **k: compiled.append(m) or m)
    return compiled


def test_the_gpu_step_trains_what_the_cpu_step_trains(make_cfg, tmp_path, monkeypatch):
    overrides = ("trainer.precision=32-true", "trainer.max_steps=6", "trainer.val_check_interval=3")
    cpu = train(make_cfg(*overrides))
    compiled = gpu_path_on_cpu(monkeypatch, compile=True, every=4)
    cfg = make_cfg(*overrides)
    cfg.paths.output_dir = str(tmp_path / "gpu-path")
    gpu = train(cfg)
    assert len(compiled) == 1 and compiled[0].__class__.__name__ == "GPT"  # the model, once
    for key in ("val/loss", "train/loss_avg", "val/acc"):
        assert math.isclose(cpu[key], gpu[key], rel_tol=1e-6), (key, cpu[key], gpu[key])
    ckpt = torch.load(next((tmp_path / "gpu-path" / "checkpoints").glob("best-*.ckpt")), weights_only=True)
    assert all(k.startswith("model.") and "_orig_mod" not in k for k in ckpt["state_dict"])  # one copy, plain names


def test_a_deferred_finite_check_stops_before_any_checkpoint_holds_bad_weights(make_cfg, tmp_path, monkeypatch):
    gpu_path_on_cpu(monkeypatch, every=3)
    cfg = make_cfg(
        "optim.lr=1e6",
        "optim.warmup_steps=0",
        "trainer.gradient_clip_val=null",
        "trainer.max_steps=8",
        "trainer.val_check_interval=4",
    )
    with pytest.raises(
        DivergedError, match=r"the training loss was not finite at a step between 0 and 2: training stopped"
    ):
        train(cfg)
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt") if (tmp_path / "checkpoints").is_dir() else []:
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values()), ckpt.name
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()


# --- on a GPU ---------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_gpu_trains_a_few_steps_with_its_choices(make_cfg, tmp_path):
    cfg = make_cfg(
        "trainer.accelerator=gpu",
        "trainer.devices=1",
        "trainer.max_steps=20",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=5",
        "model=v1",
    )
    metrics = train(cfg)
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] < math.log(66)
    log = (tmp_path / "train.log").read_text()
    assert "on CUDA: torch.compile on, the loss read every 5 steps, training windows cut on the GPU" in log
    assert "1 x cuda" in log


@pytest.mark.gpu
@needs_gpu
@torch.no_grad()
def test_gpu_kv_cache_equals_the_full_forward():
    from shakegpt.model import GPT, GPTConfig, KVCache
    from shakegpt.pos_encoding import POS_ENCODINGS

    for pos in POS_ENCODINGS:
        torch.manual_seed(0)
        cfg = GPTConfig(vocab_size=66, d_model=128, n_layer=2, n_head=4, d_ff=256, max_seq_len=64, pos_encoding=pos)
        model = GPT(cfg).cuda().eval()
        x = torch.randint(0, 65, (2, 40), device="cuda")
        full = model(x)
        cache = KVCache(2, 64)
        parts = [model(x[:, :17], 0, cache)] + [model(x[:, t : t + 1], t, cache) for t in range(17, 40)]
        assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4), pos


@pytest.mark.gpu
@needs_gpu
def test_a_gpu_checkpoint_resumes_on_a_cpu_and_back(make_cfg, tmp_path):
    from shakegpt.training.checkpoint import model_from_checkpoint

    def run(steps: int, where: str, resume: bool):
        cfg = make_cfg(
            f"trainer.accelerator={where}",
            f"trainer.max_steps={steps}",
            "trainer.val_check_interval=2",
            "trainer.precision=32-true",
            *([f"ckpt_path={tmp_path}"] if resume else []),
        )
        return train(cfg)

    run(4, "gpu", resume=False)
    model, _, _ = model_from_checkpoint(tmp_path)  # read on the host
    assert next(model.parameters()).device.type == "cpu"
    run(6, "cpu", resume=True)
    run(8, "gpu", resume=True)
    model, _, ckpt = model_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 8 and all(torch.isfinite(p).all() for p in model.parameters())


# --- the GPU check, dry ------------------------------------------------------------------------


@pytest.mark.slow
def test_the_gpu_check_runs_dry_on_a_cpu_into_an_archive_that_keep_accepts(tmp_path):
    from shakegpt.commands.results import main as results_main

    out = tmp_path / "check"
    cmd = [
        sys.executable,
        "-m",
        "shakegpt.bench",  # the path docs gave before the layers: it still runs the check
        "--gpu-check",
        "--dry-run",
        "--out",
        str(out),
        "--minutes",
        "4",
    ]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    archive = out / "gpu-check.tar.gz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert {"env.json", "summary.json", "bench-gpu.json", "pytest-gpu.txt", "progress.txt"} <= names
    assert not any("/checkpoints" in n for n in names)  # the small results only
    summary = json.loads((out / "summary.json").read_text())
    for run in ("v2-original", "v3-original", "v2-seqnorm", "v3-seqnorm"):
        assert summary["runs"][run]["returncode"] == 0 and summary["runs"][run]["steps"] == 4, summary["runs"]
    bench = summary["bench"]
    for preset in ("v1", "v2", "v3", "nanogpt"):
        for kind in ("eager", "compiled"):
            row = bench["presets"][preset][kind]
            # a dry run's MFU compares a tiny step with small matmuls on a shared CPU, so it can pass 1;
            # the bound still catches a unit slip (seconds for milliseconds is a factor of 1000)
            assert row["ms_per_step"] > 0 and 0 < row["mfu"] < 5, (preset, kind, row)
    assert bench["lightning_auto_v3_ms_per_step"] > 0 and bench["lightning_ddp_v3_ms_per_step"] > 0
    assert "skipped" in (out / "pytest-gpu.txt").read_text()  # no GPU here: each GPU test says why it did not run

    from shakegpt.commands.gpu_check import run_check

    with pytest.raises(SystemExit, match="holds an earlier check"):  # a second check in the same folder
        run_check(out, dry_run=True)

    root = tmp_path / "reference"
    overrides = OmegaConf.load(out / "runs" / "v3-original" / ".hydra" / "overrides.yaml")
    command = "python train.py " + " ".join(overrides)
    results_main(
        ["keep", str(archive), "--member", "v3-original", "--name", "v3-gpu", "--command", command, "--root", str(root)]
    )
    kept = json.loads((root / "v3-gpu" / "metrics.json").read_text())
    assert kept["steps"] == 4 and kept["command"] == command and (root / "v3-gpu" / "sample.txt").is_file()
    with pytest.raises(SystemExit, match="is an archive: name the run to keep with --member, one of v2-original"):
        results_main(["keep", str(archive), "--name", "x", "--command", "c", "--root", str(root)])
    with pytest.raises(
        SystemExit,
        match="--member=v4-original is not a run of .*; its runs: v2-original, v2-seqnorm, v3-original, v3-seqnorm",
    ):
        results_main(
            ["keep", str(archive), "--member", "v4-original", "--name", "x", "--command", "c", "--root", str(root)]
        )
