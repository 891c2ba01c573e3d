"""Resuming from a run continues in that run's directory (`new_run_dir=true` starts a new one), and a
run directory in use is locked: a second process is refused in one line naming the first, and the
lock of a killed process never blocks the resume."""

import signal
import subprocess
import sys

import pytest
import torch

from shakegpt.commands import train as train_command

from ..conftest import ROOT, SHRINK, run_here, start_training, wait_for_log


def _runs(cwd):
    return sorted(p for p in (cwd / "outputs" / "runs").iterdir() if p.is_dir())


def test_a_resume_from_a_run_directory_continues_there_unless_asked_for_a_new_one(tmp_path):
    r = run_here(train_command.main, *SHRINK, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    (run,) = _runs(tmp_path)
    first_config = (run / ".hydra" / "config.yaml").read_text()
    r = run_here(train_command.main, *SHRINK, "trainer.max_steps=6", f"ckpt_path={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-1500:]
    assert _runs(tmp_path) == [run]  # no second directory
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (run / ".hydra.1" / "config.yaml").read_text() == first_config  # the first part's settings stay
    assert "max_steps: 6" in (run / ".hydra" / "config.yaml").read_text()
    log = (run / "train.log").read_text()
    assert "- step 4/4: " in log and "resuming at step 4" in log and "- step 6/6: " in log  # one log, both parts
    # a checkpoint inside the run's checkpoints/ names the run too; new_run_dir=true asks for a new one
    ckpt = run / "checkpoints" / "last.ckpt"
    r = run_here(
        train_command.main, *SHRINK, "trainer.max_steps=8", f"ckpt_path={ckpt}", "new_run_dir=true", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr[-1500:]
    assert len(_runs(tmp_path)) == 2 and not (run / ".hydra.2").exists()


def _hold_lock(run):
    """A real process holding the run directory's lock as a run does."""
    code = (
        "import sys, time; from pathlib import Path; from shakegpt.run.rundir import lock_run_dir; "
        f"lock_run_dir(Path({str(run)!r})); print('locked', flush=True); time.sleep(120)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    r = run_here(train_command.main, *SHRINK, f"hydra.run.dir={run}")
    assert r.returncode == 0, r.stderr[-1500:]
    holder = _hold_lock(run)
    try:
        r = run_here(train_command.main, *SHRINK, "trainer.max_steps=6", f"ckpt_path={run}")
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            f"error: the run directory {run} is in use by process {holder.pid} on "
            + r.stderr.split(f"process {holder.pid} on ", 1)[1].strip()
        ]
        assert "wait for it to end or stop it" in r.stderr
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4  # untouched
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the lock file is still there, its holder gone: the resume goes ahead
    assert (run / ".lock").read_text().startswith(f"process {holder.pid} on ")
    r = run_here(train_command.main, *SHRINK, "trainer.max_steps=6", f"ckpt_path={run}")
    assert r.returncode == 0, r.stderr[-1500:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.slow
def test_a_second_resume_into_a_training_run_is_refused(tmp_path):
    """Two real runs: the second, resuming into the first's directory while it trains, is refused."""
    run = tmp_path / "run"
    first = start_training(run, "trainer.max_steps=100000", "trainer.val_check_interval=5", "sample.num_chars=0")
    try:
        wait_for_log(run, "- step 5/")
        r = subprocess.run(
            [sys.executable, "train.py", *SHRINK, "trainer.max_steps=100000", f"ckpt_path={run}"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip().splitlines()[-1].startswith(f"error: the run directory {run} is in use by process {first.pid}")
    )
