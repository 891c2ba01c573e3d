"""optim=adamw|muon: one optimizer as Lightning sees it, its groups, its state, its resume."""

import copy
import math

import pytest
import torch

from shakegpt import hardware
from shakegpt.errors import ConfigError
from shakegpt.model import GPT, GPTConfig
from shakegpt.optim import Muon, MuonWithAdamW, build_optimizer, check_optim, orthogonalize
from shakegpt.run.records import read_scalars
from shakegpt.run.train import train

from .conftest import PRESETS, SHAKESPEARE_VOCAB, compose_cfg

OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.99], "warmup_steps": 0, "min_lr_ratio": 0.1}


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=20, d_model=32, n_layer=2, n_head=4, max_seq_len=16, bias=True))


def _step(opt: torch.optim.Optimizer, model: GPT, x: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten())
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)  # as Lightning clips
    opt.step()
    return loss.item()


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = _model()
    opt = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.99))
    assert isinstance(opt, MuonWithAdamW) and isinstance(opt, torch.optim.Optimizer)
    names = {id(p): n for n, p in model.named_parameters()}
    muon, decayed, plain = ([names[id(p)] for p in g["params"]] for g in opt.param_groups)
    assert sorted(muon) == sorted(
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "ffn.up", "ffn.down")
    )
    assert sorted(decayed) == ["head.weight", "pos.table.weight", "tok_emb.weight"]  # matrices outside the blocks
    assert all(n.endswith("bias") or ".ln" in n or n.startswith("ln_f") for n in plain)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.1, 0.0]
    assert len(muon) + len(decayed) + len(plain) == len(list(model.parameters()))


def test_a_schedule_reaches_both_optimizers():
    opt = build_optimizer(_model(), "muon", 1e-3, 0.1, (0.9, 0.99))
    torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.25)
    assert [g["lr"] for g in opt.muon.param_groups + opt.adamw.param_groups] == [2.5e-4] * 3


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_a_saved_optimizer_continues_bit_for_bit(name):
    model = _model()
    x = torch.randint(0, 20, (4, 16))
    opt = build_optimizer(model, name, 1e-3, 0.1, (0.9, 0.99))
    first = [_step(opt, model, x) for _ in range(3)]
    assert first[-1] < first[0]
    again = copy.deepcopy(model)
    reloaded = build_optimizer(again, name, 1e-3, 0.1, (0.9, 0.99))
    reloaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert _step(opt, model, x) == _step(reloaded, again, x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True))


def test_muon_is_refused_where_torch_lacks_it(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ConfigError, match=r"optim=muon needs torch.optim.Muon, which this torch \(.*\) does not have"):
        check_optim(OPTIM | {"schedule": "cosine", "name": "muon"})


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"name": "sgd"}, "optim.name='sgd' is unknown; choose one of adamw, muon (optim=<name>)"),
        ({"name": "muon", "muon_momentum": 1.0}, "optim.muon_momentum=1.0 is invalid; it must be in [0, 1)"),
        (
            {"lrr": 1},
            "optim.lrr is not a setting of optim=adamw; its settings: optim.lr, optim.weight_decay, "
            "optim.betas, optim.warmup_steps, optim.min_lr_ratio, optim.schedule",
        ),
        (  # Muon's own setting, given to AdamW
            {"muon_momentum": 0.9},
            "optim.muon_momentum is not a setting of optim=adamw; its settings: optim.lr, optim.weight_decay, "
            "optim.betas, optim.warmup_steps, optim.min_lr_ratio, optim.schedule",
        ),
    ],
)
def test_bad_optimizer_settings_are_named(bad, message):
    with pytest.raises(ConfigError) as info:
        check_optim(OPTIM | {"schedule": "cosine"} | bad)
    assert str(info.value) == message


