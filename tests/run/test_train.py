"""End-to-end runs: what a run writes (TensorBoard, checkpoints, sample), the schedule, exact val loss."""

import itertools
import subprocess
import sys

import pytest
import torch

from shakegpt.commands import train as train_command
from shakegpt.hardware import cpu_has_fast_bf16
from shakegpt.run.hparams import differing, hparams_of
from shakegpt.run.train import train
from shakegpt.training.callbacks import original_log_line
from shakegpt.training.data import CharDataModule
from shakegpt.training.module import LitGPT, lr_factor

from ..conftest import ROOT, SHAKESPEARE_VOCAB, TINY, compose_cfg, run_here
from ..tb import hparams, hparams_view, load_run, scalars, texts


@pytest.fixture
def run(trained_run):
    return trained_run


def test_run_returns_its_metrics(run):
    """What train() returns (and a sweeper minimizes) is what the run logged: the best and the last val loss."""
    out, _, metrics = run
    logged = [v for _, v in scalars(load_run(out), "val/loss")]
    assert len(logged) == 2
    assert metrics["val/loss_best"] == pytest.approx(min(logged)) and metrics["val/loss"] == pytest.approx(logged[-1])


def test_tensorboard_has_scalars_hparams_and_samples(run):
    out, _, metrics = run
    ea = load_run(out)
    tags = set(ea.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/acc",
        "train/bpc",
        "val/loss",
        "val/acc",
        "val/bpc",
        "val/loss_best",
        "train/loss_avg",
        "train/acc_avg",
        "train/lr",
        "wallclock/tokens_per_s",
    ):
        assert tag in tags, tag
    assert "epoch" not in tags and not any(t.startswith("lr-") for t in tags)  # no flat epoch, the lr once
    assert [s for s, _ in scalars(ea, "val/loss")] == [3, 6]  # the steps validated after, as the log line says
    assert scalars(ea, "train/loss")[0][0] == 1  # the first optimizer step is step 1
    assert scalars(ea, "val/loss_best")[-1][1] == pytest.approx(metrics["val/loss_best"])
    params, metric_tags = hparams(ea)
    assert "val/loss_best" in metric_tags and "hp_metric" not in tags
    assert params["model.d_model"] == "128" and params["preset.model"] == "quickstart"  # an integer as its digits
    assert params["model.bias"] is False and params["model.pos_encoding"] == "rope"  # as themselves
    # the vocabulary is the tiny corpus's characters + <unk> (model.vocab_size is derived), and so the size
    vocab_size = len(set(TINY.read_text(encoding="utf-8"))) + 1
    assert int(params["model.vocab_size"]) == vocab_size < SHAKESPEARE_VOCAB
    assert int(params["params_exact"]) == 410_752 - (SHAKESPEARE_VOCAB - vocab_size) * 2 * 128  # embedding and head
    assert int(params["params_original_formula"]) > 0
    samples = texts(ea, "sample/text_summary")
    assert len(samples) == 2 and all(len(t) > 20 for _, t in samples)


def test_checkpoints_reload_without_hydra(run):
    out, _, metrics = run
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-step") for n in ckpts)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)  # plain data only
    assert ckpt["global_step"] == 6 and ckpt["best_val_loss"] == pytest.approx(metrics["val/loss_best"])
    module = LitGPT.load_from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert module.tokenizer.chars == "".join(sorted(set(TINY.read_text())))
    text = module.generate_text("First", 30, seed=1)
    assert len(text) == 30 and text == module.generate_text("First", 30, seed=1)
    assert "\ufffd" not in module.generate_text("\n", 200, temperature=2.0)  # <unk> is never drawn


def test_val_loss_is_the_exact_full_pass(run):
    """The logged val loss equals a hand-computed mean over every non-overlapping window."""
    out, cfg, _ = run
    module = LitGPT.load_from_checkpoint(out / "checkpoints" / "last.ckpt").eval()
    dm = CharDataModule(path=str(TINY), batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len)
    dm.setup("fit")
    ids, T = dm.val_ids.long(), cfg.data.seq_len
    n = (len(ids) - 1) // T
    x = torch.stack([ids[i * T : i * T + T] for i in range(n)])
    y = torch.stack([ids[i * T + 1 : i * T + T + 1] for i in range(n)])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(module(x).flatten(0, 1), y.flatten()).item()
    ea = load_run(out)
    assert scalars(ea, "val/loss")[-1][1] == pytest.approx(loss, abs=1e-5)


