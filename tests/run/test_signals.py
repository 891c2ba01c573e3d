"""How a run ends when a signal stops it: one line saying what happened, the checkpoint and the
command that resumes it; the shell's exit code for the signal (130 for Ctrl-C, 143 for SIGTERM), so
a scheduler or a `&&` chain never takes a stopped run for a finished one; and nothing left behind by
a run stopped before its first step. The slow tests send real signals to real processes, under a
pipe and under a pseudo-terminal."""

import fcntl
import os
import pty
import select
import shlex
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from shakegpt.commands import train as train_command_module
from shakegpt.errors import RunInterrupted
from shakegpt.run.failures import describe_interruption, stopping_signal
from shakegpt.run.records import read_scalars
from shakegpt.run.rundir import remove_unstarted
from shakegpt.run.signals import Terminated, hand_over_to_lightning, signals_raise

from ..conftest import ROOT, SHRINK, run_here, train_command, wait_for_log


def test_what_lightning_leaves_is_read_as_the_signal():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    assert stopping_signal(SIGTERMException()) == signal.SIGTERM
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning does on Ctrl-C
    except SystemExit as e:
        assert stopping_signal(e) == signal.SIGINT
    assert stopping_signal(SystemExit(1)) is None and stopping_signal(SystemExit(0)) is None
    assert isinstance(Terminated(), KeyboardInterrupt) and Terminated.signum == signal.SIGTERM
    assert RunInterrupted("x", signal.SIGTERM).exit_code == 143 and RunInterrupted("x", signal.SIGINT).exit_code == 130


def test_the_line_names_the_signal_the_step_and_the_checkpoint(trained_run, tmp_path):
    out, _, _ = trained_run
    line = describe_interruption(signal.SIGTERM, out, 6)  # no interrupted.ckpt there: the last good one
    assert line.startswith("SIGTERM (a scheduler's preemption or a kill); training stopped at step 6")
    assert f"resume with ckpt_path={out}" in line
    before = describe_interruption(signal.SIGINT, tmp_path, 0)
    assert before == "Ctrl-C (SIGINT) before the first training step; nothing to keep"


def test_a_run_stopped_before_its_first_step_leaves_only_what_was_there(tmp_path):
    run = tmp_path / "given"  # a directory given with hydra.run.dir, holding a file of the user's
    (run / ".hydra").mkdir(parents=True)
    (run / "train.log").write_text("x")
    (run / "events.out.tfevents.1.host").write_bytes(b"")
    (run / "hparams.yaml").write_text("x")
    (run / "notes.txt").write_text("mine")
    remove_unstarted(run)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]
    (run / "notes.txt").unlink()
    (run / "train.log").write_text("x")
    remove_unstarted(run)
    assert not run.exists()


def test_a_stop_before_any_run_directory_or_after_training_is_one_line(tmp_path, capsys):
    """Ctrl-C while Hydra starts (no run directory claimed yet), and Ctrl-C after training (the final
    sample): one line each, and a trained run's checkpoints stay."""
    from shakegpt.run.signals import stopped_before_training

    with pytest.raises(SystemExit) as info:
        stopped_before_training(KeyboardInterrupt(), None)
    assert info.value.code == 130
    assert capsys.readouterr().err.strip() == "stopped: Ctrl-C (SIGINT) before the first training step; nothing to keep"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(SystemExit) as info:
        stopped_before_training(Terminated(), tmp_path)
    assert info.value.code == 143 and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert capsys.readouterr().err.strip() == (
        f"stopped: SIGTERM (a scheduler's preemption or a kill); the run's checkpoints are in {tmp_path / 'checkpoints'}"
    )


class _SignalsWhileFinalized:
    """An object whose `__del__` sends this process a signal: the handler runs inside `__del__`, where
    Python drops what it raises, as when a signal comes while the garbage collector runs."""

    def __init__(self, sig: int):
        self.sig = sig

    def __del__(self):
        os.kill(os.getpid(), self.sig)
        time.sleep(0.01)  # the handler runs here, before __del__ returns


class _RaisesWhileFinalized:
    def __del__(self):
        raise ValueError("not a signal")


def _printed_when_dropped(monkeypatch) -> list:
    """What Python would print (with a traceback) for the exceptions it drops from here on."""
    printed = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: printed.append(u.exc_type))
    return printed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_python_dropped_before_fit_still_stops_the_run(sig, monkeypatch):
    """The failure CI met: Ctrl-C during a finalizer was lost and the run trained on (and Python
    printed a traceback for it)."""
    printed = _printed_when_dropped(monkeypatch)
    with signals_raise():
        _SignalsWhileFinalized(sig)  # made and finalized at once: what its handler raised is dropped
        with pytest.raises(KeyboardInterrupt) as info:
            hand_over_to_lightning()
        assert getattr(info.value, "signum", signal.SIGINT) == sig
        hand_over_to_lightning()  # raised once: nothing pending any more
        _RaisesWhileFinalized()  # any other exception Python drops is still printed
    assert printed == [ValueError]  # the signal's was noted, so not printed
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's own handler back


