"""Norms, feed-forwards and optimizers are registries: a new one is one registered entry (and a yaml),
and the model, the optimizer and training take it without an edit. Norm parameters are never decayed nor
given to Muon, whatever their shape."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shakegpt.errors import ConfigError
from shakegpt.mlps import MLPS, MLPSpec
from shakegpt.model import GPT, GPTConfig
from shakegpt.norms import NORMS, NormSpec
from shakegpt.optim import OPTIMIZERS, OptimizerSpec, adamw_groups, build_optimizer
from shakegpt.run.train import train

from .conftest import compose_cfg

TINY_MODEL = {"vocab_size": 12, "d_model": 16, "n_layer": 2, "n_head": 2, "max_seq_len": 8}


class ToyNorm(nn.Module):
    """A gain per channel after scaling by the mean absolute value: made up, for the test only."""

    def __init__(self, d_model: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x / (x.abs().mean(-1, keepdim=True) + 1e-5)


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(NORMS, "toy_norm", NormSpec(lambda cfg: ToyNorm(cfg.d_model), causal=True))
    monkeypatch.setitem(MLPS, "toy_mlp", MLPSpec(lambda h: F.softplus(h[..., ::2]) * h[..., 1::2], halves=2))


def test_a_registered_norm_and_mlp_train_with_no_edit(toys, make_cfg):
    cfg = make_cfg("model.norm=toy_norm", "model.mlp=toy_mlp", "optim=muon", "trainer.max_steps=6")
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
    model = GPT(GPTConfig(**TINY_MODEL, norm="toy_norm", mlp="toy_mlp"))
    assert isinstance(model.blocks[0].ln1, ToyNorm) and model.blocks[0].ffn.up.out_features == 2 * model.cfg.d_ff
    assert model.parameter_roles()["blocks.0.ln1.gain"] == "norm"


def test_an_unregistered_name_is_refused_with_the_registered_ones():
    with pytest.raises(
        ConfigError, match=r"model.norm='nope' is unknown; choose one of layernorm, rmsnorm, seq_layernorm"
    ):
        GPTConfig(**TINY_MODEL, norm="nope")
    with pytest.raises(ConfigError, match=r"model.mlp='nope' is unknown; choose one of gelu, relu2, swiglu"):
        GPTConfig(**TINY_MODEL, mlp="nope")


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm", "seq_layernorm"])
def test_norm_parameters_are_never_decayed_nor_given_to_muon(norm, optimizer):
    model = GPT(GPTConfig(**TINY_MODEL, norm=norm, bias=True))
    roles = model.parameter_roles()
    assert copy.deepcopy(model).parameter_roles() == roles  # a copy's norms are its own modules
    params = dict(model.named_parameters())
    opt = build_optimizer(model, optimizer, 1e-3, 0.1, (0.9, 0.99))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    muon = {id(p) for g in (opt.muon.param_groups if optimizer == "muon" else []) for p in g["params"]}
    assert len(group_of) == len(params)  # every parameter is in exactly one group
    norms = [n for n, r in roles.items() if r == "norm"]
    assert len(norms) == (2 * 2 + 1) * (2 if norm != "rmsnorm" else 1)  # ln1, ln2 per block and ln_f
    for n in norms:
        assert group_of[id(params[n])]["weight_decay"] == 0.0 and id(params[n]) not in muon, n
    for n in ("blocks.0.attn.qkv.weight", "blocks.1.ffn.down.weight"):
        assert roles[n] == "matrix" and group_of[id(params[n])]["weight_decay"] == 0.1
        assert (id(params[n]) in muon) == (optimizer == "muon")
    for n in ("tok_emb.weight", "head.weight"):  # decayed as before, never Muon's
        assert group_of[id(params[n])]["weight_decay"] == 0.1 and id(params[n]) not in muon
    for n in ("blocks.0.attn.qkv.bias",):
        assert group_of[id(params[n])]["weight_decay"] == 0.0 and id(params[n]) not in muon


def _check_toy_sgd(settings):
    if not 0 <= settings["sgd_momentum"] < 1:
        raise ConfigError(f"optim.sgd_momentum={settings['sgd_momentum']!r} is invalid; it must be in [0, 1)")


@pytest.fixture
def toy_optimizer(monkeypatch, tmp_path):
    """SGD with momentum as a new optimizer with a setting of its own: one registered entry and one yaml
    (in a config directory of the test's, as a user's would be: hydra.searchpath)."""

    def build(named, *, lr, weight_decay, betas, fused, sgd_momentum):
        return torch.optim.SGD(adamw_groups(named, weight_decay), lr=lr, momentum=sgd_momentum)

    monkeypatch.setitem(OPTIMIZERS, "toy_sgd", OptimizerSpec(build, {"sgd_momentum": 0.9}, _check_toy_sgd))
    conf = tmp_path / "conf"
    (conf / "optim").mkdir(parents=True)
    (conf / "optim" / "toy_sgd.yaml").write_text("name: toy_sgd\nsgd_momentum: 0.5\n")
    return f"hydra.searchpath=[file://{conf}]"


def test_a_registered_optimizer_with_its_own_setting_trains_and_resumes(toy_optimizer, tmp_path, caplog):
    first = compose_cfg(tmp_path / "a", toy_optimizer, "optim=toy_sgd", "trainer.max_steps=4")
    assert first.optim.sgd_momentum == 0.5  # from its yaml
    train(first)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert [g["momentum"] for g in torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"]] == [
        0.5,
        0.5,
    ]
    # resumed with another value of its setting: the run takes it, and says so
    again = compose_cfg(
        tmp_path / "a",
        toy_optimizer,
        "optim=toy_sgd",
        "optim.sgd_momentum=0.7",
        "trainer.max_steps=6",
        f"ckpt_path={ckpt}",
    )
    with caplog.at_level("INFO", logger="shakegpt"):
        train(again)
    assert "optim.sgd_momentum 0.5 -> 0.7" in caplog.text
    groups = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"]
    assert [g["momentum"] for g in groups] == [0.7, 0.7]
    with pytest.raises(ConfigError, match=r"optim.sgd_momentum=1.5 is invalid; it must be in \[0, 1\)"):
        train(compose_cfg(tmp_path / "b", toy_optimizer, "optim=toy_sgd", "optim.sgd_momentum=1.5"))
    with pytest.raises(
        ConfigError,
        match=r"optim.sgd_momentum is not a setting of optim=muon; its settings: optim.lr, .*, optim.muon_momentum$",
    ):
        train(compose_cfg(tmp_path / "c", "+optim.sgd_momentum=0.5"))  # the quickstart's Muon
