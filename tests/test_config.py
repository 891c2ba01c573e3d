"""The real Hydra configs: presets set their original runs' values, overrides work, every preset x encoding trains."""

import math
import re

import pytest
import torch

from shakegpt.errors import CheckpointError, ConfigError, DataError
from shakegpt.model import GPT, GPTConfig
from shakegpt.pos_encoding import POS_ENCODINGS
from shakegpt.run.train import train

from .conftest import PRESETS, SHAKESPEARE_VOCAB

# every column of the original runs' table that a preset must set on its own
ORIGINAL_TABLE = {
    "v1": dict(
        d_model=32,
        vocab=66,
        layers=12,
        heads=8,
        d_ff=64,
        dropout=0.1,
        batch=32,
        seq=200,
        lr=3e-5,
        iters=253_104,
        pos="sinusoidal",
    ),
    "v2": dict(
        d_model=384,
        vocab=66,
        layers=6,
        heads=6,
        d_ff=768,
        dropout=0.2,
        batch=64,
        seq=256,
        lr=3e-5,
        iters=7_270,
        pos="sinusoidal",
    ),
    "v3": dict(
        d_model=384,
        vocab=66,
        layers=6,
        heads=6,
        d_ff=768,
        dropout=0.2,
        batch=64,
        seq=256,
        lr=3e-5,
        iters=7_657,
        pos="learned",
    ),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_TABLE))
def test_preset_alone_sets_its_original_run(make_cfg, name):
    row, cfg = ORIGINAL_TABLE[name], make_cfg(f"model={name}", shrink=False)
    m = cfg.model
    got = dict(
        d_model=m.d_model,
        vocab=GPTConfig.from_dict(m, SHAKESPEARE_VOCAB).vocab_size,
        layers=m.n_layer,
        heads=m.n_head,
        d_ff=m.d_ff,
        dropout=m.dropout,
        batch=cfg.data.batch_size,
        seq=cfg.data.seq_len,
        lr=cfg.optim.lr,
        iters=cfg.trainer.max_steps,
        pos=m.pos_encoding,
    )
    assert got == row
    assert m.max_seq_len == row["seq"]


def test_nanogpt_preset_is_its_recipe(make_cfg):
    cfg = make_cfg("model=nanogpt", shrink=False)
    assert (cfg.model.d_model, cfg.model.n_layer, cfg.model.n_head, cfg.model.d_ff) == (384, 6, 6, 1536)
    assert cfg.model.tie_weights and not cfg.model.bias and cfg.model.pos_encoding == "learned"
    assert (cfg.data.batch_size, cfg.data.seq_len, cfg.trainer.max_steps) == (64, 256, 5000)
    assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.warmup_steps, list(cfg.optim.betas)) == (
        1e-3,
        0.1,
        100,
        [0.9, 0.99],
    )


# the improved recipes of README "Results": (overrides, exact parameters, the most their target allows)
EXPERIMENTS = [
    (("model=v1", "experiment=v1_fast"), 103_328, 103_328),  # exactly v1's network
    (("model=v3", "experiment=v3_fast"), 7_133_568, 7_231_872),  # v2's exact size, within v3's
    (("model=nanogpt", "experiment=nanogpt_fast"), 10_647_168, 11_000_000),  # the 2.5-hour target: <= 11 M
    (("model=nanogpt", "experiment=nanogpt_ema"), 10_647_168, 11_000_000),  # and its weight average
    (("model=nanogpt", "experiment=nanogpt_speedrun"), 10_647_168, 11_000_000),  # and Muon, ReLU², QK-norm
]


