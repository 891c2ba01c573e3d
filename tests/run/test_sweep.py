"""Hydra multirun: grid sweeps, and DDP jobs inside a sweep (each job one 2-process group, once)."""

import json
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ..conftest import ROOT, TINY
from ..tb import hparams, load_run, scalars

pytestmark = pytest.mark.slow

SHRUNK = [  # experiment=smoke: 20 steps, validation at 10 and 20 on 2 batches
    f"data.path={TINY}",
    "experiment=smoke",
    "data.seq_len=32",
    "data.batch_size=4",
    "trainer.enable_progress_bar=false",
]


def multirun(cwd, *args, returncode=0):
    """`python train.py -m …` run from `cwd`, so anything written outside the sweep dir shows there."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "-m", *SHRUNK, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == returncode, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_grid_sweep_gives_one_directory_and_tensorboard_run_per_job(tmp_path):
    (tmp_path / "outputs" / "multiruns").mkdir(parents=True)
    r = multirun(tmp_path, "model/pos_encoding=learned,rope,none")  # the default, claimed sweep directory
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1 and sweeps[0].name.count("_") == 1, sweeps  # <date>_<time>
    sweep = sweeps[0]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 3  # one directory per job, named by number and overrides ("/" made "-")
    for i, enc in enumerate(("learned", "rope", "none")):  # named by what the sweep varies, nothing else
        assert jobs[i] == f"{i}_model-pos_encoding={enc}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]  # nothing written elsewhere
    # the sweep ends with its jobs, best first, on the terminal and in summary.md
    table = (sweep / "summary.md").read_text().strip()
    assert table in r.stdout and table.splitlines()[0] == "| job | model/pos_encoding | best val loss | at step |"
    best = [float(line.split("**")[1]) for line in table.splitlines()[2:]]
    assert len(best) == 3 and best == sorted(best)
    encodings = set()
    for job in sweep.iterdir():
        if not job.is_dir():
            continue
        ea = load_run(job)
        params, metric_tags = hparams(ea)
        encodings.add(params["model.pos_encoding"])
        assert "val/loss_best" in metric_tags and scalars(ea, "val/loss_best")
    assert encodings == {"learned", "rope", "none"}


def test_a_grid_sweep_with_a_bad_job_is_refused_before_any_job_runs(tmp_path):
    """What a config check finds, it finds for every job before the first one trains: one line naming
    the first bad job and how many more, nothing made."""
    sweep = tmp_path / "sweep"
    r = multirun(tmp_path, "trainer.num_nodes=1,0", "seed=1,2", f"hydra.sweep.dir={sweep}", returncode=1)
    assert "Traceback" not in r.stderr and "Launching" not in r.stdout + r.stderr, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: job 2 (trainer.num_nodes=0 seed=1): Lightning refuses the trainer config ("), line
    assert line.endswith(
        "`num_nodes` must be a positive integer, but got 0; 1 more job(s) refused too; no job of the sweep ran"
    )
    assert not sweep.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failing_grid_job_fails_alone_and_the_sweep_still_ends_with_its_table(tmp_path):
    """What only the job itself can find (here its corpus is not text) fails that job alone."""
    sweep, bad = tmp_path / "sweep", tmp_path / "bad.txt"
    bad.write_bytes(b"ab\xff\xfecd")
    r = multirun(tmp_path, f"data.path={TINY},{bad}", f"hydra.sweep.dir={sweep}", returncode=1)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    message = f"corpus {bad} is not UTF-8 text (byte 2); point data.path at a text file"
    assert f"error: job 1 (data.path={bad}): {message}" in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: 1 job(s) of the sweep failed (job 1): each job's train.log in {sweep} has its error and traceback"
    )
    table = (sweep / "summary.md").read_text().strip().splitlines()
    assert table[2].startswith("| 0 | ") and "**" in table[2]  # the job that trained, then the one that failed
    assert table[3].startswith(f"| 1 | {bad} | failed | {message[:60]}")  # cut to 120
    assert "\n".join(table) in r.stdout


def test_ddp_inside_a_sweep_runs_each_job_once_as_two_ranks(tmp_path):
    sweep = tmp_path / "sweep"
    r = multirun(tmp_path, "model=v1,v3", "trainer.devices=2", "trainer.precision=32-true", f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and "model=v1" in jobs[0].name and "model=v3" in jobs[1].name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no nested sweep, no stray run dir
    assert r.stderr.count("MEMBER: 2/2") == 2  # one second rank per job
    for job, d_model in zip(jobs, (32, 384), strict=True):
        assert (job / "train_ddp_process_1.log").is_file()  # rank 1 ran inside this job's directory
        assert not (job / "multirun.yaml").exists() and not any(
            p.is_dir() and p.name[0].isdigit() for p in job.iterdir()
        )
        ea = load_run(job)
        params, _ = hparams(ea)
        assert params["model.d_model"] == str(d_model) and params["trainer.devices"] == "2"
        assert len(scalars(ea, "val/loss")) == 2


def test_optuna_study_runs_and_continues_from_its_storage(tmp_path):
    import optuna
    import yaml

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweeper.storage={storage}"]
    multirun(tmp_path, *common, f"hydra.sweep.dir={tmp_path / 'first'}")
    study = optuna.load_study(study_name="shakegpt", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    first_best = study.best_value
    summary = yaml.safe_load((tmp_path / "first" / "optimization_results.yaml").read_text())
    assert summary["best_value"] == pytest.approx(first_best) and set(summary["best_params"]) == {
        "optim.lr",
        "optim.warmup_steps",
        "model.dropout",
        "model.d_model",
        "model.n_layer",
    }
    assert "note: study" not in (tmp_path / "first" / "summary.md").read_text()  # a fresh study: nothing to say
    # the same command again: the study goes on from 3 to 6 trials
    r = multirun(tmp_path, *common, f"hydra.sweep.dir={tmp_path / 'second'}")
    study = optuna.load_study(study_name="shakegpt", storage=storage)
    assert len(study.trials) == 6 and study.best_value <= first_best
    # Optuna's "Best value" is the study's, perhaps a trial of the first sweep: the end says so
    note = (
        f"note: study 'shakegpt' in {storage} holds 6 trials, 3 of them from earlier sweeps; Optuna's 'Best value' "
        f"is the study's best, {study.best_value:.4f} (trial {study.best_trial.number}); this sweep's own jobs are in the table"
    )
    assert note in r.stdout and note in (tmp_path / "second" / "summary.md").read_text()


def test_a_failing_optuna_trial_fails_alone(tmp_path):
    """A trial with a bad value is recorded as failed and the study goes on to its other trials."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    multirun(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.sampler.seed=1",  # draws -1 for trials 0 and 2
        "optim.min_lr_ratio=choice(-1,0.1)",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # exits 0
    study = optuna.load_study(study_name="shakegpt", storage=storage)
    states = [(t.state.name, t.params["optim.min_lr_ratio"]) for t in study.trials]
    assert len(states) == 4 and {s for s, v in states if v == -1} == {"FAIL"}, states
    assert {s for s, v in states if v == 0.1} == {"COMPLETE"} and ("FAIL", -1) in states, states
    failed = min(t.number for t in study.trials if t.state.name == "FAIL")
    log = next((tmp_path / "sweep").glob(f"{failed}_*")) / "train.log"
    assert "optim.min_lr_ratio=-1 is invalid; it must be in [0, 1]" in log.read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_over_loopback_form_one_group(tmp_path):
    """trainer.num_nodes=2, one process per "node", joined through the standard variables."""
    port = free_port()
    procs = []
    for node in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node))
        cmd = [
            sys.executable,
            str(ROOT / "train.py"),
            *SHRUNK,
            "trainer.num_nodes=2",
            "trainer.devices=1",
            "trainer.strategy=ddp",
            f"hydra.run.dir={tmp_path / f'node{node}'}",
        ]
        procs.append(
            subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outs[0][1] and "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1][1]
    assert len(scalars(load_run(tmp_path / "node0"), "val/loss")) == 2
    assert not list((tmp_path / "node1").glob("events.*"))  # only global rank 0 writes


SCALAR_TAGS = {  # what every run writes, as docs/watching.md lists it
    *("train/loss", "train/acc", "train/bpc", "train/lr", "train/loss_avg", "train/acc_avg"),
    *("val/loss", "val/acc", "val/bpc", "val/loss_best", "wallclock/tokens_per_s", "wallclock/step_ms"),
}


def test_live_tensorboard_shows_which_job_is_which_and_how_it_did(tmp_path):
    """What TensorBoard itself serves to the browser for a sweep: the swept key first and marked as
    differing, booleans as booleans, each job named by number and swept value, the best and last val
    loss as the metric columns, the designed scalar tags (no epoch) and the Custom Scalars layout."""
    sweep = tmp_path / "sweep"
    multirun(tmp_path, "model/pos_encoding=learned,alibi", "optim.lr=0.002", f"hydra.sweep.dir={sweep}")
    port = free_port()
    tb = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def ask(path, body=None):
        data = None if body is None else json.dumps({"experimentName": "", **body}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/data/{path}", data=data)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read())

    statuses = {"allowedStatuses": ["STATUS_SUCCESS", "STATUS_UNKNOWN", "STATUS_FAILURE", "STATUS_RUNNING"]}
    try:
        groups = None
        for _ in range(60):  # up to 30 s for the server to start and read the event files
            try:
                page = {**statuses, "colParams": [], "startIndex": 0, "sliceSize": 10}
                groups = ask("plugin/hparams/session_groups", page)["sessionGroups"]
                if len(groups) == 2:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert groups is not None and len(groups) == 2
        assert sorted(g["name"] for g in groups) == ["0: learned", "1: alibi"]  # the Trial ID column
        for g in groups:  # the tab's metric values are each job's own best and last val loss
            assert g["sessions"][0]["status"] == "STATUS_SUCCESS"
            assert g["hparams"]["model.bias"] is False and g["hparams"]["optim.lr"] == 0.002
            metrics = {m["name"]["tag"]: m["value"] for m in g["metricValues"]}
            job = next(sweep.glob(f"*model-pos_encoding={g['hparams']['model.pos_encoding']}*"))
            batch = OmegaConf.load(job / ".hydra" / "config.yaml").data.batch_size
            assert g["hparams"]["data.batch_size"] == str(batch)  # an integer as its digits, not 32.000
            logged = [v for _, v in scalars(load_run(job), "val/loss")]
            assert metrics["val/loss_best"] == pytest.approx(min(logged), rel=1e-6)
            assert metrics["val/loss"] == pytest.approx(logged[-1], rel=1e-6)
        experiment = ask("plugin/hparams/experiment", {})
        infos = experiment["hparamInfos"]
        # a column for what the sweep varies, nothing for the settings every job shares
        assert [(h["name"], h.get("differs", False), h["type"]) for h in infos] == [
            ("model.pos_encoding", True, "DATA_TYPE_STRING")
        ]
        assert [(m["name"]["tag"], m["displayName"]) for m in experiment["metricInfos"]] == [
            ("val/loss_best", "best val loss"),
            ("val/loss", "last val loss"),
        ]
        tags = ask("plugin/scalars/tags")
        # each job's run named by its own directory (0_model-pos_encoding=learned), not …/tensorboard
        assert sorted(tags) == sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
        assert all(set(t) == SCALAR_TAGS for t in tags.values()), tags
        layout = ask("plugin/custom_scalars/layout")
        charts = {c["title"]: c["multiline"]["tag"] for cat in layout["category"] for c in cat["chart"]}
        # each chart's tags, read as TensorBoard reads them (regular expressions), match one tag each
        matched = {
            title: [t for t in SCALAR_TAGS if any(re.search(p, t) for p in pats)] for title, pats in charts.items()
        }
        assert sorted(matched["loss: train (mean since the last validation) and val"]) == ["train/loss_avg", "val/loss"]
        assert {
            t: len(m) for t, m in matched.items() if t != "loss: train (mean since the last validation) and val"
        } == {
            "accuracy: train (mean since the last validation) and val": 2,
            "learning rate": 1,
            "tokens per second": 1,
            "milliseconds per step": 1,
        }
    finally:
        tb.terminate()
        tb.wait(timeout=30)


def test_submitit_local_executor_runs_a_sweep_and_returns_results(tmp_path):
    """The SLURM launcher's machinery, run here through submitit's local executor."""
    sweep = tmp_path / "sweep"
    multirun(
        tmp_path,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "model/pos_encoding=learned,none",
        f"hydra.sweep.dir={sweep}",
    )
    results = sorted(sweep.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 2
    returned = {}
    for f in results:  # written by this test's own jobs
        status, ret = pickle.loads(f.read_bytes())
        assert status == "success"
        returned[next(o for o in ret.overrides if o.startswith("model/pos_encoding="))] = ret.return_value
    for job in (p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")):
        enc = "learned" if "pos_encoding=learned" in job.name else "none"
        best = scalars(load_run(job), "val/loss_best")[-1][1]
        assert returned[f"model/pos_encoding={enc}"] == pytest.approx(best)


def test_joblib_launcher_runs_jobs_in_parallel_processes(tmp_path):
    sweep = tmp_path / "sweep"
    multirun(
        tmp_path,
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "model/pos_encoding=rope,alibi",
        f"hydra.sweep.dir={sweep}",
    )
    jobs = [p for p in sweep.iterdir() if p.is_dir()]
    assert len(jobs) == 2 and all(len(scalars(load_run(j), "val/loss")) == 2 for j in jobs)


def test_a_sweep_with_the_csv_logger_alone_ends_with_its_table(tmp_path):
    """No TensorBoard anywhere: the table comes from each job's own record."""
    sweep = tmp_path / "sweep"
    r = multirun(tmp_path, "logger=csv", "seed=1,2", f"hydra.sweep.dir={sweep}")
    table = (sweep / "summary.md").read_text().strip().splitlines()
    assert table[0] == "| job | seed | best val loss | at step |" and len(table) == 4, table
    assert all("**" in row and "failed" not in row for row in table[2:]), table
    assert "\n".join(table) in r.stdout
    for job in (p for p in sweep.iterdir() if p.is_dir()):
        assert (job / "csv" / "metrics.csv").is_file() and not list(job.glob("events.*"))


def _processes_running(marker: str) -> list[int]:
    pids = []
    for proc in os.listdir("/proc"):
        if proc.isdigit():
            try:
                cmdline = Path(f"/proc/{proc}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                pids.append(int(proc))
    return pids


def start_multirun(cwd, *args) -> subprocess.Popen:
    """`python train.py -m …` started in the background from `cwd`, its output piped."""
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", *SHRUNK, *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_job_log(proc: subprocess.Popen, sweep: Path, pattern: str, seconds: float = 300) -> Path:
    """Job 0's train.log once it matches `pattern` (the sweep still running)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        logs = list(sweep.glob("0_*/train.log"))
        if logs and re.search(pattern, logs[0].read_text()):
            return logs[0]
        time.sleep(0.2)
    raise AssertionError(f"job 0 never logged {pattern!r}: " + (proc.stderr.read() if proc.poll() is not None else ""))


def test_a_preempted_submitit_job_is_requeued_and_resumes_in_its_directory(tmp_path):
    """submitit's local executor runs the job as SLURM would; the test sends the job submitit's
    preemption signal (SIGUSR2, what `job._interrupt()` sends) once it has trained a few steps. The job
    stops at a step, saves interrupted.ckpt, is requeued, and its second run resumes from that step in
    the same directory and finishes the steps asked for."""
    sweep = tmp_path / "sweep"
    proc = start_multirun(
        tmp_path,
        "hydra/launcher=slurm_local",
        "trainer.max_steps=60",
        "trainer.val_check_interval=10",
        "trainer.log_every_n_steps=1",
        "model/pos_encoding=rope",
        f"hydra.sweep.dir={sweep}",
    )
    try:
        log = wait_for_job_log(proc, sweep, r"step (1[2-9]|[2-5]\d)/60")
        jobs = _processes_running("submitit.core._submit")
        assert len(jobs) == 1, jobs
        os.kill(jobs[0], signal.SIGUSR2)
        out, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-2000:] + err[-3000:]
    job = log.parent
    assert [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")] == [job]  # resumed in place
    interrupted = torch.load(job / "checkpoints" / "interrupted.ckpt", weights_only=True)
    stopped_at = interrupted["global_step"]
    assert 12 <= stopped_at < 60
    assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 60
    text = log.read_text()
    said = f"stopped: SIGUSR2 (submitit: the job is preempted or near its time limit) at step {stopped_at}; its state"
    assert said in text and f"resuming at step {stopped_at}" in text and "requeued by submitit" in text
    steps = sorted(s for s, _ in scalars(load_run(job), "train/loss"))
    assert steps[-1] == 60 and len(set(steps)) == 60, steps  # every step logged once, none twice
    submitit_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.err"))
    assert "Caught signal SIGUSR2" in submitit_logs and "this job is preempted" in submitit_logs
    (result,) = sweep.glob(".submitit/*/*_result.pkl")
    assert pickle.loads(result.read_bytes())[0] == "success"  # submitit's own word on the requeued job


def test_an_optuna_trial_stopped_by_ctrl_c_is_marked_failed(tmp_path):
    """Ctrl-C (a real SIGINT) during an Optuna study's first trial: the sweep stops with 130 and
    its table, and the trial is FAIL in the study's storage, not RUNNING for good."""
    import optuna

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = tmp_path / "sweep"
    proc = start_multirun(
        tmp_path,
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "model.d_model=choice(32)",
        "model.n_layer=choice(1)",
        "trainer.max_steps=100000",
        "trainer.log_every_n_steps=1",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweep.dir={sweep}",
    )
    try:
        wait_for_job_log(proc, sweep, r"step [3-9]\d*/")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "stopped: Ctrl-C (SIGINT) at step" in err and "Traceback" not in err
    study = optuna.load_study(study_name="shakegpt", storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL"]
    assert "Optuna trial(s) 0 marked failed in" in next(sweep.glob("0_*/train.log")).read_text()
