"""The checks a config passes before any work starts: one line naming the key, the value and what
is accepted, and nothing written."""

import copy
import errno
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from shakegpt.commands.sample import check_device
from shakegpt.corpus import smallest_id_dtype
from shakegpt.errors import CheckpointError, ConfigError, DataError
from shakegpt.generate import sample_next
from shakegpt.run.checks import check_train_config, check_writable
from shakegpt.run.train import train
from shakegpt.training.data import CharDataModule

from ..conftest import TINY, compose_cfg

BAD = [
    (["optim.min_lr_ratio=-3"], "optim.min_lr_ratio=-3 is invalid; it must be in [0, 1]"),
    (["optim.min_lr_ratio=1.5"], "optim.min_lr_ratio=1.5 is invalid"),
    (["optim.weight_decay=-5"], "optim.weight_decay=-5 is invalid; it must be a number >= 0"),
    (["optim.lr=nan"], "optim.lr=nan is invalid; it must be > 0"),
    (["optim.betas=0.9"], "optim.betas=0.9 is invalid; it must be two numbers in [0, 1), e.g. optim.betas=[0.9,0.99]"),
    (["optim.betas=[0.9]"], "optim.betas=[0.9] is invalid; it must be two numbers in [0, 1)"),
    (["optim.betas=[0.9,1.5]"], "optim.betas=[0.9, 1.5] is invalid"),
    (["optim.betas=[a,b]"], "optim.betas=['a', 'b'] is invalid"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps=-1 is invalid; it must be an integer >= 0"),
    (["optim.schedule=linear"], "optim.schedule='linear' is unknown; choose one of cosine, constant"),
    (["seed=-1"], "seed=-1 is invalid; it must be an integer from 0 to 4294967295"),
    (["seed=4294967296"], "seed=4294967296 is invalid"),
    (["seed=abc"], "seed='abc' is invalid"),
    (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 is invalid; it must be a positive integer"),
    (["trainer.val_check_interval=0.5"], "trainer.val_check_interval=0.5 is invalid; it must be a positive integer"),
    (["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 is invalid; it must be a share in (0, 1]"),
    (["trainer.limit_val_batches=1.5"], "trainer.limit_val_batches=1.5 is invalid"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps=0 is invalid"),
    (["trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches=0 is invalid"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1 is invalid; it must be a number >= 0, or null"),
    (["trainer.precision=fp8"], "trainer.precision='fp8' is unknown; choose one of auto, 32-true"),
    (["trainer.max_steps=0"], "trainer.max_steps=0 is invalid; it must be a positive integer"),
    (["data.val_fraction=1.5"], "data.val_fraction=1.5 is invalid; it must be in (0, 1)"),
    (["data.num_workers=-1"], "data.num_workers=-1 is invalid; it must be an integer >= 0"),
    (["data.batch_size=0"], "data.batch_size=0 is invalid; it must be a positive integer"),
    (["sample.temperature=0"], "sample.temperature=0 is invalid; it must be > 0"),
    (["sample.top_k=0"], "sample.top_k=0 is invalid; it must be an integer >= 1"),
    (["sample.num_chars=-1"], "sample.num_chars=-1 is invalid; it must be an integer >= 0"),
    (["sample.prompt=''"], "sample.prompt='' is invalid; give at least one character"),
    (["callbacks.text_sample.temperature=0"], "callbacks.text_sample.temperature=0 is invalid; it must be > 0"),
    (
        ["optimized_metric=val/los"],
        "optimized_metric='val/los' is not a metric a run logs; choose one of val/loss_best",
    ),
    (
        ["trainer.num_nodes=0"],
        "Lightning refuses the trainer config (trainer.accelerator=cpu, trainer.strategy=auto, trainer.devices=1, "
        "trainer.num_nodes=0): `num_nodes` must be a positive integer, but got 0.",
    ),
    (["trainer.strategy=foo"], "Lightning refuses the trainer config (trainer.accelerator=cpu, trainer.strategy=foo,"),
    (["model.n_head=5"], "model.d_model=128 is not divisible by model.n_head=5"),
    (["model.max_seq_len=16"], "data.seq_len=32 exceeds model.max_seq_len=16"),
]


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """The training config composed once for the cases below, which each change values in a copy."""
    return compose_cfg(tmp_path_factory.mktemp("run"))


def with_values(cfg, *overrides: str):
    """A copy of `cfg` with `key=value` overrides applied as Hydra applies them to a composed config
    (its own parser for the values), without composing again: a third of a second saved a case."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf, open_dict

    cfg = copy.deepcopy(cfg)
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        assert o.is_force_add() or OmegaConf.select(cfg, o.key_or_group, default="absent") != "absent", o
        with open_dict(cfg):
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True)
    return cfg


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_a_bad_value_is_named_before_anything_is_written(composed, tmp_path, overrides, message):
    cfg = with_values(composed, *overrides)
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg, tmp_path / "run")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "overrides",
    [["sample.temperature=0"], ["trainer.limit_val_batches=0"], ["optim.min_lr_ratio=-3"], ["seed=-1"]],
)
def test_train_refuses_before_the_trainer_starts(make_cfg, tmp_path, overrides):
    """Values once found only at the first validation (or after training) are refused at once."""
    with pytest.raises(ConfigError):
        train(make_cfg(*overrides))
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no event file, nothing


def test_resume_paths_are_checked_before_the_run(make_cfg, tmp_path):
    with pytest.raises(CheckpointError, match="ckpt_path=/no/such.ckpt does not exist"):
        check_train_config(make_cfg("ckpt_path=/no/such.ckpt"), tmp_path / "run")
    with pytest.raises(CheckpointError, match="is a directory without last.ckpt or interrupted.ckpt"):
        check_train_config(make_cfg(f"ckpt_path={tmp_path}"), tmp_path / "run")
    with pytest.raises(DataError, match="data.path=/no/such/input.txt does not exist"):
        check_train_config(make_cfg("data.path=/no/such/input.txt"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_run_directory_whose_checkpoints_folder_cannot_be_written_is_refused_before_the_run(
    make_cfg, tmp_path, monkeypatch
):
    """A checkpoints/ folder that is there and read-only (the run directory itself writable) is
    found before training, not at the first validation's checkpoint."""
    real = tempfile.TemporaryFile

    def read_only_checkpoints(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).name == "checkpoints":
            raise OSError(errno.EACCES, "Permission denied")
        return real(*args, dir=dir, **kwargs)

    run = tmp_path  # make_cfg's run directory: the config's callbacks write to <it>/checkpoints
    (run / "checkpoints").mkdir(parents=True)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_checkpoints)
    with pytest.raises(
        ConfigError,
        match=rf"the run's checkpoints/ folder {run / 'checkpoints'} cannot be written \({run / 'checkpoints'}: Permission denied\)",
    ):
        check_train_config(make_cfg(), run)
    # where the config moves checkpoints, that folder is the one checked
    elsewhere = tmp_path / "elsewhere" / "checkpoints"
    elsewhere.mkdir(parents=True)
    (run / "checkpoints").rmdir()
    cfg = make_cfg(f"callbacks.checkpoint.dirpath={elsewhere}", f"callbacks.on_exception.dirpath={elsewhere}")
    with pytest.raises(ConfigError, match=rf"the run's checkpoints/ folder {elsewhere} cannot be written"):
        check_train_config(cfg, run)


def test_a_default_named_run_is_not_refused_for_the_checkpoints_of_a_run_started_in_the_same_second(make_cfg, tmp_path):
    """Two runs started within one second share the default name: the first may have written its
    checkpoints there before the second is checked, and the second then claims `<name>-2` (the slow
    tests/run/test_rundir.py::test_two_runs_started_together_get_their_own_directories failed so)."""
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"another run's")
    with pytest.raises(ConfigError, match=r"already holds another run's checkpoints \(last.ckpt\)"):
        check_train_config(make_cfg(), tmp_path)  # a directory given with hydra.run.dir
    check_train_config(make_cfg(), tmp_path, claimed_after=True)


def test_an_unwritable_run_directory_is_refused(tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(
        ConfigError,
        match=rf"the run directory x cannot be written \({tmp_path}: a read-only file system\)",
    ):
        check_writable(tmp_path / "a" / "b", "the run directory x")
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        ConfigError, match=f"the run directory y cannot be made: {tmp_path}/file is a file, not a folder"
    ):
        check_writable(tmp_path / "file" / "run", "the run directory y")


def test_a_disk_without_room_for_one_checkpoint_is_refused(make_cfg, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=2 * 2**20))
    with pytest.raises(
        ConfigError, match=r"only 2.0 MiB free on its disk, a checkpoint of this model needs about \d+\.\d MiB"
    ):
        check_train_config(make_cfg(), tmp_path / "run")


def test_a_corpus_with_more_characters_than_int16_holds(tmp_path):
    assert smallest_id_dtype(66) == torch.uint8 and smallest_id_dtype(257) == torch.int16
    assert smallest_id_dtype(40_000) == torch.int32
    text = "".join(chr(0x20000 + i) for i in range(40_000)) * 2  # 40,000 distinct CJK characters
    (tmp_path / "wide.txt").write_text(text, encoding="utf-8")
    dm = CharDataModule(path=str(tmp_path / "wide.txt"), batch_size=2, seq_len=8)
    dm.setup("fit")
    x, y = dm.train_dataloader().dataset.batch(0)
    assert dm.train_ids.dtype == torch.int32 and int(dm.train_ids.max()) == 39_999
    assert dm.tokenizer.decode(x[0]) in text and torch.equal(x[0, 1:], y[0, :-1])


def test_a_tiny_temperature_samples_the_most_likely_character():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9]])
    picks = {int(sample_next(logits, temperature=1e-40)) for _ in range(20)}
    assert picks == {1}


