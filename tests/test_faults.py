"""Faults: nothing lost when a run dies, and the same seed gives the same run."""

import os
import signal
import subprocess
import time

import pytest
import torch

from shakegpt.callbacks import AtomicCheckpointIO
from shakegpt.results import read_scalars
from shakegpt.train import train

from .conftest import ROOT, compose_cfg, start_training, train_command


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before  # the old checkpoint, whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_same_seed_same_config_same_run(tmp_path):
    runs = []
    for name in ("a", "b"):
        cfg = compose_cfg(tmp_path / name, "model.dropout=0.1", "trainer.max_steps=6", "trainer.val_check_interval=3")
        train(cfg)
        runs.append(read_scalars(tmp_path / name / "tensorboard"))
    for tag in ("train/loss", "val/loss"):
        a, b = ([(step, value) for step, value, _ in r[tag]] for r in runs)
        assert len(a) >= 2 and a == b, tag  # bit for bit, on the CPU


def _args(steps, *extra):
    return (
        "model.dropout=0.1",  # so the resumed run must also restore the random state dropout draws from
        f"trainer.max_steps={steps}",
        "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=1",
        "sample.num_chars=0",
        "callbacks.text_sample.num_chars=5",
        *extra,
    )


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_curve(tmp_path):
    steps = 60
    whole = tmp_path / "whole"
    subprocess.run(train_command(whole, *_args(steps)), cwd=ROOT, check=True, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    last = killed / "checkpoints" / "last.ckpt"
    proc = start_training(killed, *_args(steps))
    try:
        for _ in range(1200):  # kill -9 once a checkpoint past step 8 exists: no handler runs, no save
            if last.is_file() and torch.load(last, weights_only=True)["global_step"] >= 8:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = torch.load(last, weights_only=True)["global_step"]
    assert 8 <= resumed_from < steps, "the run finished before it could be killed"
    assert not (killed / "checkpoints" / "interrupted.ckpt").exists()  # kill -9: nothing ran at exit

    resumed = tmp_path / "resumed"
    subprocess.run(
        train_command(resumed, *_args(steps, f"ckpt_path={last}")),
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=600,
    )
    a, b = read_scalars(whole / "tensorboard"), read_scalars(resumed / "tensorboard")
    after = {tag: [(s, v) for s, v, _ in a[tag] if s >= resumed_from] for tag in ("train/loss", "val/loss")}
    again = {tag: [(s, v) for s, v, _ in b[tag]] for tag in ("train/loss", "val/loss")}
    assert again["train/loss"][0][0] == resumed_from  # the resumed run starts at the checkpoint's step
    for tag in after:
        assert len(after[tag]) >= 2
        assert [s for s, _ in after[tag]] == [s for s, _ in again[tag]], tag
        assert torch.allclose(
            torch.tensor([v for _, v in again[tag]]), torch.tensor([v for _, v in after[tag]]), atol=1e-6
        ), tag


def test_a_new_run_in_a_used_directory_starts_from_scratch(tmp_path):
    """Only ckpt_path resumes: a checkpoint left in the run directory is not picked up silently."""
    train(compose_cfg(tmp_path, "trainer.max_steps=4", "trainer.val_check_interval=4"))
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    train(compose_cfg(tmp_path, "trainer.max_steps=6", "trainer.val_check_interval=6"))
    steps = [s for s, _, _ in read_scalars(tmp_path / "tensorboard")["train/loss"]]
    assert sorted(steps).count(0) == 2 and len([s for s in steps if s < 4]) == 8  # both began at step 0
