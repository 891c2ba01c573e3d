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
    tb = load_run(tmp_path / "tensorboard")
    for tag in ("val/loss", "train/loss"):
        ours = [(s, round(v, 5)) for s, v, _ in record[tag]]
        assert ours == [(s, round(v, 5)) for s, v in scalars(tb, tag)], tag
    assert [s for s, _, _ in record["val/loss"]] == [3, 6]
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    assert [round(float(r["val/loss"]), 5) for r in rows] == [round(v, 5) for _, v, _ in record["val/loss"]]
    s = summarize(tmp_path)
    assert s["best_val_loss"] == round(metrics["val/loss_best"], 4) and s["steps"] == 6
    assert last_sample(tmp_path) and len(last_sample(tmp_path)) == cfg.sample.num_chars


def test_with_the_csv_logger_alone_nothing_of_tensorboard_is_written(make_cfg, tmp_path, capsys):
    cfg = make_cfg("logger=csv", "trainer.max_steps=4")
    train(cfg)
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "csv" / "metrics.csv").is_file()
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
