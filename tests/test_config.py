"""The real Hydra configs: presets set their seed rows, overrides work, every preset x encoding trains."""

import math

import pytest
import torch

from shakegpt.errors import ConfigError, DataError
from shakegpt.model import GPT, GPTConfig
from shakegpt.pos_encoding import POS_ENCODINGS
from shakegpt.train import train

from .conftest import PRESETS

# every column of the seed table that a preset must set on its own
SEED_TABLE = {
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


@pytest.mark.parametrize("name", sorted(SEED_TABLE))
def test_preset_alone_sets_its_seed_row(make_cfg, name):
    row, cfg = SEED_TABLE[name], make_cfg(f"model={name}", shrink=False)
    m = cfg.model
    got = dict(
        d_model=m.d_model,
        vocab=m.vocab_size,
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


@pytest.mark.parametrize("pos", POS_ENCODINGS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_and_encoding_trains(make_cfg, preset, pos):
    cfg = make_cfg(
        f"model={preset}",
        f"model/pos_encoding={pos}",
        "~callbacks.checkpoint",
        "trainer.enable_checkpointing=false",
        "optim.lr=1e-3",
    )
    metrics = train(cfg)
    assert metrics["val/loss_best"] <= metrics["val/loss"]
    assert all(math.isfinite(metrics[k]) for k in ("train/loss", "val/loss", "val/acc"))

    # and its model overfits one batch
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(dict(cfg.model)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 65, (2, 32))
    y = torch.roll(x, -1, dims=1)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses  # measured: 0.6 (v1, dropout 0.1) to 0.01 (quickstart)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (["model.n_head=5"], ConfigError, "model.d_model=128 is not divisible by model.n_head=5"),
        (["model.pos_encoding=rotary"], ConfigError, "model.pos_encoding='rotary' is unknown"),
        (["optim.lr=0"], ConfigError, "optim.lr=0 is invalid"),
        (["data.batch_size=0"], ConfigError, "data.batch_size=0 is invalid"),
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
    with pytest.raises(DataError, match="could not download tinyshakespeare"):
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
