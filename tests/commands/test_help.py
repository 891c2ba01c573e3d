"""Each command's --help says what it does, what can be typed, and gives examples; a missing
required key is one line."""

import importlib

import pytest
from omegaconf import OmegaConf

from ..conftest import ROOT, run_here


def run(*args):
    """`python train.py …` or `python -m <command> …`, run in this process (their command lines
    have a subprocess test each in test_train.py and test_checkpoint.py)."""
    if args[0] == "train.py":
        module, rest = "shakegpt.commands.train", args[1:]
    else:
        module, rest = args[1], args[2:]
    return run_here(importlib.import_module(module).main, *rest)


def test_train_help_lists_groups_and_examples_not_the_config_dump():
    r = run("train.py", "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert out.startswith("Train a character-level GPT on tinyshakespeare")
    assert "model: nanogpt, quickstart, v1, v2, v3" in out
    assert "model/pos_encoding: alibi, learned, none, rope, sinusoidal" in out
    # commands that work where shakegpt is installed, every other command named, no docs/ path (not installed)
    assert "python -m shakegpt model=v3 trainer.devices=2" in out and "docs/" not in out
    assert "python -m shakegpt sample | evaluate | export | results | bench | gpu-check" in out
    assert "_target_" not in out and "powered by Hydra" not in out  # no config dump, no stock text
    steps = OmegaConf.load(ROOT / "conf" / "model" / "quickstart.yaml").trainer.max_steps
    assert f"the quickstart: {steps} steps" in out  # the example states the preset's own length


@pytest.mark.parametrize(
    ("module", "first"), [("shakegpt.commands.sample", "Stream text"), ("shakegpt.commands.evaluate", "Val loss")]
)
def test_sample_and_evaluate_help_cover_their_own_keys(module, first):
    r = run("-m", module, "--help")
    assert r.returncode == 0 and r.stdout.startswith(first), r.stderr[-2000:]
    assert "ckpt_path: ???" in r.stdout and "Examples:" in r.stdout
    assert "model/pos_encoding" not in r.stdout and "hparams_search" not in r.stdout  # training's groups are not theirs


@pytest.mark.parametrize("module", ["shakegpt.commands.sample", "shakegpt.commands.evaluate"])
def test_a_missing_checkpoint_is_one_line(module):
    r = run("-m", module)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("error: ckpt_path is required:")
