"""DDP inside a Hydra sweep: each job's extra ranks join that job, in its directory, once."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import open_dict, read_write


@contextmanager
def sweep_job():
    """Inside a Hydra multirun, make Lightning's DDP launcher start this job's other ranks, not a sweep.

    Lightning starts ranks 1.. by running `sys.argv` again with `hydra.run.dir=<HydraConfig run.dir>`
    appended. Under `-m`, sys.argv is the whole sweep, so every rank would start a sweep of its own
    (Lightning #11300, Hydra #2070). For the job's duration the argv becomes this job's own overrides
    and the run dir this job's directory, so rank 1 joins this job, in it, once. Afterwards the
    environment is restored: the launcher leaves LOCAL_RANK, WORLD_SIZE, MASTER_PORT… behind, and
    the next job would take them to mean its ranks were started by someone else, and wait forever."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        yield
        return
    argv, env = sys.argv, dict(os.environ)
    sys.argv = [sys.argv[0], *hc.overrides.task]
    with read_write(hc), open_dict(hc):
        hc.run.dir = hc.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
