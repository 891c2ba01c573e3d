"""hydra-submitit-launcher's launchers (the sweep extra), whose requeued job resumes in its own run
directory: `hydra/launcher=slurm` and `hydra/launcher=slurm_local` (`shakegpt.run.requeue` says how).
They live here, not in shakegpt/, because Hydra takes launchers from its `hydra_plugins` namespace only."""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher, SlurmLauncher

from shakegpt.run.console import quoted


class ResumesInPlace:
    """A submitit launcher whose requeued job resumes from its own run directory: submitit calls
    `checkpoint` with the job's arguments when it requeues the job, and runs what it returns."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        import submitit

        run_dir = HydraConfig.get().runtime.output_dir
        kept = [o for o in sweep_overrides if o.split("=", 1)[0].lstrip("+~") != "ckpt_path"]
        return submitit.helpers.DelayedSubmission(self, [*kept, f"ckpt_path={quoted(run_dir)}"], *args, **kwargs)


class RequeueingSlurmLauncher(ResumesInPlace, SlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher; a preempted or timed-out job resumes in place."""


class RequeueingLocalLauncher(ResumesInPlace, LocalLauncher):
    """The same with submitit's local executor: processes on this machine, for trying it out."""