def test_lr_schedule():
    # warmup rises linearly, cosine reaches min_ratio at the end and stays there
    f = [lr_factor(s, warmup=10, total=110, min_ratio=0.1, schedule="cosine") for s in range(130)]
    assert f[0] == pytest.approx(1 / 11) and f[9] == pytest.approx(10 / 11)
    assert all(a < b for a, b in itertools.pairwise(f[:11]))
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)
    # a run shorter than its warmup is still well defined
    short = [lr_factor(s, warmup=100, total=5, min_ratio=0.1, schedule="cosine") for s in range(5)]
    assert all(0 < v <= 1 for v in short)
    assert lr_factor(500, warmup=0, total=10, min_ratio=0.0, schedule="constant") == 1.0
    assert lr_factor(0, warmup=0, total=0, min_ratio=0.1, schedule="cosine") == pytest.approx(1.0)


def test_command_line_run_prints_log_line_and_sample(tmp_path):
    """`python train.py` as a user types it (shrunk): the original runs' log line, a sample, the run directory."""
    out = tmp_path / "cli"
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            f"data.path={TINY}",
            "data.seq_len=32",
            "data.batch_size=4",
            "trainer.max_steps=4",
            "trainer.val_check_interval=2",
            "sample.num_chars=25",
            f"hydra.run.dir={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "train.log").read_text()
    assert "T+ 0:00:0" in log and "- step 4/4: train loss " in log and "; t_remain 0:00:00" in log
    # the tiny corpus's vocabulary: 10 characters fewer than tinyshakespeare's, in the embedding and the head
    assert (
        f"parameters: {410_752 - (SHAKESPEARE_VOCAB - len(set(TINY.read_text())) - 1) * 2 * 128:,} exact" in log
    )  # quickstart (RoPE: no position table): the details in the log
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    # the terminal: a short header, the log line without a prefix, the sample, where the run is
    lines = r.stdout.splitlines()
    assert lines[:3] == [
        # on tinyshakespeare 410,752; the tiny corpus's 55 characters (not 65) take 10 rows off the embedding and the head
        "model    quickstart: 408,192 parameters (448,512 by the original runs' formula)",
        f"data     {TINY.name}: {len(TINY.read_text()):,} characters, 55 distinct",
        f"device   1 x cpu, {'bf16-mixed' if cpu_has_fast_bf16() else '32-true'}",
    ]
    log_lines = [line for line in lines if line.startswith("T+ ")]
    assert len(log_lines) == 2 and all(line.startswith("T+ 0:00:0") for line in log_lines)  # no prefix
    assert "--- sample after 4 steps ---" in r.stdout
    # output that is not a terminal: no progress bars' carriage returns, a plain line for the steps instead
    assert "\r" not in r.stdout + r.stderr and "step 4/4: train loss " in r.stdout
    assert lines[-5:] == [
        f"run      {out} (4 steps)",
        (lambda best: f"best     {best} (val loss {best.split('-val')[1].removesuffix('.ckpt')})")(
            next((out / "checkpoints").glob("best-*.ckpt")).name
        ),
        f"watch    tensorboard --logdir {out}",
        f"sample   python -m shakegpt sample ckpt_path={out}",
        f"resume   this run's command + ckpt_path={out} trainer.max_steps=<more>",
    ]
    # TensorBoard's HParams tab: the run by its directory's name, a column for each command-line key
    differs, name, status = hparams_view(load_run(out))
    assert (name, status) == ("cli", "STATUS_SUCCESS")
    assert differs == [
        *("data.path", "data.seq_len", "data.batch_size", "trainer.max_steps"),
        "trainer.val_check_interval",
        "sample.num_chars",
    ]
    for noise in ("GPU available", "TPU available", "Tip", "LeafSpec", "Trainer.fit` stopped", "Seed set"):
        assert noise not in r.stdout + r.stderr, noise


