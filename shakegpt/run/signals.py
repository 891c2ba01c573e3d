"""Signals before training starts. Lightning handles SIGTERM and Ctrl-C once `Trainer.fit` runs
(`shakegpt.run.failures.stopping_signal` reads what it leaves); before that, reading the corpus or
importing torch, a SIGTERM would kill the process with nothing said and a run directory left with
nothing in it. From the command's first line, outside fit, SIGTERM raises `Terminated`, which ends
the program the way Ctrl-C's KeyboardInterrupt does: one line, no run directory, exit code 143 (130).

Python drops an exception raised while a `__del__` method or a weakref callback runs ("Exception
ignored in …"): a signal arriving while the garbage collector finalizes an object would be lost, and
the run would go on training. So the handlers also note the signal, and the run acts on it at the
hand-over to Lightning, at each training step and after fit."""

from __future__ import annotations

import contextlib
import os
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


_noted: int | None = None  # the last signal the handlers below saw


def _raise_for_signal(signum, frame) -> None:
    global _noted
    _noted = signum
    raise as_interrupt(signum)


def _note_for_lightning(signum, frame) -> None:
    """SIGTERM while fit runs: Lightning's handler, which stops at the next step, calls this one after
    its own; one that came before Lightning's was in place is only noted, and sent again."""
    global _noted
    _noted = signum


def _take_noted() -> int | None:
    global _noted
    signum, _noted = _noted, None
    return signum


@contextlib.contextmanager
def signals_raise():
    """While the block runs: Ctrl-C raises KeyboardInterrupt (as Python's own handler does) and,
    outside fit, SIGTERM raises Terminated; both are noted in case Python drops the exception. The
    handlers found before are put back after (a test or a notebook running the command in its own
    process)."""
    _take_noted()
    previous = {s: signal.signal(s, _raise_for_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    hook = sys.unraisablehook

    def quiet_when_noted(unraisable) -> None:
        # Python prints a dropped exception with its traceback; one of ours is noted and acted on
        if not (_noted is not None and unraisable.exc_type and issubclass(unraisable.exc_type, KeyboardInterrupt)):
            hook(unraisable)

    sys.unraisablehook = quiet_when_noted
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sys.unraisablehook = hook
        _take_noted()


def _raise_noted() -> None:
    """Raise a signal noted but not acted on (see the module's docstring)."""
    signum = _take_noted()
    if signum is not None:
        raise as_interrupt(signum)


def hand_over_to_lightning() -> None:
    """Just before fit: a signal noted so far stops the run here. From here SIGTERM is only noted:
    Lightning puts its own handler in front of that one once fit starts."""
    _raise_noted()
    if signal.getsignal(signal.SIGTERM) is _raise_for_signal:
        signal.signal(signal.SIGTERM, _note_for_lightning)


def at_each_step(lightning_saw_sigterm: bool) -> None:
    """During fit, before each step: a Ctrl-C whose KeyboardInterrupt Python dropped is raised again,
    and a SIGTERM that came before Lightning's handler was in place is sent again, to it."""
    signum = _take_noted()
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if signum == signal.SIGTERM and not lightning_saw_sigterm:
        os.kill(os.getpid(), signal.SIGTERM)


def take_back_from_lightning() -> None:
    """After fit (the final sample): a signal noted in its last step stops the run here, and SIGTERM
    raises Terminated again."""
    if signal.getsignal(signal.SIGTERM) is _note_for_lightning:
        signal.signal(signal.SIGTERM, _raise_for_signal)
    _raise_noted()


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