@pytest.mark.parametrize("preset", PRESETS)
def test_muon_composes_with_every_preset(make_cfg, preset):
    cfg = make_cfg(f"model={preset}", "optim=muon", shrink=False)
    assert cfg.optim.name == "muon" and cfg.optim.lr > 0  # the preset's learning rate, Muon's optimizer
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(cfg.model, SHAKESPEARE_VOCAB))
        opt = build_optimizer(model, "muon", cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    assert len(opt.param_groups[0]["params"]) == 4 * cfg.model.n_layer


def test_muon_trains_resumes_and_is_not_resumed_as_adamw(make_cfg, tmp_path):
    """Six steps in one go, or three then three more from the checkpoint: the same losses; an AdamW
    run cannot continue a Muon checkpoint (its state is another optimizer's)."""
    common = ("optim=muon", "model.dropout=0.1", "trainer.val_check_interval=3", "sample.num_chars=0")
    whole = train(make_cfg(*common, "trainer.max_steps=6"))
    first = tmp_path / "first"
    train(compose_cfg(first, *common, "trainer.max_steps=3"))
    second = tmp_path / "second"
    resumed = train(compose_cfg(second, *common, "trainer.max_steps=6", f"ckpt_path={first}"))
    assert math.isfinite(whole["val/loss"]) and resumed["val/loss"] == pytest.approx(whole["val/loss"], abs=1e-6)
    a = [(s, v) for s, v, _ in read_scalars(tmp_path)["train/loss"] if s > 3]
    b = [(s, v) for s, v, _ in read_scalars(second)["train/loss"]]
    assert [s for s, _ in a] == [s for s, _ in b] and [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-6)
    with pytest.raises(ConfigError, match="optim=muon there, adamw here: its optimizer state is another optimizer's"):
        train(compose_cfg(tmp_path / "third", "optim=adamw", "trainer.max_steps=6", f"ckpt_path={first}"))


def _muon_steps(optimizer_class, flags, monkeypatch, shape, adjust_lr_fn, steps=3):
    """A matrix after `steps` Muon steps on fixed gradients, with the CPU's flags set to `flags`."""
    monkeypatch.setattr(hardware, "cpu_capabilities", lambda: dict.fromkeys(flags, True))
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape))
    grads = [torch.randn(*shape) for _ in range(steps)]
    opt = optimizer_class([p], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]["momentum_buffer"]


@pytest.mark.parametrize("adjust_lr_fn", ["match_rms_adamw", "original", None])
@pytest.mark.parametrize("shape", [(48, 96), (96, 48)])
def test_muon_without_native_bf16_runs_newton_schulz_in_fp32_and_agrees_with_torch(monkeypatch, shape, adjust_lr_fn):
    """Where bf16 is emulated, Muon's iteration runs in fp32: the same step as torch's bf16 one up
    to bf16 rounding, the same momentum state; where bf16 is native, torch's step exactly."""
    torch.manual_seed(0)
    start = torch.randn(*shape)  # the matrix _muon_steps starts from
    theirs, their_buf = _muon_steps(torch.optim.Muon, {"avx2"}, monkeypatch, shape, adjust_lr_fn)
    fp32, fp32_buf = _muon_steps(Muon, {"avx2"}, monkeypatch, shape, adjust_lr_fn)
    native, _ = _muon_steps(Muon, {"avx512_bf16"}, monkeypatch, shape, adjust_lr_fn)
    assert torch.equal(native, theirs)  # native bf16: torch's own step
    assert torch.equal(fp32_buf, their_buf)
    moved_theirs, moved_fp32 = (start - theirs).flatten(), (start - fp32).flatten()
    assert not torch.equal(fp32, theirs)  # a different iteration ran
    assert torch.nn.functional.cosine_similarity(moved_theirs, moved_fp32, dim=0) > 0.999
    assert (moved_fp32.norm() / moved_theirs.norm()).item() == pytest.approx(1.0, abs=0.02)


def test_orthogonalize_maps_singular_values_near_one():
    torch.manual_seed(0)
    m = torch.randn(64, 32) @ torch.diag(torch.logspace(-1, 0, 32))  # singular values over a decade
    s = torch.linalg.svdvals(orthogonalize(m, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    assert s.min() > 0.5 and s.max() < 1.5, s  # the quintic iteration's band (Keller Jordan's Muon)
