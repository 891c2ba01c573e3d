"""What a failure after training has started is, told in one line, with where the run can resume.

A run that dies of a full disk, a lost DDP rank or too little memory ends with
`error: <what happened> at step N; last good checkpoint: <file> (step M): resume with ckpt_path=<run dir>`
on the terminal; the traceback goes to the run's log file only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import sys
from pathlib import Path

import torch

from shakegpt.run.requeue import preempted_by
from shakegpt.run.signals import SIGNAL_WORDS, before_first_step
from shakegpt.training.checkpoint import step_of

log = logging.getLogger(__name__)
WRITE_ERRNOS = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted"}
PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "nccl", "gloo")


def what_happened(e: BaseException) -> str:
    """The cause of a failure in words a user can act on."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full (no space left writing {e.filename or 'a file'}): free some space"
    if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
        return f"cannot write {e.filename or 'a file'} ({WRITE_ERRNOS[e.errno]})"
    text = " ".join(str(e).split())
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text.lower():
        return "out of memory: lower data.batch_size, data.seq_len or the model's size"
    if isinstance(e, RuntimeError) and any(k in text.lower() for k in PEER_LOST):
        return f"another DDP rank stopped (killed or out of memory?): {text[:160]}"
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def last_good_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The run's latest readable training checkpoint and its step, or None."""
    found = [(step_of(p), p) for p in (run_dir / "checkpoints").glob("*.ckpt")] if run_dir.is_dir() else []
    found = [(s, p) for s, p in found if s >= 0]
    if not found:
        return None
    step, path = max(found, key=lambda sp: (sp[0], sp[1].name == "last.ckpt"))
    return path, step


def describe_failure(e: BaseException | str, run_dir: Path, step: int | None = None) -> str:
    """One line: what happened (an exception, or words), at which step, and the checkpoint to resume from."""
    line = e if isinstance(e, str) else what_happened(e)
    if step is not None:
        line += f"; training stopped at step {step}"
    good = last_good_checkpoint(run_dir)
    if good:
        path, at = good
        line += f"; last good checkpoint: {path} (step {at}): resume with ckpt_path={run_dir}"
    else:
        line += "; no checkpoint was written"
    return line


def stopping_signal(e: BaseException) -> int | None:
    """The signal that ended `Trainer.fit`, or None: Lightning turns SIGTERM into its SIGTERMException
    and Ctrl-C into `sys.exit(1)` raised while handling the KeyboardInterrupt."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(e, SIGTERMException):  # SIGTERM's own, or submitit's preemption signal, which stops the same way
        return preempted_by() or signal.SIGTERM
    if isinstance(e, KeyboardInterrupt) or (isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)):
        return signal.SIGINT
    return None


def describe_interruption(signum: int, run_dir: Path, step: int) -> str:
    """One line: which signal stopped the run, at which step, and the checkpoint it can resume from."""
    if step == 0:
        return before_first_step(signum)
    what = SIGNAL_WORDS.get(signum, signal.Signals(signum).name)
    saved = run_dir / "checkpoints" / "interrupted.ckpt"
    if saved.is_file() and step_of(saved) == step:
        return f"{what} at step {step}; its state is saved in {saved}"
    return describe_failure(what, run_dir, step)


@contextlib.contextmanager
def lost_ranks_reported(trainer, run_dir: Path):
    """While the block runs: when a DDP rank started by Lightning dies, Lightning's child-process
    observer kills rank 0 with SIGKILL (so that no rank hangs in a collective), and rank 0 can print
    nothing after that; have the observer print the one line first. (Rank 0 may instead notice the
    loss itself at its next gradient exchange; then `describe_failure` says the same.) Lightning has
    no public hook for this: the observer's `_terminate_all` is wrapped for the block only and
    restored after it; tests/test_layout.py fails on a Lightning without that method."""
    observer = _child_process_observer()
    if observer is None:
        yield
        return
    original = observer._terminate_all

    def terminate_all(self) -> None:
        codes = [(i + 1, p.returncode) for i, p in enumerate(getattr(self, "_child_processes", []))]
        lost = ", ".join(f"rank {r} exited with code {c}" for r, c in codes if c)
        what = f"another DDP rank stopped (killed or out of memory?): {lost or 'a rank exited'}"
        line = describe_failure(what, run_dir, trainer.global_step)
        log.error("%s", line)
        print(f"error: {line}", file=sys.stderr, flush=True)
        original(self)

    observer._terminate_all = terminate_all
    try:
        yield
    finally:
        observer._terminate_all = original


def _child_process_observer():
    """Lightning's DDP child-process observer class, or None where this Lightning has none."""
    try:
        from lightning.fabric.strategies.launchers import subprocess_script
    except ImportError:
        return None
    observer = getattr(subprocess_script, "_ChildProcessObserver", None)
    return observer if observer is not None and hasattr(observer, "_terminate_all") else None