class DroppedCtrlC(L.Callback):
    """Ctrl-C sent from a finalizer once step `step` is done (a test's callback, added from the command line)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            _SignalsWhileFinalized(signal.SIGINT)


@pytest.mark.parametrize("last", [False, True], ids=["mid-run", "last-step"])
def test_a_ctrl_c_python_dropped_in_training_stops_the_run(tmp_path, monkeypatch, last):
    """Mid-run: stopped at the next step as a Ctrl-C is. At the last step: no final sample, the
    checkpoints kept, as for a Ctrl-C during that sample."""
    out = tmp_path / "run"
    printed = _printed_when_dropped(monkeypatch)
    drop = ("+callbacks.drop._target_=tests.run.test_signals.DroppedCtrlC", f"+callbacks.drop.step={4 if last else 2}")
    steps = "trainer.max_steps=4" if last else "trainer.max_steps=50"
    r = run_here(train_command_module.main, *SHRINK, steps, *drop, f"hydra.run.dir={out}")
    assert printed == [] and r.returncode == 130, r.stderr[-2000:]
    if last:
        assert (
            r.stderr.strip().splitlines()[-1]
            == f"stopped: Ctrl-C (SIGINT); the run's checkpoints are in {out / 'checkpoints'}"
        )
        assert "--- sample after" not in r.stdout
        assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    else:
        assert "stopped: Ctrl-C (SIGINT) at step 2" in r.stderr, r.stderr[-2000:]
        assert torch.load(out / "checkpoints" / "interrupted.ckpt", weights_only=True)["global_step"] == 2


class SigtermInSetup(L.Callback):
    """SIGTERM while fit sets up, before Lightning's handler is in place (the test's callback)."""

    def setup(self, trainer, pl_module, stage) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_sigterm_before_lightnings_handler_stops_at_the_first_step(tmp_path):
    """Between the hand-over and fit's own handler a SIGTERM killed the process on the spot (exit
    -15, nothing said); it is now passed on to Lightning, which stops after the first step."""
    out = tmp_path / "run"
    r = run_here(
        train_command_module.main,
        *SHRINK,
        "trainer.max_steps=50",
        "+callbacks.term._target_=tests.run.test_signals.SigtermInSetup",
        f"hydra.run.dir={out}",
    )
    assert r.returncode == 143, r.stderr[-2000:]
    assert "stopped: SIGTERM (a scheduler's preemption or a kill) at step 1" in r.stderr, r.stderr[-2000:]
    assert torch.load(out / "checkpoints" / "interrupted.ckpt", weights_only=True)["global_step"] == 1
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # pytest's own handler back


def _start(out: Path, terminal: bool, *args: str):
    """`python train.py …` writing to a pipe, or to a pseudo-terminal as in an interactive shell."""
    cmd = train_command(out, "trainer.max_steps=100000", "trainer.val_check_interval=5", "sample.num_chars=5", *args)
    if not terminal:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), None
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's size: the bar's width
    cmd.append("trainer.enable_progress_bar=true")  # as a user's terminal has it
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=secondary, stdout=secondary, stderr=secondary)
    os.close(secondary)
    return proc, primary


def _finish(proc, primary) -> str:
    """Wait for the process; what it wrote to standard error (a terminal: everything it wrote)."""
    if primary is None:
        return proc.communicate(timeout=120)[1]
    chunks, deadline = [], time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([primary], [], [], 0.5)
        if ready:
            try:
                data = os.read(primary, 65536)
            except OSError:  # the process closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(primary)
    return b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


@pytest.mark.slow
@pytest.mark.parametrize("terminal", [False, True], ids=["pipe", "terminal"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_run_ends_in_one_line_and_its_command_resumes_in_place(tmp_path, sig, terminal):
    out = tmp_path / "run"
    proc, primary = _start(out, terminal)
    try:
        wait_for_log(out, "- step 5/")  # training under way: the first validation's log line
        proc.send_signal(sig)
        err = _finish(proc, primary)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    assert ("\r" in err) == terminal  # a progress bar on a terminal only (a pipe gets plain step lines)
    last = err.strip().splitlines()[-1]
    first = {
        signal.SIGINT: "stopped: Ctrl-C (SIGINT) at step",
        signal.SIGTERM: "stopped: SIGTERM (a scheduler's preemption or a kill) at step",
    }
    assert last.startswith(first[sig]) and "Traceback" not in err, err[-2000:]
    ckpt = torch.load(out / "checkpoints" / "interrupted.ckpt", weights_only=True)
    step = ckpt["global_step"]
    assert f"at step {step}; its state is saved in {out / 'checkpoints' / 'interrupted.ckpt'}" in last
    assert step >= 5 and "optimizer_states" in ckpt
    assert "stopped: " in (out / "train.log").read_text()
    # the printed command, with a nearer end, continues the same run in the same directory
    command = shlex.split(last.split("; resume with: ", 1)[1])
    assert command[:2] == ["python", "train.py"] and f"hydra.run.dir={out}" in command
    command = [sys.executable, "train.py"] + [a for a in command[2:] if not a.startswith("trainer.max_steps=")]
    r = subprocess.run(
        [*command, f"trainer.max_steps={step + 3}"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming at step {step}" in (out / "train.log").read_text()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step + 3


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_before_the_first_step_leaves_no_run_directory(tmp_path, sig):
    out = tmp_path / "run"
    proc, primary = _start(out, False)
    try:
        deadline = time.monotonic() + 60
        while not (out / "train.log").exists() and time.monotonic() < deadline:  # Hydra made it: imports follow
            time.sleep(0.02)
        proc.send_signal(sig)
        err = _finish(proc, primary)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-2000:]
    line = {
        signal.SIGINT: "stopped: Ctrl-C (SIGINT) before the first training step; nothing to keep",
        signal.SIGTERM: "stopped: SIGTERM (a scheduler's preemption or a kill) before the first training step; nothing to keep",
    }
    assert err.strip().splitlines()[-1] == line[sig], err[-2000:]
    assert "Traceback" not in err and not out.exists()


@pytest.mark.slow
def test_ctrl_c_while_sampling_keeps_the_text_and_shows_no_traceback(trained_run):
    run, _, _ = trained_run
    proc = subprocess.Popen(
        [sys.executable, "-m", "shakegpt.commands.sample", f"ckpt_path={run}", "num_chars=1000000", "prompt=First"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout.read(40).startswith(b"First")  # streaming: the first characters are out
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err
    assert err.decode().strip().splitlines()[-1] == "stopped: Ctrl-C (SIGINT)"


@pytest.mark.slow
def test_a_sweep_stopped_by_a_signal_still_ends_in_its_table(tmp_path):
    sweep = tmp_path / "sweep"
    shrunk = train_command(tmp_path / "unused", "trainer.max_steps=100000", "trainer.val_check_interval=5")
    cmd = [*shrunk[:2], "-m", *shrunk[2:], "seed=1,2,3", f"hydra.sweep.dir={sweep}"]  # -m before the overrides
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_log(sweep / "0_seed=1", "- step 5/")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped: SIGTERM"), err[-2000:]
    summary = (sweep / "summary.md").read_text()
    assert "seed" in summary and "stopped; its jobs so far, best first" in out
    assert not (sweep / "1_seed=2").exists()  # the sweep ended with the stopped job


class SignalAtValidation(L.Callback):
    """A callback (given on the command line) that sends its own process SIGTERM at the end of the
    validation after step `step`, as a scheduler's signal arriving then would."""

    def __init__(self, step: int):
        self.step = step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_a_run_stopped_after_a_validation_resumes_on_the_same_steps(tmp_path):
    """SIGTERM at the end of a validation, then a resume: every later scalar sits at the step the
    uninterrupted run logs it at, with its value (Lightning restored its logging step one too high
    from such a checkpoint, so the resumed part sat a step late)."""
    run = ("experiment=smoke", "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    subprocess.run(train_command(whole, *run), cwd=ROOT, check=True, capture_output=True, timeout=300)
    signal_at = ("+callbacks.stop._target_=tests.run.test_signals.SignalAtValidation", "+callbacks.stop.step=4")
    r = subprocess.run(train_command(stopped, *run, *signal_at), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 143 and "SIGTERM (a scheduler's preemption or a kill) at step 4" in r.stdout + r.stderr
    resume = train_command(stopped, *run, f"ckpt_path={stopped}")
    subprocess.run(resume, cwd=ROOT, check=True, capture_output=True, timeout=300)
    a, b = read_scalars(whole), read_scalars(stopped)
    for tag in ("train/loss", "val/loss"):
        assert [s for s, _, _ in b[tag]] == [s for s, _, _ in a[tag]], tag
        assert torch.allclose(
            torch.tensor([v for _, v, _ in b[tag]]), torch.tensor([v for _, v, _ in a[tag]]), atol=1e-6
        )
    assert max(s for s, _, _ in b["val/loss"]) == 8