@pytest.mark.parametrize(("overrides", "params", "limit"), EXPERIMENTS, ids=lambda v: str(v))
def test_improved_recipes_keep_their_size_and_train(make_cfg, overrides, params, limit):
    full = make_cfg(*overrides, shrink=False)
    with torch.device("meta"):  # counted, not allocated
        n = sum(p.numel() for p in GPT(GPTConfig.from_dict(full.model, SHAKESPEARE_VOCAB)).parameters())
    assert n <= limit, f"{n:,} parameters, more than the {limit:,} the recipe's target allows"
    assert n == params
    assert full.model.pos_encoding == "rope" and full.optim.schedule == "cosine"
    if "max_time" in full.trainer:  # a hard stop inside the 2.5-hour budget
        d, h, m, s = (int(x) for x in full.trainer.max_time.split(":"))
        assert 0 < ((d * 24 + h) * 60 + m) * 60 + s <= 2.5 * 3600
    # and the recipe runs (shrunk to seconds on the tiny corpus; at its own width in the slow suite)
    metrics = train(make_cfg(*overrides, *TINY_WIDTH, "~callbacks.checkpoint", "trainer.enable_checkpointing=false"))
    assert math.isfinite(metrics["val/loss_best"])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [e[0] for e in EXPERIMENTS], ids=lambda v: " ".join(v))
def test_improved_recipes_train_at_their_own_width(make_cfg, overrides):
    metrics = train(make_cfg(*overrides, "~callbacks.checkpoint", "trainer.enable_checkpointing=false"))
    assert math.isfinite(metrics["val/loss_best"])


def test_command_line_overrides_win_over_presets(make_cfg):
    cfg = make_cfg(
        "model=v3",
        "model/pos_encoding=rope",
        "model.n_head=4",
        "data.batch_size=8",
        "optim.lr=1e-3",
        "trainer.max_steps=10",
        "data.seq_len=128",
        shrink=False,
    )
    assert cfg.model.pos_encoding == "rope" and cfg.model.n_head == 4 and cfg.model.d_model == 384
    assert cfg.data.batch_size == 8 and cfg.optim.lr == 1e-3 and cfg.trainer.max_steps == 10
    assert cfg.model.max_seq_len == 128  # follows data.seq_len


# a preset's own depth and width cost seconds a case and prove nothing more than a tiny one here
TINY_WIDTH = ("model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.d_ff=64")


def trains_and_overfits(make_cfg, *overrides: str, encodings: tuple[str, ...] = ()) -> None:
    """The config trains through train() to finite metrics, and its model overfits one batch; so does
    the same model with each of `encodings` instead of its own."""
    cfg = make_cfg(*overrides, "~callbacks.checkpoint", "trainer.enable_checkpointing=false", "optim.lr=1e-3")
    metrics = train(cfg)
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "val/acc"))
    for pos in encodings or (cfg.model.pos_encoding,):
        overfits(GPTConfig.from_dict(dict(cfg.model) | {"pos_encoding": pos}, SHAKESPEARE_VOCAB))


def overfits(mcfg: GPTConfig) -> None:
    torch.manual_seed(0)
    model = GPT(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, model.cfg.vocab_size, (2, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], (mcfg.pos_encoding, losses)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_encoding_trains_at_tiny_width(make_cfg, preset):
    """Each preset trains through train() once; its model overfits a batch with every encoding (the
    training path is the same for all of them: a Lightning run each would cost seconds and show nothing more)."""
    trains_and_overfits(make_cfg, f"model={preset}", *TINY_WIDTH, encodings=tuple(POS_ENCODINGS))


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_at_its_own_width(make_cfg, preset):
    trains_and_overfits(make_cfg, f"model={preset}")


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["model.n_head=5"], ConfigError, "model.d_model=128 is not divisible by model.n_head=5"),
        (["model.pos_encoding=rotary"], ConfigError, "model.pos_encoding='rotary' is unknown"),
        (["optim.lr=0"], ConfigError, "optim.lr=0 is invalid"),
        (["optim.lr=-0.001"], ConfigError, "optim.lr=-0.001 is invalid; it must be > 0"),
        (["data.batch_size=0"], ConfigError, "data.batch_size=0 is invalid"),
        (["data.batch_size=-4"], ConfigError, "data.batch_size=-4 is invalid"),
        (["trainer.max_steps=0"], ConfigError, "trainer.max_steps=0 is invalid; it must be a positive integer"),
        (["trainer.max_steps=-1"], ConfigError, "trainer.max_steps=-1 is invalid"),
        (["trainer.devices=4096"], ConfigError, r"trainer.devices=4096 is invalid; this machine has \d+ CPU cores"),
        (["trainer.devices=0"], ConfigError, "trainer.devices=0 is invalid"),
        (["model.max_seq_len=16"], ConfigError, "data.seq_len=32 exceeds model.max_seq_len=16"),
        (["model.vocab_size=10"], ConfigError, "model.vocab_size=10 is smaller than the corpus vocabulary"),
        (["data.seq_len=64", "model.max_seq_len=32"], ConfigError, "data.seq_len=64 exceeds model.max_seq_len=32"),
        (["data.path=/no/such/input.txt"], DataError, "data.path=/no/such/input.txt does not exist"),
    ],
)
def test_bad_values_fail_with_one_clear_error(make_cfg, overrides, error, message):
    with pytest.raises(error, match=message):
        train(make_cfg(*overrides))


