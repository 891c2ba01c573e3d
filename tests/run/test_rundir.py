"""Run directories: unique even for runs started together, names that fit any file system."""

import contextlib
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from omegaconf import read_write

from shakegpt.run.configs import MAX_NAME_BYTES, path_safe
from shakegpt.run.console import quoted, summary
from shakegpt.run.rundir import claim

from ..conftest import ROOT, TINY, run_here


def test_claims_made_at_once_get_distinct_directories(tmp_path):
    base = tmp_path / "runs" / "2026-11-30_19-42-07_v3"
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: claim(base), range(8)))
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert sorted(p.name for p in got) == sorted([base.name] + [f"{base.name}-{n}" for n in range(2, 9)])


def test_job_names_fit_any_file_system_and_stay_distinct():
    assert path_safe("model/pos_encoding=rope,optim.lr=0.001") == "model-pos_encoding=rope,optim.lr=0.001"
    long_a = ",".join(f"model.key{i}=value{i}" for i in range(40))
    long_b = long_a.replace("value39", "value40")
    a, b = path_safe(long_a), path_safe(long_b)
    assert len(a.encode()) <= MAX_NAME_BYTES and len(b.encode()) <= MAX_NAME_BYTES and a != b
    wide = path_safe("sample.prompt=" + "é" * 200)  # two bytes a character: cut on a character boundary
    assert len(wide.encode()) <= MAX_NAME_BYTES and "\ufffd" not in wide


def test_quoted_values_survive_the_override_grammar():
    assert quoted("outputs/multiruns/2026-11-30_19-42-07") == "'outputs/multiruns/2026-11-30_19-42-07'"
    assert quoted("it's") == "'it\\'s'"


@pytest.mark.parametrize(
    "path",
    [
        "outputs/runs/2026-11-30_19-42-07_v3",
        "outputs/multiruns/2026-11-30_19-42-07/1_model=v3,optim.lr=0.001",  # a sweep job's directory
        "my runs/it's $HOME",
    ],
)
def test_the_commands_a_run_ends_with_reach_hydra_as_the_path(path):
    """The `sample` and `resume` lines of the closing summary, pasted into a shell, give Hydra the
    run directory itself (a sweep job's `=` and `,` would otherwise read as a sweep)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    line = next(x for x in summary(Path(path), None, None, 1).splitlines() if x.startswith("sample"))
    args = shlex.split(line.split(maxsplit=1)[1])
    assert args[:4] == ["python", "-m", "shakegpt", "sample"] and len(args) == 5
    (parsed,) = OverridesParser.create().parse_overrides([args[4]])
    assert parsed.key_or_group == "ckpt_path" and parsed.value() == path and not parsed.is_sweep_override()
    if "," not in path and " " not in path:
        assert args[4] == f"ckpt_path={path}"  # plain when nothing needs quoting


def test_a_sweep_names_its_swept_keys_to_its_jobs():
    from omegaconf import OmegaConf

    from shakegpt.run.rundir import swept_keys

    cfg = OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": ["model=v1,v3", "trainer.max_steps=20", "optim.lr=choice(1e-3,3e-3)"]},
                "sweeper": {"params": {"model.dropout": "interval(0.0, 0.3)", "seed": "7"}},
            }
        }
    )
    assert swept_keys(cfg) == ["model", "optim.lr", "model.dropout"]


def test_a_grid_sweeps_jobs_are_known_before_it_starts_in_hydras_order():
    """The jobs checked before a grid sweep runs are the ones Hydra's grid sweeper launches, numbered
    alike (its sweeper's params first, a key given twice taking its last value); an Optuna sweep's are not known."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # the reference, in a test only
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from shakegpt.run.rundir import grid_jobs

    task = ["model=v1,v3", "optim.lr=0.1", "seed=3,4", "data.batch_size=8,16,32", "optim.lr=0.2,0.3"]
    params = {"model.dropout": "0.0,0.1"}
    grid = {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params}
    cfg = OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": grid}})
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + task)
    (hydras,) = BasicSweeper.split_arguments(parsed, None)
    assert grid_jobs(cfg) == hydras and len(hydras) == 2 * 2 * 2 * 3 * 2
    optuna = {"_target_": "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper", "params": params}
    assert grid_jobs(OmegaConf.create({"hydra": {"overrides": {"task": task}, "sweeper": optuna}})) is None


