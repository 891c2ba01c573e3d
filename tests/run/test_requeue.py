"""Preemptible clusters, the parts a test can hold in its hand: the launcher configs, the requeued
call, Lightning's requeueing left to submitit. (The whole path, a signal to a real submitit job:
tests/run/test_sweep.py::test_a_preempted_submitit_job_is_requeued_and_resumes_in_its_directory.)"""

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from shakegpt.run import requeue

from ..conftest import CONF

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the sweep extra: pip install -e '.[sweep]'")


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("slurm", "RequeueingSlurmLauncher"), ("slurm_local", "RequeueingLocalLauncher")],
)
def test_the_launchers_are_shakegpts_and_requeue_on_timeouts(launcher, target):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"hydra_plugins.shakegpt_launchers.{target}"
    if launcher == "slurm":
        assert cfg.hydra.launcher.max_num_timeout == 3 and cfg.hydra.launcher.signal_delay_s == 120


def test_a_requeued_job_resumes_from_its_own_directory(tmp_path, monkeypatch):
    from hydra_plugins.shakegpt_launchers import RequeueingLocalLauncher

    run_dir = tmp_path / "0_model=v3,optim.lr=0.001"  # a sweep job's name: characters Hydra's grammar reads
    job = OmegaConf.create({"runtime": {"output_dir": str(run_dir)}})  # what Hydra tells the running job
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: job))
    launcher = RequeueingLocalLauncher()
    # preempted twice: the second requeue names the directory once, not twice
    earlier = ["model=v3", "optim.lr=0.001", f"ckpt_path='{run_dir}'"]
    delayed = launcher.checkpoint(earlier, "hydra.sweep.dir", 0, "job_id_for_0", {})
    overrides = delayed.args[0]
    assert overrides[:2] == ["model=v3", "optim.lr=0.001"] and len(overrides) == 3
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (parsed,) = OverridesParser.create().parse_overrides([overrides[2]])
    assert parsed.key_or_group == "ckpt_path" and parsed.value() == str(run_dir)
    assert delayed.function is launcher and delayed.args[1:] == ("hydra.sweep.dir", 0, "job_id_for_0", {})


@pytest.mark.parametrize(("executor", "auto_requeue"), [("slurm", False), ("local", None), ("", None)])
def test_lightning_leaves_requeueing_to_submitit_on_slurm(monkeypatch, executor, auto_requeue):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    plugins = requeue.slurm_plugins()
    if auto_requeue is None:
        assert plugins == []
    else:
        (env,) = plugins
        assert env.auto_requeue is False


def test_the_signal_is_submitits(monkeypatch):
    import signal

    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert requeue.preemption_signal() == signal.SIGUSR2  # submitit's default
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert requeue.preemption_signal() == signal.SIGUSR1