def test_offline_with_no_copy_fails_clearly(make_cfg, tmp_path, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    cfg = make_cfg("data.path=null", f"paths.cache_dir={tmp_path / 'cache'}", "+data.url=http://127.0.0.1:9/x.txt")
    with pytest.raises(DataError, match="could not download the corpus from http://127.0.0.1:9/x.txt"):
        train(cfg)


def test_checksum_mismatch_fails_clearly(make_cfg, tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.delenv("SHAKEGPT_DATA", raising=False)
    cfg = make_cfg("data.path=null", f"paths.cache_dir={tmp_path / 'cache'}", f"+data.url={tiny_corpus.as_uri()}")
    with pytest.raises(DataError, match="checksum mismatch"):
        train(cfg)


def test_a_run_shorter_than_the_validation_interval_still_validates(make_cfg):
    metrics = train(
        make_cfg(
            "trainer.max_steps=3",
            "trainer.val_check_interval=250",
            "~callbacks.checkpoint",
            "trainer.enable_checkpointing=false",
        )
    )
    assert math.isfinite(metrics["val/loss_best"])  # what train.py returns to sweepers


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_on_a_machine_without_one(make_cfg):
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu but this machine has no usable GPU"):
        train(make_cfg("trainer.accelerator=gpu"))


def test_resuming_from_another_model_or_vocabulary_is_refused(make_cfg, trained_run, real_corpus):
    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=r"is from a different model \(model.n_layer=2 there, 3 here\)"):
        train(make_cfg("model.n_layer=3", f"ckpt_path={ckpt}"))
    with pytest.raises(ConfigError, match="was trained on a vocabulary of \\d+ characters, this corpus has 65"):
        train(make_cfg(f"data.path={real_corpus}", f"ckpt_path={ckpt}", "trainer.max_steps=10"))


def test_resuming_from_a_truncated_checkpoint_is_refused(make_cfg, trained_run, tmp_path):
    bad = tmp_path / "cut.ckpt"
    whole = (trained_run[0] / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(CheckpointError, match=f"ckpt_path={bad} is not a readable checkpoint"):
        train(make_cfg(f"ckpt_path={bad}"))


def test_attention_dropout_is_a_key_like_the_others(make_cfg, tmp_path):
    """docs/model.md: `model.attn_dropout=0.1` adds dropout on the attention weights (no `+` needed)."""
    metrics = train(make_cfg("model.attn_dropout=0.1", "trainer.max_steps=2", "trainer.val_check_interval=2"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["model"]["attn_dropout"] == 0.1 and math.isfinite(metrics["val/loss"])


ORIGINAL_PARAMS = {"v1": 422_528, "v2": 9_684_480, "v3": 9_782_784}  # the original runs' own formula


@pytest.mark.parametrize("preset", sorted(ORIGINAL_PARAMS))
def test_the_original_norm_gives_the_original_parameter_counts(make_cfg, preset):
    cfg = make_cfg(f"model={preset}", "model/norm=seq_layernorm", shrink=False)
    with torch.device("meta"):  # counted, not allocated
        model = GPT(GPTConfig.from_dict(cfg.model, SHAKESPEARE_VOCAB))
    assert model.num_params() == ORIGINAL_PARAMS[preset]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_recipe_key_composes_with_every_preset(make_cfg, preset):
    """Each norm and each feed-forward composes with every preset (as an override of the preset's
    choice), with the three switches, and the preset's model builds with every encoding (every
    product of encoding, norm and feed-forward builds below; a few combinations train)."""
    switches = ("model.qk_norm=true", "model.logit_softcap=30", "model.zero_init_proj=true")
    norms, mlps = ("layernorm", "rmsnorm", "seq_layernorm"), ("gelu", "relu2", "swiglu")
    for norm, mlp in zip(norms, mlps, strict=True):  # each option once: composing costs a third of a second
        cfg = make_cfg(f"model={preset}", f"model/norm={norm}", f"model/mlp={mlp}", *switches, shrink=False)
        assert cfg.model.norm == norm and cfg.model.mlp == mlp and cfg.model.qk_norm and cfg.model.logit_softcap == 30
        for pos in POS_ENCODINGS:
            with torch.device("meta"):  # built, not allocated
                GPT(GPTConfig.from_dict(dict(cfg.model) | {"pos_encoding": pos}, SHAKESPEARE_VOCAB))


def test_every_encoding_norm_and_feed_forward_build_together_and_run():
    for pos in POS_ENCODINGS:
        for norm in ("layernorm", "rmsnorm", "seq_layernorm"):
            for mlp in ("gelu", "relu2", "swiglu"):
                cfg = GPTConfig(
                    vocab_size=11, d_model=16, n_layer=1, n_head=2, d_ff=32, max_seq_len=8, pos_encoding=pos,
                    norm=norm, mlp=mlp, qk_norm=True, logit_softcap=30.0, zero_init_proj=True,
                )  # fmt: skip
                logits = GPT(cfg)(torch.randint(0, 11, (2, 8)))
                assert logits.shape == (2, 8, 11) and torch.isfinite(logits).all(), (pos, norm, mlp)


@pytest.mark.parametrize(
    "overrides",
    [
        ("model/norm=rmsnorm", "model/mlp=relu2", "model.qk_norm=true", "model.zero_init_proj=true"),
        ("model/norm=seq_layernorm", "model/mlp=swiglu", "model.logit_softcap=15"),
        ("model=v1", "model/norm=seq_layernorm", "data.seq_len=32"),
    ],
    ids=lambda o: " ".join(o),
)
def test_recipe_combinations_train_and_sample(make_cfg, overrides, tmp_path):
    metrics = train(make_cfg(*overrides, "trainer.max_steps=4", "trainer.val_check_interval=2", "sample.num_chars=20"))
    assert math.isfinite(metrics["val/loss"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for o in overrides:  # the checkpoint records every choice
        key, value = o.replace("model/", "model.").split("=")
        if key.startswith("model."):
            assert str(ckpt["hyper_parameters"]["model"][key.removeprefix("model.")]).lower() == value


@pytest.mark.parametrize(
    ("key", "value"),
    # each against the quickstart's own choice (layernorm, relu2, QK-norm on, no soft-cap)
    [("model/norm", "rmsnorm"), ("model/mlp", "gelu"), ("model.qk_norm", "false"), ("model.logit_softcap", "30")],
)
def test_resuming_with_another_norm_or_mlp_is_refused_even_with_the_same_shapes(make_cfg, trained_run, key, value):
    ckpt = trained_run[0] / "checkpoints" / "last.ckpt"
    name = key.replace("model/", "model.")
    with pytest.raises(ConfigError, match=rf"is from a different model \({re.escape(name)}="):
        train(make_cfg(f"{key}={value}", f"ckpt_path={ckpt}", "trainer.max_steps=10"))
