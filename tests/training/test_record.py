"""Every run keeps its own record (record.jsonl) whatever loggers it has: the summary, a sweep's table
and `results` read it, so they work with the CSV logger alone; TensorBoard's callbacks do nothing
without TensorBoard."""

import csv
import json

import pytest

from shakegpt.run.records import last_sample, read_scalars, summarize
from shakegpt.run.train import train
from shakegpt.training.record import RECORD_FILE

from ..tb import load_run, scalars


def test_the_record_holds_what_tensorboard_and_csv_hold(make_cfg, tmp_path):
    cfg = make_cfg("logger=[tensorboard,csv]", "trainer.max_steps=6", "trainer.val_check_interval=3")
    metrics = train(cfg)
    record = read_scalars(tmp_path)
    tb = load_run(tmp_path)
    for tag in ("val/loss", "train/loss"):
        ours = [(s, round(v, 5)) for s, v, _ in record[tag]]
        assert ours == [(s, round(v, 5)) for s, v in scalars(tb, tag)], tag
    assert [s for s, _, _ in record["val/loss"]] == [3, 6]
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    csv_steps = [(int(r["step"]), round(float(r["val/loss"]), 5)) for r in rows]
    assert csv_steps == [(s, round(v, 5)) for s, v, _ in record["val/loss"]]  # the same steps: 3 and 6
    assert "epoch" not in rows[0]
    s = summarize(tmp_path)
    assert s["best_val_loss"] == round(metrics["val/loss_best"], 4) and s["steps"] == 6
    assert last_sample(tmp_path) and len(last_sample(tmp_path)) == cfg.sample.num_chars


def test_with_the_csv_logger_alone_nothing_of_tensorboard_is_written(make_cfg, tmp_path, capsys):
    cfg = make_cfg("logger=csv", "trainer.max_steps=4")
    train(cfg)
    assert not list(tmp_path.glob("events.out.tfevents.*")) and (tmp_path / "csv" / "metrics.csv").is_file()
    assert summarize(tmp_path)["steps"] == 4 and last_sample(tmp_path)
    assert "Traceback" not in capsys.readouterr().err


def test_a_line_cut_short_by_a_killed_process_is_skipped(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=4"))
    with (tmp_path / RECORD_FILE).open("a") as f:
        f.write('{"time": 1, "step": 5, "scal')  # what kill -9 in the middle of a write leaves
    assert summarize(tmp_path)["steps"] == 4


def test_a_diverged_loss_is_recorded_not_dropped(tmp_path):
    from shakegpt.training.record import RunRecord

    RunRecord(tmp_path).log_metrics({"train/loss": float("nan"), "epoch": 0}, step=0)
    entry = json.loads((tmp_path / RECORD_FILE).read_text())
    assert entry["step"] == 1 and entry["scalars"] == {"train/loss": "nan"}  # no epoch scalar
    assert read_scalars(tmp_path)["train/loss"][0][1] != read_scalars(tmp_path)["train/loss"][0][1]  # NaN


def test_a_directory_without_a_record_or_event_files_is_refused(tmp_path):
    from shakegpt.errors import ConfigError

    with pytest.raises(ConfigError, match=f"no {RECORD_FILE} nor TensorBoard event files in {tmp_path}"):
        summarize(tmp_path)


def test_a_partial_last_batch_counts_by_its_tokens():
    """The val loss is the mean over every token: a batch of 1 window weighs a quarter of one of 4."""
    import torch

    from shakegpt.training.module import WeightedMean

    m = WeightedMean()
    m.update(torch.tensor(1.0), 4 * 32)
    m.update(torch.tensor(4.0), 1 * 32)
    assert m.compute().item() == pytest.approx((4 * 1.0 + 1 * 4.0) / 5)


def test_a_record_that_cannot_be_written_warns_once_and_training_goes_on(tmp_path, caplog):
    from shakegpt.training.record import RunRecord

    (tmp_path / "file").write_text("not a directory")
    record = RunRecord(tmp_path / "file")  # as a full disk would, every write fails
    with caplog.at_level("WARNING", logger="shakegpt"):
        record.log_metrics({"train/loss": 2.0}, step=0)
        record.log_sample("text", 1)
    assert caplog.text.count("cannot be written") == 1 and "training goes on" in caplog.text


def _same_value(theirs: str, ours) -> bool:
    """A tracker's text for a setting against the HParams tab's value (numbers compared as numbers)."""
    try:
        return float(theirs) == pytest.approx(float(ours))
    except (TypeError, ValueError):
        return theirs.lower() == str(ours).lower()


def test_the_csv_logger_gets_the_settings_tensorboard_shows(make_cfg, tmp_path):
    import yaml

    from ..tb import hparams

    cfg = make_cfg("logger=[tensorboard,csv]", "trainer.max_steps=2", "trainer.val_check_interval=2")
    train(cfg)
    tb_params, _ = hparams(load_run(tmp_path))
    saved = yaml.safe_load((tmp_path / "csv" / "hparams.yaml").read_text())
    assert "model.d_model" in tb_params
    assert all(_same_value(str(saved[k]), v) for k, v in tb_params.items()), saved


@pytest.mark.slow
def test_mlflow_holds_the_metrics_and_settings_tensorboard_holds(make_cfg, tmp_path):
    """logger=[tensorboard,mlflow], for real: MLflow's SQLite store (here in tmp_path) read back with
    MLflow's own client. (Slow: importing MLflow and making a fresh store take seconds here.)"""
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install -e '.[mlflow]'")
    from ..tb import hparams

    store = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    cfg = make_cfg(
        "logger=[tensorboard,mlflow]",
        f"logger.mlflow.tracking_uri={store}",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
    )
    train(cfg)
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("shakegpt").experiment_id])
    assert run.info.run_name == tmp_path.name and run.data.tags["run_dir"] == str(tmp_path)
    assert run.info.status == "FINISHED"
    tb = load_run(tmp_path)
    for tag in ("val/loss", "train/loss", "val/loss_best", "train/lr"):
        history = sorted((m.step, round(m.value, 5)) for m in client.get_metric_history(run.info.run_id, tag))
        assert history == [(s, round(v, 5)) for s, v in scalars(tb, tag)], tag
    tb_params, _ = hparams(tb)
    assert len(tb_params) > 20
    differ = {
        k: (run.data.params.get(k), v) for k, v in tb_params.items() if not _same_value(run.data.params.get(k, "?"), v)
    }
    assert not differ


@pytest.mark.slow
def test_parallel_jobs_open_a_fresh_mlflow_store_in_turns(tmp_path):
    """Three processes (a parallel sweep's jobs) start on one fresh SQLite store at once: each run is
    recorded whole. Without the lock, two processes on a fresh store made one fail (its tables half made)."""
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install -e '.[mlflow]'")
    import subprocess
    import sys

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = (
        "import sys\n"
        "from shakegpt.training.trackers import MLflowLogger\n"
        f"lg = MLflowLogger(experiment_name='shakegpt', tracking_uri={store!r}, run_dir=sys.argv[1])\n"
        "for i in range(20):\n"
        "    lg.log_metrics({'val/loss': 2.0 - i / 100}, step=i)\n"
        "lg.finalize('success')\n"
    )
    jobs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path / f"job{i}")], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in jobs]
    assert [p.returncode for p in jobs] == [0, 0, 0], errors
    client = mlflow.tracking.MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("shakegpt").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["job0", "job1", "job2"]
    for r in runs:
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")]
        assert sorted(steps) == list(range(1, 21))  # optimizer steps: Lightning's + 1
