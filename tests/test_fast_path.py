"""The CPU fast path: precision choice, byte-mask dropout, the same results as fp32, the benchmark."""

import json
import logging

import pytest
import torch

from shakegpt import hardware
from shakegpt.commands import bench
from shakegpt.fast_cpu import ByteDropout
from shakegpt.run.train import train

from .conftest import TINY


def test_fp16_on_a_cpu_is_named_as_the_bf16_it_runs():
    assert hardware.resolve_precision("16-mixed", "cpu", 128) == "bf16-mixed"
    assert hardware.resolve_precision("32-true", "cpu", 128) == "32-true"


@pytest.mark.parametrize(
    ("flags", "accelerator", "d_model", "expected"),
    [
        ({"avx512_bf16"}, "auto", 384, "bf16-mixed"),
        ({"amx_bf16", "amx_tile"}, "cpu", 128, "bf16-mixed"),
        ({"avx512_bf16"}, "cpu", 32, "32-true"),  # too narrow: bf16 casts cost more than they save
        ({"avx2"}, "cpu", 384, "32-true"),  # no native bf16: emulated bf16 is slower than fp32
    ],
)
def test_auto_precision_on_cpu(monkeypatch, flags, accelerator, d_model, expected):
    monkeypatch.setattr(hardware, "cpu_capabilities", lambda: dict.fromkeys(flags, True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hardware.auto_precision(accelerator, d_model) == expected


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_byte_dropout_rate_scale_and_gradient(p):
    torch.manual_seed(0)
    drop = ByteDropout(p)
    x = torch.ones(400, 1000, requires_grad=True)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert dropped == pytest.approx(round(256 * p) / 256, abs=0.003)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # inverted dropout keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0) and torch.allclose(x.grad[y != 0], y[y != 0])
    assert drop.eval()(x) is x
    torch.manual_seed(1)
    a = ByteDropout(p).train()(x)
    torch.manual_seed(1)
    assert torch.equal(a, ByteDropout(p).train()(x))  # reproducible from the seed
    assert ByteDropout(p).train()(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_bench_runs_and_writes_json(tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    # the peaks at one small size: their real sizes cost seconds here and are tested on their own below
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    monkeypatch.setattr(
        bench, "measure_peaks", lambda native: {k: bench.matmul_peak(d, sizes=(128,)) for k, d in dtypes.items()}
    )
    result = bench.main(
        [
            "--presets",
            "v1",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--per-naive",
            "2",
            "--out",
            str(out),
            "--data",
            str(TINY),
            "--gen-chars",
            "20",
            "data.batch_size=2",
            "data.seq_len=16",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["results"][0]["preset"] == "v1" == result["results"][0]["preset"]
    r = saved["results"][0]
    assert set(r["step_s"]) == {"naive", "fast", "bare", "muon"} and all(v > 0 for v in r["step_s"].values())
    assert [len(v) for v in r["raw_step_s"].values()] == [2, 4, 4, 4]  # naive, fast, bare, muon
    assert r["muon_vs_adamw"] == r["step_s"]["muon"] / r["step_s"]["bare"]
    assert saved["peak_flops"]["bf16"] > 0 and r["val_pass_s"] > 0
    g = saved["generation"]
    assert g["num_chars"] == 20 and g["full_s"] > 0 and g["cached_s"] > 0
    printed = capsys.readouterr().out
    assert "fast/naive" in printed and "Muon/AdamW" in printed and "KV cache" in printed


@pytest.mark.parametrize(("native", "largest"), [(True, 3072), (False, 256)])
def test_an_emulated_bf16_peak_is_measured_at_one_small_size(monkeypatch, native, largest):
    """Without native bf16 the full-size bf16 peak takes minutes (on a 2-core AVX2 EPYC it made this
    file's bench test take 734 s; the bench then measured 1.3 GFLOP/s bf16 against 155 fp32), so the
    bench measures that peak small; fp32's is measured in full."""
    asked = []
    monkeypatch.setattr(
        bench, "matmul_peak", lambda dtype, sizes=(1024, 2048, 3072): asked.append((dtype, sizes)) or 1.0
    )
    bench.measure_peaks(native)
    assert [(dtype, max(sizes)) for dtype, sizes in asked] == [(torch.float32, 3072), (torch.bfloat16, largest)]


@pytest.mark.parametrize(
    ("peak", "mfu"), [({"fp32": 4e9, "bf16": 8e9}, "12.5%"), ({"fp32": 4e9, "bf16": 1e8}, "25.0%")]
)
def test_the_table_takes_mfu_against_the_faster_peak(peak, mfu):
    """bf16's peak where the CPU runs bf16 natively (faster than fp32), fp32's where bf16 is emulated."""
    step = {"naive": 2.0, "fast": 1.0, "bare": 1.0, "muon": 1.0}
    row = {"preset": "v1", "step_s": step, "flops_per_step": 1e9, "speedup_fast_vs_naive": 2.0}
    row |= {"lightning_overhead": 0.0, "muon_vs_adamw": 1.0, "tokens_per_s": {"fast": 1000.0}, "val_pass_s": 1.0}
    cells = bench.table([row], peak).splitlines()[-1].split()
    assert cells[8] == mfu  # MFU fast: 1e9 FLOP in 1 s against 8e9 (bf16) or 4e9 (fp32) per second


@pytest.mark.parametrize(("flags", "warned"), [({"avx2"}, True), ({"avx512_bf16"}, False)])
def test_bf16_asked_for_on_a_cpu_without_it_is_warned(monkeypatch, make_cfg, caplog, flags, warned):
    monkeypatch.setattr(hardware, "cpu_capabilities", lambda: dict.fromkeys(flags, True))
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.max_steps=1", "trainer.val_check_interval=1")
    with caplog.at_level(logging.WARNING, logger="shakegpt.run.train"):
        train(cfg)
    said = "warning: trainer.precision=bf16-mixed on a CPU without native bf16 (no AMX or AVX512-BF16)"
    assert (said in caplog.text) == warned, caplog.text
    assert ("trainer.precision=auto picks 32-true on this machine" in caplog.text) == warned


def test_the_emulated_bf16_warning_comes_from_rank_zero_only(monkeypatch, make_cfg, caplog):
    """In a DDP run each process trains: only the first says it (measured: `python train.py
    experiment=smoke trainer.devices=2 trainer.precision=bf16-mixed` printed it twice before)."""
    from lightning.pytorch.utilities import rank_zero_only

    monkeypatch.setattr(hardware, "cpu_capabilities", lambda: dict.fromkeys({"avx2"}, True))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    cfg = make_cfg("trainer.precision=bf16-mixed", "trainer.max_steps=1", "trainer.val_check_interval=1")
    with caplog.at_level(logging.WARNING, logger="shakegpt.run.train"):
        train(cfg)
    assert "without native bf16" not in caplog.text


@pytest.mark.parametrize(
    ("accelerator", "cuda", "precision", "warned"),
    [
        ("cpu", False, "bf16-mixed", True),
        ("auto", False, "bf16-true", True),
        ("cpu", False, "32-true", False),
        ("gpu", True, "bf16-mixed", False),  # a GPU's bf16 is native
        ("auto", True, "bf16-mixed", False),
    ],
)
def test_only_bf16_on_a_cpu_that_emulates_it_is_warned(monkeypatch, accelerator, cuda, precision, warned):
    monkeypatch.setattr(hardware, "cpu_capabilities", lambda: dict.fromkeys({"avx2"}, True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert (hardware.emulated_bf16_warning(precision, accelerator) is not None) == warned


def test_bench_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--presets", "v9"])
    assert "unknown preset 'v9'" in capsys.readouterr().err


@pytest.mark.slow
def test_fast_path_ends_within_0_03_of_fp32(make_cfg, real_corpus):
    """Same seed, 300 steps of a dropout-0.1 quickstart model on the real corpus: the fast path
    (auto precision: bf16 where the CPU runs it natively, else fp32; byte-mask dropout) against plain fp32 with nn.Dropout."""
    common = [
        f"data.path={real_corpus}",
        "data.batch_size=12",
        "data.seq_len=64",
        "model.dropout=0.1",
        "trainer.max_steps=300",
        "trainer.val_check_interval=300",
        "~callbacks.checkpoint",
        "trainer.enable_checkpointing=false",
        "optim.lr=3e-3",
    ]
    fast = train(make_cfg(*common, "trainer.precision=auto"))
    slow = train(make_cfg(*common, "trainer.precision=32-true", "+model.fast_dropout=false"))
    print(f"val loss after 300 steps: fast path {fast['val/loss']:.4f}, fp32 {slow['val/loss']:.4f}")
    assert slow["val/loss"] < 2.6  # both actually learned
    assert abs(fast["val/loss"] - slow["val/loss"]) < 0.03, (fast["val/loss"], slow["val/loss"])
