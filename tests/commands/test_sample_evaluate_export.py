"""The sample, evaluate and export commands: the same text for the same seed, the numbers training
logged, bundles, and one line for each mistake."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from shakegpt.commands import evaluate as evaluate_command
from shakegpt.commands import sample as sample_command
from shakegpt.commands.evaluate import evaluate, evaluate_checkpoint
from shakegpt.commands.results import plot
from shakegpt.errors import CheckpointError, ConfigError, DataError
from shakegpt.training.checkpoint import (
    export_bundle,
    load_bundle,
    model_from_checkpoint,
    resolve_checkpoint,
    val_loss_of,
)

from ..conftest import ROOT, TINY, run_here
from ..tb import load_run, scalars


@pytest.mark.parametrize("command", ["shakegpt.commands.sample", "shakegpt.commands.evaluate"])
def test_sampling_and_evaluating_import_neither_torch_nor_lightning_to_check_values(command):
    """They check their values before importing torch (so a mistake is refused at once), and need
    the model, the tokenizer and the corpus only: never Lightning or the training entry."""
    code = (
        f"import sys, {command}; "
        "loaded = {m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'pytorch_lightning', 'torchmetrics'}; "
        "assert not loaded and 'shakegpt.run.train' not in sys.modules, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
    bad = ["temperature=0"] if command == "shakegpt.commands.sample" else ["precision='fp8'"]
    r = subprocess.run(
        [sys.executable, "-m", command, "ckpt_path=x", *bad], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(f"error: {bad[0]}"), r.stderr


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "shakegpt.commands.sample"],
        ["-m", "shakegpt.commands.evaluate"],
        pytest.param(["train.py"], marks=pytest.mark.slow),
    ],
)
def test_a_missing_checkpoint_is_refused_without_torch(tmp_path, command):
    """A mistyped ckpt_path is told before torch is imported (seconds sooner): here torch cannot even
    be imported, and each command still names the path."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('torch was imported')\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    r = subprocess.run(
        [sys.executable, *command, "ckpt_path=/no/such.ckpt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "error: ckpt_path=/no/such.ckpt does not exist; give a .ckpt file or a run directory"
    ), r.stderr[-1500:]


def sample_cli(*args, cwd=ROOT):
    """`python -m shakegpt.commands.sample args…` in a subprocess: the command line itself."""
    return subprocess.run(
        [sys.executable, "-m", "shakegpt.commands.sample", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def sample_here(*args, cwd=None):
    """The same command run in this process (`run_here`)."""
    return run_here(sample_command.main, *args, cwd=cwd)


def test_sample_cli_streams_the_same_text_for_the_same_seed(trained_run, tmp_path):
    out, _, _ = trained_run
    runs = [sample_here(f"ckpt_path={out}", "prompt=First Keeper:", "num_chars=60", "seed=3") for _ in range(2)]
    assert runs[0].returncode == 0, runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("First Keeper:")
    assert len(runs[0].stdout) == len("First Keeper:") + 60 + 1
    other = sample_here(f"ckpt_path={out}", "prompt=First Keeper:", "num_chars=60", "seed=4")
    assert other.stdout != runs[0].stdout
    # the exported bundle writes exactly what its checkpoint writes
    export_bundle(out, tmp_path / "b")
    assert (
        sample_here(f"ckpt_path={tmp_path / 'b'}", "prompt=First Keeper:", "num_chars=60", "seed=3").stdout
        == runs[0].stdout
    )
    # several samples, nucleus sampling, a prompt file
    (tmp_path / "p.txt").write_text("Second Keeper:\n")
    here = tmp_path / "cwd"
    here.mkdir()
    many = sample_cli(
        f"ckpt_path={out}", f"prompt_file={tmp_path / 'p.txt'}", "num_samples=2", "top_p=0.9", "num_chars=20", cwd=here
    )
    assert many.returncode == 0 and many.stdout.count("--- sample") == 2 and "Second Keeper:" in many.stdout
    assert list(here.iterdir()) == []  # sampling writes nothing where it runs: no run directory, no log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["temperature=0"], "error: temperature=0 is invalid; it must be > 0"),
        (["top_k=0"], "error: top_k=0 is invalid"),
        (["top_p=2"], "error: top_p=2 is invalid"),
        (["prompt=" + "x" * 40], "error: the prompt has 40 characters, more than the model's context"),
        (
            ["prompt='a\u20ac\u00e9'"],
            "error: the prompt has characters outside the model's vocabulary: ['\u00e9', '\u20ac']",
        ),
    ],
)
def test_sample_cli_bad_values_are_one_line(trained_run, args, message):
    out, _, _ = trained_run
    r = sample_here(f"ckpt_path={out}", *args)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr[-1500:]


