"""The ablation sweep (`python train.py experiment=ablation`): one change at a time from its base,
its step-time benchmark, and its table and plot."""

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from shakegpt.commands import bench
from shakegpt.commands.results import ablation_table, main, plot_ablation
from shakegpt.errors import ConfigError
from shakegpt.run.train import train

from ..conftest import CONF, TINY

OPTIONS = str(OmegaConf.load(CONF / "experiment" / "ablation.yaml").hydra.sweeper.params.ablation).split(",")

# what each option changes from base, and nothing else (swiglu's narrower hidden layer keeps its size)
CHANGES = {
    "base": {},
    "rope": {"model.pos_encoding": "rope", "model.rope_base": 10000.0},
    "rmsnorm": {"model.norm": "rmsnorm"},
    "relu2": {"model.mlp": "relu2"},
    "swiglu": {"model.mlp": "swiglu", "model.d_ff": 344},
    "qk_norm": {"model.qk_norm": True},
    "softcap": {"model.logit_softcap": 30},
    "zero_init": {"model.zero_init_proj": True},
    "muon": {"optim.name": "muon", "optim.muon_momentum": 0.95},  # Muon and its own setting
    "weight_decay": {"optim.weight_decay": 1.0},
}


def flat(cfg) -> dict:
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def test_each_option_changes_one_thing_from_nanogpts_cpu_recipe(make_cfg):
    base = flat(make_cfg("experiment=ablation", "ablation=base", shrink=False))
    # the base: nanoGPT's CPU recipe (its README), with the rest of train_shakespeare_char
    assert {k: base[k] for k in ("model.n_layer", "model.n_head", "model.d_model", "model.d_ff")} == {
        "model.n_layer": 4,
        "model.n_head": 4,
        "model.d_model": 128,
        "model.d_ff": 512,
    }
    assert (base["data.batch_size"], base["data.seq_len"], base["trainer.max_steps"], base["model.dropout"]) == (
        12,
        64,
        2000,
        0.0,
    )
    assert (base["optim.lr"], base["optim.min_lr_ratio"], base["optim.warmup_steps"], base["optim.betas"]) == (
        1e-3,
        0.1,
        100,
        [0.9, 0.99],
    )
    assert base["model.pos_encoding"] == "learned" and base["model.tie_weights"] and not base["model.bias"]
    assert set(OPTIONS) == set(CHANGES) | {"modded"}
    for option in OPTIONS:
        cfg = flat(make_cfg("experiment=ablation", f"ablation={option}", shrink=False))
        changed = {k: cfg.get(k) for k in set(cfg) | set(base) if cfg.get(k) != base.get(k)}
        if option == "modded":  # everything modded-nanogpt changed, together
            expected = {**CHANGES["rope"], **CHANGES["rmsnorm"], **CHANGES["relu2"], **CHANGES["muon"]}
            expected |= {**CHANGES["qk_norm"], **CHANGES["softcap"], **CHANGES["zero_init"]}
            assert changed == expected
        else:
            assert changed == CHANGES[option], option


def test_the_sweep_has_two_seeds_and_one_option_runs_alone(make_cfg):
    params = OmegaConf.load(CONF / "experiment" / "ablation.yaml").hydra.sweeper.params
    assert str(params.seed).split(",") == ["1337", "1338"]
    metrics = train(make_cfg("experiment=ablation", "ablation=modded"))
    assert math.isfinite(metrics["val/loss_best"])


def test_bench_times_every_option_against_base(tmp_path, capsys):
    out = tmp_path / "bench.json"
    shape = ["data.batch_size=2", "data.seq_len=16"]  # seconds less than the ablation's own shape
    bench.main(["--ablation", "--steps", "2", "--warmup", "0", "--data", str(TINY), "--out", str(out), *shape])
    result = json.loads(out.read_text())["ablation"]
    assert list(result) == OPTIONS
    assert result["base"]["vs_base"] == 1.0 and all(r["step_s"] > 0 for r in result.values())
    assert all((r["batch_size"], r["seq_len"]) == (2, 16) for r in result.values())
    assert result["muon"]["vs_base"] == result["muon"]["step_s"] / result["base"]["step_s"]
    printed = capsys.readouterr().out
    assert all(f"\n{option} " in printed for option in OPTIONS)


