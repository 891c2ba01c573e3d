"""Signals before training starts. Lightning handles SIGTERM and Ctrl-C once `Trainer.fit` runs
(`shakegpt.run.failures.stopping_signal` reads what it leaves); before that, reading the corpus or
importing torch, a SIGTERM would kill the process with nothing said and a run directory left with
nothing in it. From the command's first line until fit, SIGTERM raises `Terminated`, which ends the
program the way Ctrl-C's KeyboardInterrupt does: one line, no run directory, exit code 143 (130)."""

from __future__ import annotations

import contextlib
import signal
import sys
from pathlib import Path
from typing import NoReturn

SIGNAL_WORDS = {
    signal.SIGINT: "Ctrl-C (SIGINT)",
    signal.SIGTERM: "SIGTERM (a scheduler's preemption or a kill)",
    signal.SIGUSR2: "SIGUSR2 (submitit: the job is preempted or near its time limit)",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM before training began, raised where Ctrl-C raises KeyboardInterrupt."""

    signum = signal.SIGTERM


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises():
    """While the block runs, until `lightning_takes_sigterm`: SIGTERM raises Terminated. The handler
    found before is put back after (a test or a notebook running the command in its own process)."""
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def lightning_takes_sigterm() -> None:
    """Just before fit: give SIGTERM back to its default, which Lightning's own handler replaces."""
    if signal.getsignal(signal.SIGTERM) is _raise_terminated:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def before_first_step(signum: int) -> str:
    return f"{SIGNAL_WORDS[signum]} before the first training step; nothing to keep"


def as_interrupt(signum: int) -> KeyboardInterrupt:
    """The exception `stopped_before_training` takes for a signal."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def stopped_before_training(e: KeyboardInterrupt, run_dir: Path | None) -> NoReturn:
    """End the program for Ctrl-C or SIGTERM outside Lightning's handling: before the first step (one
    line, the run directory's entries removed) or after training (the final sample: the checkpoints
    stay), with the shell's exit code for the signal. `run_dir` is None when none was made yet."""
    from shakegpt.run.rundir import end_stopped_sweep, remove_unstarted

    signum = getattr(e, "signum", signal.SIGINT)
    if run_dir is not None and any((run_dir / "checkpoints").glob("*.ckpt")):
        line = f"{SIGNAL_WORDS[signum]}; the run's checkpoints are in {run_dir / 'checkpoints'}"
    else:
        line = before_first_step(signum)
        if run_dir is not None:
            remove_unstarted(run_dir)
    end_stopped_sweep()
    print(f"\nstopped: {line}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum) from None