def _default_run(cwd: Path, *args: str) -> subprocess.Popen:
    """`python train.py` from `cwd`, its run directory left to the default naming."""
    return subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"data.path={TINY}",
            "data.seq_len=32",
            "data.batch_size=4",
            "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.enable_progress_bar=false",
            "sample.num_chars=0",
            *args,
        ],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_directories(tmp_path):
    procs = [_default_run(tmp_path) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2, runs
    for run in runs:
        assert run.name.endswith(("_quickstart", "_quickstart-2")), run.name
        assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"
        assert len(list(run.glob("events.*"))) == 1  # one run's events each
        assert (run / ".hydra" / "config.yaml").is_file()


def test_a_refused_run_makes_no_directory_at_all(tmp_path):
    """A bad value is refused before Hydra makes outputs/runs/<run>, and the message is one line."""
    from shakegpt.commands import train as train_command

    r = run_here(train_command.main, f"data.path={TINY}", "optim.min_lr_ratio=-3", cwd=tmp_path)
    err = r.stderr
    assert r.returncode == 1
    assert err.strip().splitlines()[-1] == (
        "error: optim.min_lr_ratio=-3 is invalid; it must be in [0, 1] (the final lr as a share of optim.lr)"
    )
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@contextlib.contextmanager
def _sweep_cfg(sweep_dir: str):
    """The training config with its hydra node, as a sweep composes it, `sweep_dir` as if set by the
    config (claimed), not on the command line; inside Hydra's context, where a sweep's callbacks run."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"hydra.sweep.dir={sweep_dir}"], return_hydra_config=True)
        with read_write(cfg.hydra):
            cfg.hydra.overrides.hydra = [o for o in cfg.hydra.overrides.hydra if not o.startswith("hydra.sweep.dir")]
        yield cfg


def test_sweeps_started_together_get_their_own_directories_and_their_jobs_follow(tmp_path, monkeypatch):
    from shakegpt.run.rundir import PrepareRun

    monkeypatch.chdir(tmp_path)
    dirs = []
    for _ in range(2):
        with _sweep_cfg("outputs/multiruns/2026-11-30_19-42-07") as cfg:
            PrepareRun().on_multirun_start(cfg)
        dirs.append(cfg.hydra.sweep.dir)
        # each job's config is composed again from these overrides: it must name the claimed directory
        assert cfg.hydra.overrides.hydra[-1] == f"hydra.sweep.dir={quoted(cfg.hydra.sweep.dir)}"
    assert dirs == ["outputs/multiruns/2026-11-30_19-42-07", "outputs/multiruns/2026-11-30_19-42-07-2"]
    assert all((tmp_path / d).is_dir() for d in dirs)


def test_a_sweep_directory_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    from shakegpt.run.rundir import PrepareRun

    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").write_text("a file where the folder would go")
    with (
        _sweep_cfg("outputs/multiruns/x") as cfg,
        pytest.raises(SystemExit, match="^error: hydra.sweep.dir=outputs/multiruns/x cannot be made: "),
    ):
        PrepareRun().on_multirun_start(cfg)


def test_a_sweep_with_no_job_leaves_no_directory(tmp_path):
    from shakegpt.commands import train as train_command

    r = run_here(train_command.main, "-m", "seed=range(0,0)", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert r.returncode == 0 and "the sweep ran no job" in r.stdout, r.stderr[-1500:]
    assert not (tmp_path / "sweep").exists()


def test_a_run_refused_once_the_corpus_is_read_leaves_no_directory(tmp_path):
    """A mistake found in train() (here: a vocabulary smaller than the corpus's characters) comes
    after the run directory and its lock were made: the directory goes with the run."""
    from shakegpt.commands import train as train_command

    r = run_here(train_command.main, f"data.path={TINY}", "model.vocab_size=10", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-1500:]
    assert not (tmp_path / "outputs" / "runs").exists() or list((tmp_path / "outputs" / "runs").iterdir()) == []


def test_torchrun_without_a_shared_store_asks_for_the_directory(monkeypatch):
    from shakegpt.errors import ConfigError
    from shakegpt.run.rundir import agreed_run_dir, torchrun_rank

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert torchrun_rank() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "etcd-job")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")  # e.g. the etcd rendezvous
    assert torchrun_rank() == 3
    with pytest.raises(ConfigError) as info:
        agreed_run_dir(3, lambda: Path("never"))
    assert str(info.value).startswith(
        "this torchrun's rendezvous keeps no store that shakegpt can share the run directory through"
    )
    assert str(info.value).endswith("give every rank the same one: hydra.run.dir=outputs/runs/<name>")
