"""What a failure after training has started is, told in one line, with where the run can resume.

A run that dies of a full disk, a lost DDP rank or too little memory ends with
`error: <what happened> at step N; last good checkpoint: <file> (step M): resume with ckpt_path=<run dir>`
on the terminal; the traceback goes to the run's log file only.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from shakegpt.checkpoint import step_of

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


def describe_failure(e: BaseException, run_dir: Path, step: int | None = None) -> str:
    """One line: what happened, at which step, and the checkpoint to resume from."""
    line = what_happened(e)
    if step is not None:
        line += f"; training stopped at step {step}"
    good = last_good_checkpoint(run_dir)
    if good:
        path, at = good
        line += f"; last good checkpoint: {path} (step {at}): resume with ckpt_path={run_dir}"
    else:
        line += "; no checkpoint was written"
    return line