def fake_ablation(root: Path, jobs) -> Path:
    """A sweep directory whose jobs wrote val losses as training writes them."""
    from torch.utils.tensorboard import SummaryWriter

    sweep = root / "sweep"
    for num, (option, seed, losses) in enumerate(jobs):
        job = sweep / f"{num}_ablation={option},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- experiment=ablation\n- ablation={option}\n- seed={seed}\n")
        if losses:
            with SummaryWriter(job) as w:
                for i, v in enumerate(losses):
                    w.add_scalar("val/loss", v, 100 * (i + 1))
    return sweep


def test_the_table_compares_each_change_with_base_over_its_seeds(tmp_path):
    sweep = fake_ablation(
        tmp_path,
        [
            ("base", 1, [2.9, 2.5, 2.2, 2.0]),
            ("base", 2, [2.9, 2.5, 2.3, 2.2]),
            ("muon", 1, [2.8, 2.3, 2.0, 1.9]),
            ("muon", 2, [2.8, 2.4, 2.0, 1.8]),
            ("rope", 1, [2.9, 2.6, 2.3, 2.15]),
            ("rope", 2, [2.9, 2.6]),  # stopped early: listed, not in the mean
            ("softcap", 1, None),  # failed before validating
        ],
    )
    (tmp_path / "bench.json").write_text(
        json.dumps({"ablation": {"base": {"vs_base": 1.0}, "muon": {"vs_base": 1.25}, "rope": {"vs_base": 0.9}}})
    )
    rows = ablation_table(sweep, tmp_path / "bench.json").splitlines()
    assert rows[0].split(" | ")[2:] == ["best val loss by seed", "mean", "spread", "vs base", "step time vs base |"]
    cells = {r.split(" | ")[0][2:]: r.split(" | ")[2:] for r in rows[2:]}
    assert list(cells) == ["base", "muon", "rope", "softcap"]  # the sweep's order
    assert cells["base"] == ["2.0000, 2.2000", "2.1000", "0.2000", "—", "1.00x |"]
    assert cells["muon"] == ["1.9000, 1.8000", "1.8500", "0.1000", "-0.2500", "1.25x |"]
    assert cells["rope"][0] == "2.1500, 2.6000 (1 stopped before step 400: not in the mean)"
    assert cells["rope"][1:] == ["2.1500", "0.0000", "+0.0500", "0.90x |"]
    assert cells["softcap"] == ["failed", "—", "—", "—", "— |"]
    assert "Muon for the blocks' matrices" in rows[3]  # what the change is, from its config file
    assert "(344 instead of 512)" in ablation_table(
        fake_ablation(tmp_path / "s", [("base", 1, [2.0]), ("swiglu", 1, [2.0])])
    )
    assert "step time" not in ablation_table(sweep).splitlines()[0]  # without --bench: no such column
    fig = plot_ablation(sweep)
    labels = fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["base (2 seeds)", "muon (2 seeds)", "rope (1 seed)"]
    base_line = fig.axes[0].get_lines()[0]
    assert list(base_line.get_ydata()) == pytest.approx([2.9, 2.5, 2.25, 2.1]) and base_line.get_color() == "black"
    lo, hi = fig.axes[1].get_ylim()
    assert lo < 1.85 and 2.6 < hi < 2.8  # the zoom: the second half's mean losses (from step 200)
    main(["ablation", str(sweep), "--out", str(tmp_path / "a.png")])
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_a_sweep_that_is_not_an_ablation_is_named(tmp_path):
    sweep = fake_ablation(tmp_path, [("muon", 1, [2.0])])
    with pytest.raises(ConfigError, match="no ablation=base job"):
        ablation_table(sweep)
    (sweep / "0_ablation=muon,seed=1" / ".hydra" / "overrides.yaml").write_text("- optim.lr=0.1\n")
    with pytest.raises(ConfigError, match="has no ablation=… override"):
        ablation_table(sweep)
    (tmp_path / "bad.json").write_text("{}")
    sweep = fake_ablation(tmp_path / "2", [("base", 1, [2.0])])
    with pytest.raises(ConfigError, match="--bench .*bad.json: not a `python -m shakegpt bench --ablation` result"):
        ablation_table(sweep, tmp_path / "bad.json")
