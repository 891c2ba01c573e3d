"""`python train.py model=v3 trainer.devices=2` as two CPU processes over gloo, then a resume."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shakegpt.training.module import LitGPT

from ..conftest import ROOT, TINY, start_training, wait_for_log
from ..tb import load_run, scalars

pytestmark = pytest.mark.slow

SHRUNK_V3 = [
    "model=v3",
    f"data.path={TINY}",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.val_check_interval=3",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "sample.num_chars=20",
    "trainer.precision=32-true",  # so the reduced val loss can be checked against fp32 to 1e-5
]


def train_py(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_two_cpu_processes_then_resume(tmp_path):
    first, second = tmp_path / "first", tmp_path / "resumed"
    r = train_py(*SHRUNK_V3, "trainer.devices=2", "trainer.max_steps=6", f"hydra.run.dir={first}")
    assert "MEMBER: 1/2" in r.stderr and "MEMBER: 2/2" in r.stderr  # two ranks joined one group
    assert r.stdout.count("--- sample after 6 steps ---") == 1  # rank 0 alone prints

    # one run directory, one TensorBoard run, checkpoints written once
    events = list(first.glob("events.out.tfevents.*"))
    assert len(events) == 1
    ckpts = sorted(p.name for p in (first / "checkpoints").iterdir())
    assert len(ckpts) == 2 and "last.ckpt" in ckpts
    last = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 6
    assert last["hyper_parameters"]["model"]["d_model"] == 384

    # the reduced val loss is the exact full-pass loss, as one process computes it
    ea = load_run(first)
    logged = scalars(ea, "val/loss")[-1][1]
    module = LitGPT.load_from_checkpoint(first / "checkpoints" / "last.ckpt").eval()
    from shakegpt.training.data import CharDataModule

    dm = CharDataModule(path=str(TINY), batch_size=4, seq_len=32)
    dm.setup("fit")
    ids, n = dm.val_ids.long(), (len(dm.val_ids) - 1) // 32
    x = torch.stack([ids[i * 32 : i * 32 + 32] for i in range(n)])
    y = torch.stack([ids[i * 32 + 1 : i * 32 + 33] for i in range(n)])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(module(x).flatten(0, 1), y.flatten()).item()
    assert logged == pytest.approx(expected, abs=1e-5)

    # resume from last.ckpt: continues at step 6 and stops at the new max_steps
    r = train_py(
        *SHRUNK_V3,
        "trainer.devices=2",
        "trainer.max_steps=9",
        f"ckpt_path={first}/checkpoints/last.ckpt",
        f"hydra.run.dir={second}",
    )
    assert "- step 9/9:" in (second / "train.log").read_text()
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
    steps = [s for s, _ in scalars(load_run(second), "train/loss")]
    assert min(steps) >= 7 and max(steps) == 9, steps  # steps 7..9, after the 6 of the checkpoint


def test_when_one_rank_dies_the_other_exits_soon(tmp_path):
    """kill -9 of rank 1 mid-training: rank 0 must fail within a bounded time, not wait for its peer."""
    out = tmp_path / "run"
    proc = start_training(out, "trainer.devices=2", "trainer.max_steps=100000", "trainer.val_check_interval=5")
    try:
        wait_for_log(out, "- step 5/")  # training under way on both ranks: the first validation
        deadline = time.monotonic() + 60  # ... and its checkpoint written (after the log line)
        while not (out / "checkpoints" / "last.ckpt").is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children, "rank 1 was not found among rank 0's child processes"
        for pid in children:  # Lightning starts rank 1 as a child of rank 0
            os.kill(int(pid), signal.SIGKILL)
        start = time.monotonic()
        _, err = proc.communicate(timeout=120)
        waited = time.monotonic() - start
    finally:
        proc.kill()
    assert proc.returncode != 0
    print(f"rank 0 exited {waited:.1f} s after rank 1 was killed")  # shown with pytest -s
    assert waited < 60, f"rank 0 took {waited:.0f} s to notice"
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: another DDP rank stopped (killed or out of memory?)"), err[-3000:]
    assert "Traceback" not in err
    named = re.search(r"last good checkpoint: (\S+) \(step (\d+)\): resume with ckpt_path=(\S+)$", last)
    assert named and Path(named[1]).parent == out / "checkpoints" and named[3] == str(out), last
    assert torch.load(named[1], weights_only=True)["global_step"] == int(named[2]) >= 5


def test_torchrun_starts_two_ranks_that_share_one_run_directory(tmp_path):
    """`torchrun --nproc_per_node=2 train.py … trainer.devices=2`: Lightning joins the ranks torchrun
    started (it starts none of its own), and every rank uses rank 0's run directory, named as any run
    is, though each process composes its config (and the time in its name) on its own."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(ROOT / "train.py"),
            *SHRUNK_V3,
            "trainer.devices=2",
            "trainer.max_steps=4",
        ],
        cwd=tmp_path,  # outputs/ lands here
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in r.stderr and "GLOBAL_RANK: 1, MEMBER: 2/2" in r.stderr
    (run,) = (tmp_path / "outputs" / "runs").iterdir()  # one directory, not one per rank
    assert {p.name for p in run.iterdir()} >= {".hydra", "train.log", "train_rank_1.log", "checkpoints"}
    assert r.stdout.count("--- sample after 4 steps ---") == 1  # rank 0 alone prints
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
