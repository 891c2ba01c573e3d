"""Shared fixtures: the tiny corpus, the real corpus, and the real Hydra config shrunk for tests."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from shakegpt.corpus import TINYSHAKESPEARE_VOCAB_SIZE

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest` runs a worker per core (-n auto): one torch thread each, or their thread pools fight
    # over the cores; train() and the commands' subprocesses keep what OMP_NUM_THREADS says
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
TINY = Path(__file__).resolve().parent / "fixtures" / "tiny_corpus.txt"
SHARED = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
PRESETS = ("quickstart", "v1", "v2", "v3", "nanogpt")

# overrides that make any preset a seconds-long CPU run on the tiny corpus
# what the presets' model.vocab_size (null: the corpus's characters + <unk>) becomes on tinyshakespeare
SHAKESPEARE_VOCAB = TINYSHAKESPEARE_VOCAB_SIZE

SHRINK = [
    f"data.path={TINY}",
    "data.batch_size=4",
    "data.seq_len=32",
    "trainer.accelerator=cpu",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "sample.num_chars=20",
    "callbacks.text_sample.num_chars=20",
]


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests seed and thread-count the process; give the next test the state this one found."""
    rng, threads = torch.get_rng_state(), torch.get_num_threads()
    env = dict(os.environ)
    yield
    torch.set_rng_state(rng)
    torch.set_num_threads(threads)
    os.environ.clear()
    os.environ.update(env)


@pytest.fixture
def tiny_corpus() -> Path:
    return TINY


@pytest.fixture(scope="session")
def real_corpus() -> Path:
    """The real tinyshakespeare: $SHAKEGPT_DATA, else ../shared beside the repo, else the cache/download."""
    from shakegpt.corpus import resolve_corpus

    if os.environ.get("SHAKEGPT_DATA"):
        return Path(os.environ["SHAKEGPT_DATA"])
    if SHARED.is_file():
        return SHARED
    return resolve_corpus()


def run_here(main, *args: str, cwd: Path | None = None) -> SimpleNamespace:
    """A command's `main()` run in this process as `python -m <command> args…` would run it, with its
    return code, standard output and standard error: seconds faster than a subprocess, so each
    command line gets one subprocess test and its other cases run here."""
    out, err = io.StringIO(), io.StringIO()
    argv, handlers = sys.argv, logging.getLogger().handlers[:]
    sys.argv = ["shakegpt", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(cwd or Path.cwd()):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            err.write(e.code + "\n")  # what the interpreter prints for SystemExit("error: …")
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        logging.getLogger().handlers[:] = handlers
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def compose_cfg(output_dir: Path, *overrides: str, shrink: bool = True) -> DictConfig:
    """The real `conf/train.yaml` composed as `python train.py <overrides>` would, with outputs in
    `output_dir` and (by default) shrunk to a seconds-long run on the tiny corpus."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[*(SHRINK if shrink else []), *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    def make(*overrides: str, shrink: bool = True) -> DictConfig:
        return compose_cfg(tmp_path, *overrides, shrink=shrink)

    return make


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One shrunk quickstart run (6 steps, validations at 3 and 6) that several tests read:
    (run directory, its config, the metrics train() returned)."""
    from shakegpt.run.train import train

    out = tmp_path_factory.mktemp("run")
    # fp32, so that the val loss can be compared with a hand computation to 1e-5
    cfg = compose_cfg(out, "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.precision=32-true")
    metrics = train(cfg, {"model": "quickstart", "model/pos_encoding": "rope"})
    return out, cfg, metrics


def train_command(out: Path, *args: str) -> list[str]:
    """`python train.py` shrunk to the tiny corpus, writing to `out`; run it with cwd=ROOT."""
    return [
        sys.executable,
        "train.py",
        f"data.path={TINY}",
        "data.seq_len=32",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={out}",
        *args,
    ]


def start_training(out: Path, *args: str) -> subprocess.Popen:
    """`train_command(out, *args)` started in the background, stdout discarded, stderr kept."""
    return subprocess.Popen(
        train_command(out, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_log(out: Path, text: str, seconds: float = 120) -> None:
    """Wait until the run writing to `out` has logged `text` (e.g. its first validation line)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if (out / "train.log").is_file() and text in (out / "train.log").read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} did not appear in {out / 'train.log'} within {seconds} s")
