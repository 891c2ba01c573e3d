"""Loading checkpoints safely: a run directory means its best checkpoint, bad files are refused, exported bundles load without Lightning."""

import pickle
import subprocess
import sys

import pytest
import torch

from shakegpt.errors import CheckpointError
from shakegpt.training.checkpoint import (
    export_bundle,
    load_bundle,
    model_from_checkpoint,
    read_checkpoint,
    resolve_checkpoint,
)

from ..conftest import ROOT


def test_run_directory_resolves_to_its_best_checkpoint(trained_run, tmp_path):
    out, _, _ = trained_run
    best = resolve_checkpoint(out)
    assert best.name.startswith("best-step") and best.parent == out / "checkpoints"
    assert resolve_checkpoint(out / "checkpoints" / "last.ckpt").name == "last.ckpt"
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="without best-\\*.ckpt or last.ckpt"):
        resolve_checkpoint(tmp_path)


def test_truncated_and_garbage_checkpoints_are_refused(trained_run, tmp_path):
    out, _, _ = trained_run
    data = (out / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    for name in ("half.ckpt", "junk.ckpt"):
        with pytest.raises(CheckpointError, match=f"{name} is not a readable checkpoint") as e:
            read_checkpoint(tmp_path / name)
        assert str(e.value).endswith("it is not a file torch.save wrote, or it was cut short")


class _Payload:  # unpickling this would run code (create a file)
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"model": {}, "vocab": "ab"}, "x": _Payload(marker)},
        evil,
        pickle_protocol=pickle.DEFAULT_PROTOCOL,
    )
    with pytest.raises(CheckpointError, match="not a readable checkpoint: it holds objects that would need code") as e:
        read_checkpoint(evil)
    assert not marker.exists()
    assert "weights_only" not in str(e.value)  # torch's advice to load it unsafely is not passed on


def test_weights_that_do_not_fit_their_config_are_refused(trained_run, tmp_path):
    out, _, _ = trained_run
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["hyper_parameters"]["model"]["n_layer"] = 5
    torch.save(ckpt, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="the weights do not fit the model config .*n_layer=5"):
        model_from_checkpoint(tmp_path / "other.ckpt")


def test_bundle_loads_without_lightning_or_hydra_and_matches(trained_run, tmp_path):
    out, _, _ = trained_run
    bundle = export_bundle(out, tmp_path / "bundle")
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    model, tok, _ = model_from_checkpoint(out)
    again, tok2 = load_bundle(bundle)
    x = tok.encode("First Keeper:\n")[None]
    assert tok2.chars == tok.chars and torch.equal(model(x), again(x))
    code = (
        "import sys; from shakegpt.training.checkpoint import load_bundle; "
        f"m, t = load_bundle({str(bundle)!r}); "
        "assert not any(k.split('.')[0] in ('lightning', 'hydra', 'pytorch_lightning') for k in sys.modules), "
        "sorted(k for k in sys.modules if 'lightning' in k or 'hydra' in k)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    (bundle / "config.json").unlink()
    with pytest.raises(CheckpointError, match="lacks config.json"):
        load_bundle(bundle)