def test_sample_cli_can_read_unknown_prompt_characters_as_unk(trained_run):
    out, _, _ = trained_run
    r = sample_here(f"ckpt_path={out}", "prompt='\u00e9'", "allow_unk=true", "num_chars=5")
    assert r.returncode == 0 and r.stdout.startswith("\u00e9") and len(r.stdout.rstrip("\n")) == 6, r.stderr[-800:]


def test_sample_cli_missing_checkpoint(tmp_path):
    r = sample_here(f"ckpt_path={tmp_path / 'none.ckpt'}")
    assert r.returncode == 1 and r.stderr.strip().endswith("does not exist; give a .ckpt file or a run directory")


def test_eval_gives_the_numbers_training_logged(trained_run):
    out, cfg, _ = trained_run
    logged = dict(scalars(load_run(out), "val/loss"))  # {step: val loss}
    best = resolve_checkpoint(out)
    step = torch.load(best, weights_only=True)["global_step"]
    data = {"path": str(TINY), "batch_size": cfg.data.batch_size, "seq_len": None}
    row = evaluate_checkpoint(best, data, precision="32-true")
    assert row["step"] == step and row["val_loss"] == pytest.approx(logged[step], abs=1e-6)
    n_val = len(TINY.read_text()) - int(len(TINY.read_text()) * 0.9)
    assert row["seq_len"] == 32 and row["val_windows"] == (n_val - 1) // 32