def test_the_mac_preset_asks_for_the_apple_gpu_and_is_refused_where_there_is_none(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("trainer=mps", f"data.path={TINY}", shrink=False)  # (the shrunk config pins the CPU)
    assert (cfg.trainer.accelerator, cfg.trainer.devices, cfg.trainer.precision) == ("mps", 1, "auto")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg, tmp_path / "run")
    assert str(info.value).startswith("trainer.accelerator=mps but torch finds no Apple GPU here")
    assert "use trainer=cpu" in str(info.value) and not (tmp_path / "run").exists()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)  # a Mac: one Apple GPU
    with pytest.raises(ConfigError, match="trainer.devices=2 is invalid; this machine has 1 Apple GPU: use 1 to 1"):
        check_train_config(with_values(cfg, "trainer.devices=2"), tmp_path / "run")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_sampling_on_a_gpu_this_machine_lacks_is_one_line():
    with pytest.raises(ConfigError, match="device=cuda but this machine has no usable GPU; use device=cpu"):
        check_device("cuda")
    with pytest.raises(ConfigError, match="device='gpu0' is not a device name"):
        check_device("gpu0")
    assert check_device("cpu") == torch.device("cpu")


def test_a_command_line_run_checks_its_config_once(tmp_path, monkeypatch):
    """`python train.py …` in-process: the config is checked before the run directory is made and
    not again in train(); the parts' own checks (optimizer, data, corpus source, compile), which
    LitGPT and the datamodule repeat, really run once each."""
    import shakegpt.run.checks as checks_module
    import shakegpt.run.train as train_module
    from shakegpt.commands import train as train_command
    from shakegpt.corpus import check_source
    from shakegpt.hardware import check_compile
    from shakegpt.optim import check_optim
    from shakegpt.training.data import check_data

    from ..conftest import SHRINK, run_here

    calls = []
    real = checks_module.check_train_config

    def counting(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 else kwargs.get("output_dir"))
        return real(*args, **kwargs)

    monkeypatch.setattr(checks_module, "check_train_config", counting)
    monkeypatch.setattr(train_module, "check_train_config", counting)
    parts = (check_optim, check_data, check_source, check_compile)
    for part in parts:
        part.forget()  # earlier tests' values: checked again here
    before = [p.runs for p in parts]
    run_dir = tmp_path / "run"
    r = run_here(train_command.main, *SHRINK, f"hydra.run.dir={run_dir}")
    assert r.returncode == 0, r.stderr[-1500:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert len(calls) == 1 and str(run_dir) in str(calls[0])
    assert [p.runs - b for p, b in zip(parts, before, strict=True)] == [1, 1, 1, 1]


def test_train_called_directly_checks_and_a_mark_is_used_once(make_cfg, tmp_path):
    """A run not started from the command line (a notebook, a sweep job) is checked in train(); a
    directory marked checked is trusted once, then checked again."""
    from shakegpt.run.checks import checked_up_front, take_checked_up_front

    with pytest.raises(ConfigError, match="optim.lr=-1"):
        train(make_cfg("optim.lr=-1"))
    checked_up_front(tmp_path / "b")
    assert take_checked_up_front(tmp_path / "b") and not take_checked_up_front(tmp_path / "b")


def test_a_value_check_remembers_only_what_passed():
    """A bad value is refused every time it is given; a good one, in any key order, runs once."""
    from shakegpt.optim import check_optim

    good = {"lr": 0.00123, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 0}
    good |= {"min_lr_ratio": 0.5, "schedule": "constant", "name": "adamw"}
    runs = check_optim.runs
    check_optim(good)
    check_optim(dict(reversed(list({**good, "betas": (0.9, 0.95)}.items()))))
    assert check_optim.runs == runs + 1
    for _ in range(2):
        with pytest.raises(ConfigError, match="optim.lr=-0.00123"):
            check_optim({**good, "lr": -0.00123})
    check_optim({**good, "lr": 1})  # an int 1 is another value than 0.00123: checked
    assert check_optim.runs == runs + 4


def test_a_logger_whose_library_is_missing_is_named_before_the_run(make_cfg, tmp_path, monkeypatch):
    import sys

    cfg = make_cfg("logger=[tensorboard,mlflow]")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the mlflow extra were not installed
    with pytest.raises(ConfigError) as info:
        check_train_config(cfg, tmp_path / "run")
    assert str(info.value) == "logger=mlflow needs mlflow, which is not installed: pip install 'shakegpt[mlflow]'"
    assert not (tmp_path / "run").exists()
