"""A wheel built from a clean copy of the repository, installed without -e into a new virtual
environment, works from an empty directory: training, sampling, evaluating, exporting, keeping a
run, a preset of the user's own (`--config-dir`), through the console scripts and `python -m shakegpt`."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT, TINY

pytestmark = pytest.mark.slow

TORCH_CPU = "torch==2.13.0"  # the CPU build: installed first, so the wheel's torch range pulls nothing larger

USER_PRESET = """# @package _global_
# a user's own preset, kept outside the package
defaults:
  - override /model/pos_encoding: rope
model:
  vocab_size: 66
  d_model: 32
  n_layer: 1
  n_head: 2
  d_ff: 64
  dropout: 0.0
  bias: false
  tie_weights: false
  max_seq_len: ${data.seq_len}
"""


def run(cmd, cwd, env, timeout=600):
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the new environment's bin/, an environment for subprocesses without the checkout on any path)."""
    tmp = tmp_path_factory.mktemp("install")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    src = tmp / "src"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"), str(src)], tmp, env)
    wheel = next((tmp / "dist").glob("shakegpt-*.whl"))
    run([sys.executable, "-m", "venv", str(tmp / "venv")], tmp, env)
    bin_dir = tmp / "venv" / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", TORCH_CPU], tmp, env, timeout=900)
    run([str(bin_dir / "python"), "-m", "pip", "install", "-q", str(wheel)], tmp, env, timeout=900)
    shutil.rmtree(src)  # nothing of the checkout is left to import from
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return bin_dir, env


def test_the_wheel_works_from_an_empty_directory(installed, tmp_path):
    bin_dir, env = installed
    py = str(bin_dir / "python")
    where = run([py, "-c", "import shakegpt; print(shakegpt.__version__); print(shakegpt.__file__)"], tmp_path, env)
    version, location = where.stdout.split()
    assert version == "0.1.0" and location.startswith(str(bin_dir.parent)), where.stdout
    shrink = [f"data.path={TINY}", "data.seq_len=32", "data.batch_size=4", "trainer.enable_progress_bar=false"]
    steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "sample.num_chars=10"]

    # the help of an installed package: commands that work here, every other command, no docs/ path
    r = run([py, "-m", "shakegpt", "--help"], tmp_path, env)
    assert "python -m shakegpt model=v3" in r.stdout and "docs/" not in r.stdout
    assert "python -m shakegpt sample | evaluate | export | results | bench | gpu-check" in r.stdout

    r = run([py, "-m", "shakegpt", *shrink, *steps, "hydra.run.dir=run"], tmp_path, env)
    assert "--- sample after 2 steps ---" in r.stdout
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()

    r = run([str(bin_dir / "shakegpt-sample"), "ckpt_path=run", "prompt=First", "num_chars=20"], tmp_path, env)
    assert r.stdout.startswith("First") and len(r.stdout) == len("First") + 20 + 1
    r = run([str(bin_dir / "shakegpt-eval"), "ckpt_path=run", f"data.path={TINY}", "out=eval.json"], tmp_path, env)
    assert json.loads((tmp_path / "eval.json").read_text())[0]["step"] == 2
    run([str(bin_dir / "shakegpt-export"), "run", "bundle"], tmp_path, env)
    r = run([py, "-m", "shakegpt", "sample", "ckpt_path=bundle", "prompt=First", "num_chars=20"], tmp_path, env)
    assert r.stdout.startswith("First")

    # keeping a run: into outputs/reference/ under the current directory, not into the installed package
    keep = [py, "-m", "shakegpt", "results", "keep", "run", "--name", "mine-1", "--command", "python -m shakegpt"]
    run(keep, tmp_path, env)
    kept = json.loads((tmp_path / "outputs" / "reference" / "mine-1" / "metrics.json").read_text())
    assert kept["name"] == "mine-1" and kept["steps"] == 2
    assert "| mine-1 |" in run([py, "-m", "shakegpt", "results", "table"], tmp_path, env).stdout
    assert not list(bin_dir.parent.glob("lib/*/site-packages/outputs"))

    # a preset of the user's own, outside the package
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "tiny.yaml").write_text(USER_PRESET)
    cmd = [
        str(bin_dir / "shakegpt-train"),
        "--config-dir",
        "mine",
        "model=tiny",
        *shrink,
        *steps,
        "hydra.run.dir=mine_run",
    ]
    run(cmd, tmp_path, env)
    config = (tmp_path / "mine_run" / ".hydra" / "config.yaml").read_text()
    assert "d_model: 32" in config and "pos_encoding: rope" in config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle", "eval.json", "mine", "mine_run", "outputs", "run"]

    # the SLURM launchers where Hydra looks for launchers, beside (not shadowing) other packages' plugins
    site = next(bin_dir.parent.glob("lib/*/site-packages"))
    assert (site / "hydra_plugins" / "shakegpt_launchers" / "__init__.py").is_file()
    assert not (site / "hydra_plugins" / "__init__.py").exists()  # a namespace package, as Hydra's plugins expect