def test_eval_cli_table_and_json(trained_run, tmp_path):
    out, _, _ = trained_run
    js = tmp_path / "eval.json"
    r = run_here(
        evaluate_command.main,
        f"ckpt_path=[{out},{out}/checkpoints/last.ckpt]",
        f"data.path={TINY}",
        "data.batch_size=4",
        f"out={js}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "val loss" in r.stdout and "last pos" in r.stdout and r.stdout.count(".ckpt") == 2
    rows = json.loads(js.read_text())
    assert all(f"{row['val_loss_last']:.4f}" in r.stdout for row in rows)  # the last-position loss, per checkpoint
    assert len(rows) == 2 and rows[0]["step"] in (3, 6) and rows[1]["step"] == 6
    assert rows[0]["val_loss"] <= rows[1]["val_loss"]  # the run directory means its best checkpoint


def test_export_never_replaces_a_bundle_without_force(trained_run, tmp_path):
    out, _, _ = trained_run
    bundle = export_bundle(out, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    with pytest.raises(
        CheckpointError, match=f"{bundle} already holds an export .*; choose another folder, or pass --force"
    ):
        export_bundle(out / "checkpoints" / "last.ckpt", bundle)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before
    export_bundle(out / "checkpoints" / "last.ckpt", bundle, overwrite=True)
    assert sorted(p.name for p in bundle.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert load_bundle(bundle)[1].chars == load_bundle(tmp_path / "b")[1].chars


def test_export_to_an_unwritable_place_is_one_line(trained_run, tmp_path):
    out, _, _ = trained_run
    (tmp_path / "file").write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "shakegpt.commands.export", str(out), str(tmp_path / "file" / "bundle")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"error: the export could not be written to {tmp_path / 'file' / 'bundle'}: Not a directory"
    ], r.stderr


def test_eval_refuses_a_corpus_outside_the_vocabulary(trained_run, tmp_path):
    out, _, _ = trained_run
    other = tmp_path / "other.txt"
    other.write_text("0123456789 " * 200)  # digits: none in the tiny corpus
    data = {"path": str(other), "batch_size": 4, "seq_len": None}
    with pytest.raises(DataError, match=r"^9\d\.\d% of the validation characters of .* are outside the vocabulary of"):
        evaluate_checkpoint(out, data, precision="32-true")
    row = evaluate_checkpoint(out, data, precision="32-true", allow_unk=True)
    assert 0.9 < row["unk_share"] < 1
    assert evaluate_checkpoint(out, {**data, "path": str(TINY)}, precision="32-true")["unk_share"] == 0


def eval_cfg(run, out):
    """The evaluate command's config for `run` on the tiny corpus, its table written to `out`."""
    data = {"path": str(TINY), "batch_size": 4, "seq_len": None}
    return OmegaConf.create({"ckpt_path": str(run), "data": data, "precision": "32-true", "out": str(out), "seed": 0})


def test_eval_out_that_cannot_be_written_is_refused_before_evaluating(trained_run, tmp_path, monkeypatch):
    out, _, _ = trained_run
    (tmp_path / "file").write_text("x")
    evaluated = []
    monkeypatch.setattr("shakegpt.commands.evaluate.evaluate_checkpoint", lambda *a, **k: evaluated.append(a))
    cfg = eval_cfg(out, tmp_path / "file" / "eval.json")
    with pytest.raises(ConfigError, match=f"out={tmp_path}/file/eval.json cannot be made: {tmp_path}/file is a file"):
        evaluate(cfg)
    assert evaluated == []
    cfg.out = str(tmp_path)  # a directory: refused at once, not after the work
    with pytest.raises(
        ConfigError, match=f"out={tmp_path} is a directory; give a file name, e.g. out={tmp_path}/eval.json"
    ):
        evaluate(cfg)
    assert evaluated == []


def test_eval_out_in_a_folder_not_made_yet_is_written(trained_run, tmp_path):
    out, _, _ = trained_run
    cfg = eval_cfg(out, tmp_path / "results" / "eval.json")
    rows = evaluate(cfg)
    assert json.loads((tmp_path / "results" / "eval.json").read_text()) == rows


def test_a_plot_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=f"--out {tmp_path}/file/plot.png could not be written"):
        plot(ROOT / "outputs" / "reference", tmp_path / "file" / "plot.png")
    with pytest.raises(
        ConfigError, match=f"--out {tmp_path} is a folder; give an image file, e.g. --out {tmp_path}/results.png"
    ):
        plot(ROOT / "outputs" / "reference", tmp_path)
    with pytest.raises(
        ConfigError, match=r"--out x.xyz: .xyz is not an image format matplotlib writes; end the name in one of .*\.png"
    ):
        plot(ROOT / "outputs" / "reference", "x.xyz")
    assert not (tmp_path / "results.png").exists() and not Path("x.xyz").exists()


def test_a_plot_without_matplotlib_is_one_line(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(ConfigError, match=r"^plots need matplotlib, which is not installed: pip install matplotlib"):
        plot(ROOT / "outputs" / "reference", "x.png")


def test_evaluate_accepts_exactly_the_precisions_the_val_pass_runs():
    """evaluate checks precision names before importing torch: its list must be the pass's own."""
    from shakegpt.commands.evaluate import PRECISIONS
    from shakegpt.training.val_pass import AUTOCAST, CAST

    assert set(PRECISIONS) == {"auto", *AUTOCAST, *CAST}


@pytest.mark.parametrize("prompt", ["ROMEO:", "Alas, poor Yorick!", "ROMEO 🙂:", "a = (b) [c] {d}"])
def test_a_prompt_quoted_for_hydra_is_taken_as_typed(trained_run, prompt):
    """`'prompt="…"'`: what users type (commas, !, :, brackets, emoji) reaches the model as typed;
    characters the model does not know are named, or read as <unk> with allow_unk=true."""
    out, _, _ = trained_run
    r = sample_here(f"ckpt_path={out}", f'prompt="{prompt}"', "num_chars=5", "allow_unk=true")
    assert r.returncode == 0 and r.stdout.startswith(prompt), r.stderr[-800:]
    if "🙂" in prompt:
        r = sample_here(f"ckpt_path={out}", f'prompt="{prompt}"', "num_chars=5")
        assert r.returncode == 1 and "outside the model's vocabulary: ['R', '🙂']" in r.stderr.strip().splitlines()[-1]


def test_sample_and_evaluate_name_an_unknown_key_in_one_line(tmp_path):
    for command, typo, meant in (
        (sample_command, "temprature", "temperature"),
        (evaluate_command, "precison", "precision"),
    ):
        r = run_here(command.main, "ckpt_path=x", f"{typo}=1")
        assert r.returncode == 1 and r.stderr.strip().splitlines() == [
            f"error: {typo} is not a key; did you mean {meant}? (+{typo}=… adds a new one; --cfg job lists them all)"
        ]


def test_evaluate_takes_an_exported_bundle_as_sample_does(trained_run, tmp_path):
    out, _, _ = trained_run
    bundle = export_bundle(out, tmp_path / "bundle")
    data = {"path": str(TINY), "batch_size": 4, "seq_len": None}
    from_bundle = evaluate_checkpoint(bundle, data, precision="32-true")
    from_ckpt = evaluate_checkpoint(out, data, precision="32-true")
    assert from_bundle["val_loss"] == pytest.approx(from_ckpt["val_loss"], abs=1e-6) and from_bundle["step"] is None
    r = run_here(evaluate_command.main, f"ckpt_path={bundle}", f"data.path={TINY}", "data.batch_size=4")
    assert r.returncode == 0 and f"{from_bundle['val_loss']:.4f}" in r.stdout, r.stderr[-1500:]


@pytest.fixture(scope="module")
def exportable_run(tmp_path_factory):
    """A shrunk run of an original shakeGPT preset (v3: learned positions, GELU, LayerNorm), which
    transformers' GPT-2 computes exactly, trained two steps through `python train.py`'s own path."""
    from shakegpt.commands import train as train_command_module

    out = tmp_path_factory.mktemp("v3run")
    overrides = ["model=v3", "model.d_model=32", "model.n_head=4", "model.d_ff=64", "model.n_layer=2"]
    shrink = [
        f"data.path={TINY}",
        "data.batch_size=4",
        "data.seq_len=32",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.enable_progress_bar=false",
        "sample.num_chars=0",
        "callbacks.text_sample.num_chars=0",
        f"hydra.run.dir={out}",
    ]
    r = run_here(train_command_module.main, *overrides, *shrink, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return out, overrides


def test_export_hf_writes_what_transformers_loads_without_shakegpt(exportable_run, tmp_path):
    from shakegpt.commands import export as export_command

    out, overrides = exportable_run
    dest = tmp_path / "hf"
    r = run_here(export_command.main, str(out), str(dest), "--format", "hf")
    assert r.returncode == 0 and f"written: {dest}" in r.stdout, r.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in dest.iterdir()}
    card = (dest / "README.md").read_text()
    model, tokenizer, ckpt = model_from_checkpoint(out)
    assert 1.0 < val_loss_of(ckpt) < 10.0  # the callback's score, as the run logged it
    assert f"val loss (nats per character): {val_loss_of(ckpt):.4f}, at step 2" in card
    assert "trained with: `python train.py " + " ".join(overrides) in card
    # in a fresh interpreter where shakegpt cannot be imported: transformers alone loads and generates
    text = TINY.read_text()[:24]  # characters of the run's vocabulary (the tiny corpus's)
    code = f"""
import sys, json
sys.modules["shakegpt"] = None  # any import of shakegpt now fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained({str(dest)!r}).eval()
tok = AutoTokenizer.from_pretrained({str(dest)!r})
ids = tok({text!r}, return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits
gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.unk_token_id)
print(json.dumps({{"ids": ids[0].tolist(), "logits": logits[0].tolist(), "generated": tok.decode(gen[0])}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ids"] == tokenizer.encode(text).tolist()
    with torch.no_grad():
        ours = model(tokenizer.encode(text)[None])[0]
    torch.testing.assert_close(torch.tensor(got["logits"]), ours, atol=1e-5, rtol=0)
    assert got["generated"].startswith(text) and len(got["generated"]) == len(text) + 5


def test_export_hf_refuses_a_model_without_counterpart_and_an_earlier_export(trained_run, exportable_run, tmp_path):
    from shakegpt.commands import export as export_command

    out, _, _ = trained_run  # the quickstart: RoPE with per-head QK-norm, which GPT-NeoX lacks
    r = run_here(export_command.main, str(out), str(tmp_path / "q"), "--format", "hf")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: model.qk_norm=true has no exact counterpart in transformers' gpt_neox (which this model's "
        "model.pos_encoding=rope maps to); export it as a shakegpt bundle (--format bundle) instead"
    ]
    assert not (tmp_path / "q").exists()
    dest = export_bundle(exportable_run[0], tmp_path / "b")  # a bundle there already: config.json, tokenizer.json
    r = run_here(export_command.main, str(exportable_run[0]), str(dest), "--format", "hf")
    assert (
        r.returncode == 1
        and "already holds an export (config.json, model.safetensors, tokenizer.json); choose another" in r.stderr
    )
    r = run_here(export_command.main, str(exportable_run[0]), str(dest), "--format", "hf", "--force")
    assert r.returncode == 0 and "gpt2" in (dest / "config.json").read_text()


def test_export_hf_without_transformers_installed_says_which_extra(exportable_run, tmp_path, monkeypatch):
    from shakegpt.commands import export as export_command

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    r = run_here(export_command.main, str(exportable_run[0]), str(tmp_path / "hf"), "--format", "hf")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        "error: --format hf needs the transformers and tokenizers libraries: pip install 'shakegpt[hf]'"
    ]
    assert not (tmp_path / "hf").exists()
