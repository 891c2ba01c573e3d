"""Preemptible clusters: a sweep job that submitit runs (`hydra/launcher=slurm`, or `slurm_local` to
try it on one machine) saves its state when the scheduler says it is preempted or out of time, is
requeued, and resumes in its own run directory.

submitit signals the job (SIGUSR2 unless `SUBMITIT_PREEMPT_SIGNAL` names another) and, from its
handler, asks the launcher for the call to requeue (`checkpoint`), requeues it and exits. Here:

1. `stop_on_preemption` replaces submitit's handler while training runs. The signal only marks the
   run as stopping, the flag Lightning sets for SIGTERM: every rank stops at the same step boundary
   (rank 0's flag is broadcast each step), and `InterruptCheckpoint` saves `interrupted.ckpt` there,
   a consistent state rather than one caught mid-step.
2. `hand_over_to_submitit` then calls submitit's handler itself, as the signal would have.
3. The launchers' `checkpoint` (`hydra_plugins.shakegpt_launchers`) returns the same job with `ckpt_path=<its run directory>`, so the
   requeued job resumes there from the latest of last.ckpt and interrupted.ckpt.

Lightning's own SLURM requeueing (on SIGUSR1) is switched off in such a job (`slurm_plugins`): one
requeue, submitit's, on one signal.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L

_pending: dict[str, Any] = {}  # the signal and submitit's handler, once the signal came


def under_submitit() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR"))


def preemption_signal() -> signal.Signals:
    """The signal submitit's job environment listens to (`SUBMITIT_PREEMPT_SIGNAL`, default USR2)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


def stop_on_preemption(trainer: L.Trainer) -> None:
    """In a submitit job: submitit's preemption signal stops training at the next step, as SIGTERM does."""
    _pending.clear()
    if not under_submitit():
        return
    signum = preemption_signal()
    submitits = signal.getsignal(signum)

    def stop(sig: int, frame: Any) -> None:
        _pending.update(signum=sig, handler=submitits)
        # Lightning's trainer.received_sigterm has no setter; its connector's flag is what the
        # training loop reads and rank 0 broadcasts, so every rank stops at the same step
        trainer._signal_connector.received_sigterm = True

    signal.signal(signum, stop)


def preempted_by() -> int | None:
    """The submitit signal that stopped this run, or None."""
    return _pending.get("signum")


def hand_over_to_submitit() -> None:
    """After a run stopped for submitit's signal: run submitit's handler, which asks the launcher
    for the call to requeue, requeues it and ends the process. Does nothing for any other stop."""
    if not _pending:
        return
    signum, handler = _pending.pop("signum"), _pending.pop("handler")
    if callable(handler):
        handler(signum, None)


def slurm_plugins() -> list:
    """Lightning's cluster plugin for a submitit job on SLURM: its own requeueing off (submitit's does it)."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return []
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)]