def test_the_original_log_line_and_its_width():
    """The original runs' line, field for field (REFERENCE example), and at most 125 columns at
    v1's 253,104 steps after 42 hours."""
    assert original_log_line(2401, 7657, 9652, 641, 1.5231, 1.69, 0.4141, 0.3893) == (
        "T+ 0:40:01 - step 7657/9652: train loss 1.5231, val loss 1.6900; train acc  0.4141, val acc 0.3893; "
        "t_remain 0:10:41"
    )
    worst = original_log_line(152_803, 253_104, 253_104, 152_803, 11.5231, 11.69, 0.4141, 0.3893)
    assert worst.startswith("T+ 42:26:43 - step 253104/253104") and len(worst) <= 125


@pytest.mark.parametrize(
    ("args", "last_line", "also"),
    [
        (
            ["model.n_head=5"],
            "error: model.d_model=128 is not divisible by model.n_head=5; pick n_head among the divisors of 128",
            [],
        ),
        (["+model.heads=8"], "error: unknown model config key(s) ['heads']; known keys: [", []),
        # what Hydra cannot compose: one line, the nearest choices
        (
            ["model=v4"],
            "error: model=v4: no such option; did you mean v3 or v2? the options of model: nanogpt, quickstart, v1, v2, v3",
            [],
        ),
        (
            ["model/pos_encoding=rotary"],
            "error: model/pos_encoding=rotary: no such option; did you mean rope?",
            [],
        ),
        (
            ["model.heads=8"],
            "error: model.heads is not a key; did you mean model.n_head? (+model.heads=… adds a new one",
            [],
        ),
        (
            ["sample.prompt=Alas!"],
            "error: cannot read 'sample.prompt=Alas!': a value with",
            [
                "needs quotes Hydra can see",
                """e.g. 'prompt="Alas, poor Yorick!"' (single quotes for the shell, double for Hydra)""",
            ],
        ),
    ],
)
def test_command_line_mistakes_are_named_and_leave_no_run_directory(tmp_path, args, last_line, also):
    """In this process (`run_here`): the command line itself runs in a subprocess above."""
    out = tmp_path / "bad"
    r = run_here(train_command.main, f"data.path={TINY}", *args, f"hydra.run.dir={out}", cwd=tmp_path)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-1500:]  # one line
    if last_line:
        assert r.stderr.strip().startswith(last_line), r.stderr[-1500:]
    for text in also:
        assert text in r.stderr, r.stderr[-1500:]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory (or anything else) left behind


def test_a_diverging_run_stops_naming_the_step(make_cfg, tmp_path):
    from shakegpt.errors import DivergedError

    cfg = make_cfg("optim.lr=1e6", "optim.warmup_steps=0", "trainer.gradient_clip_val=null")
    with pytest.raises(DivergedError, match=r"the training loss is (nan|inf) at step \d+: training stopped"):
        train(cfg)
    assert not (tmp_path / "checkpoints" / "interrupted.ckpt").exists()  # no checkpoint of diverged weights


def test_the_keys_that_set_a_run_apart_come_first_in_its_hparams(tmp_path):
    """Overrides name keys as Hydra writes them; each becomes a column of the HParams tab, found or
    added with its value, a preset as preset.<group>; Hydra's own keys are left out."""
    cfg = compose_cfg(tmp_path, "trainer.val_check_interval=7")
    choices = {"model": "quickstart", "data": "default"}
    params = hparams_of(cfg, choices)
    keys = ["optim.lr", "model/pos_encoding", "trainer.val_check_interval", "data", "+hydra.run.dir", "model"]
    assert differing(params, cfg, choices, keys) == [
        "optim.lr",
        "model.pos_encoding",
        "trainer.val_check_interval",
        "preset.data",
        "preset.model",
    ]
    assert params["trainer.val_check_interval"] == 7 and params["preset.data"] == "default"
    assert not any(k.startswith("hydra") for k in params)
