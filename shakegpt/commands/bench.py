"""`python -m shakegpt bench`: how fast training steps are on this machine, and why.

For each preset it times three ways of running the same model shape on the same batches:

* naive   the usual PyTorch loop: fp32, eager, dropout inside attention (SDPA's math path) and on the
          residuals with `nn.Dropout`, default (per-tensor) AdamW, gradient clipping;
* fast    shakegpt's own path through the real Lightning `Trainer`, as `train.py` runs it
          (precision=auto, fused AdamW whatever the preset's optimizer, byte-mask dropout, flash
          attention, logging to TensorBoard);
* bare    the fast model and optimizer in a plain PyTorch loop, to show what Lightning costs;
* muon    the bare loop with `optim=muon` (Muon for the blocks' matrices, AdamW for the rest), to
          show what Muon's orthogonalization costs a step against AdamW.

With `--ablation` it times instead one step of each option of the ablation sweep
(`python train.py experiment=ablation`, one change at a time from nanoGPT's recipe) in bare loops
taken in turn, for its table's step-time ratios against the base.

They are interleaved inside one Lightning run (a bare and a muon step, in turn first, after every
Lightning step, a naive step after every `--per-naive` of them), so a noisy machine affects them
alike; ratios come from the medians of one run. MFU divides model FLOPs
(6·N + 12·L·d_model·T per token, N = non-embedding parameters) by the machine's measured matmul peak:
bf16's where the CPU runs bf16 natively (AMX or AVX512-BF16), else fp32's.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from shakegpt.corpus import TINYSHAKESPEARE_VOCAB_SIZE, RandomWindows
from shakegpt.generate import stream
from shakegpt.hardware import cpu_has_fast_bf16, physical_cores, resolve_precision
from shakegpt.model import GPT, GPTConfig
from shakegpt.optim import build_optimizer, own_settings
from shakegpt.run.configs import CONF_DIR
from shakegpt.timing import Loop, flops_per_step, matmul_peak, mfu_peak
from shakegpt.training.data import CharDataModule
from shakegpt.training.module import LitGPT, lr_factor
from shakegpt.training.val_pass import full_val_pass

PRESETS = ("v1", "v2", "v3", "nanogpt")


class Interleave(L.Callback):
    """Times each Lightning step end to end (data, forward, backward, optimizer, logging) and, between
    Lightning steps, runs one step of each loop in `every` (bare, muon) and, every `per_naive`-th
    time, one of the naive loop (before or after them in turn, so none always runs on another's heels)."""

    def __init__(self, naive: Loop, every: list[Loop], per_naive: int, bare_steps: int):
        self.naive, self.every, self.per_naive, self.bare_steps = naive, every, per_naive, bare_steps
        self.times, self.last, self.n = [], None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.times.append(now - self.last)
        k = self.n % len(self.every)  # the every-step loops take turns at going first
        every = self.every[k:] + self.every[:k]
        if self.n >= self.bare_steps:  # the last Lightning step has been timed: nothing more to run
            loops = []
        elif self.n % self.per_naive == 0:
            loops = [self.naive, *every] if (self.n // self.per_naive) % 2 else [*every, self.naive]
        else:
            loops = every
        for loop in loops:
            loop.step()
        self.n += 1
        self.last = time.perf_counter()


def bench_preset(name: str, corpus: Path, steps: int, warmup: int, per_naive: int, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        # AdamW in the Lightning and bare loops whatever optimizer the preset picks (the quickstart: Muon),
        # so that the fast/bare ratio is Lightning's cost alone and the muon loop is the one Muon step
        cfg = compose("train", overrides=[f"model={name}", "optim=adamw", *overrides])
    B, T, seed = cfg.data.batch_size, cfg.data.seq_len, cfg.seed
    dm = CharDataModule(path=str(corpus), batch_size=B, seq_len=T, seed=seed)
    dm.setup("fit")
    mcfg = GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), dm.tokenizer.vocab_size)
    precision = resolve_precision(cfg.trainer.precision, "cpu", mcfg.d_model)
    torch.manual_seed(seed)

    # (a) naive: the same shape written the usual way
    naive_model = GPT(replace(mcfg, attn_dropout=mcfg.dropout, fast_dropout=False))
    naive = Loop(
        naive_model,
        torch.optim.AdamW(naive_model.parameters(), lr=cfg.optim.lr),
        RandomWindows(dm.train_ids, B, T, seed),
        autocast=False,
        clip=cfg.trainer.gradient_clip_val,
    )
    # (c) bare: shakegpt's model and optimizer, no Lightning
    bare_model = GPT(mcfg)
    opt = build_optimizer(bare_model, "adamw", cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    o = cfg.optim
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, cfg.trainer.max_steps, o.min_lr_ratio, o.schedule)
    )
    bare = Loop(
        bare_model,
        opt,
        RandomWindows(dm.train_ids, B, T, seed),
        autocast=precision == "bf16-mixed",
        clip=cfg.trainer.gradient_clip_val,
        sched=sched,
    )
    # (d) muon: the same, with Muon for the blocks' matrices
    muon_model = GPT(mcfg)
    muon = Loop(
        muon_model,
        build_optimizer(muon_model, "muon", cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas),
        RandomWindows(dm.train_ids, B, T, seed),
        autocast=precision == "bf16-mixed",
        clip=cfg.trainer.gradient_clip_val,
    )
    # (b) fast: the real Trainer, interleaving the other two between its steps
    module = LitGPT(model=mcfg.to_dict(), vocab=dm.tokenizer.chars, **OmegaConf.to_container(cfg.optim, resolve=True))
    timer = Interleave(naive, [bare, muon], per_naive, (warmup + steps) * per_naive)
    with tempfile.TemporaryDirectory() as tmp:
        logger = L.pytorch.loggers.TensorBoardLogger(tmp, name="bench", default_hp_metric=False)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=precision,
            max_steps=(warmup + steps) * per_naive + 1,
            limit_val_batches=0,
            logger=logger,
            callbacks=[timer],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            gradient_clip_val=cfg.trainer.gradient_clip_val,
            log_every_n_steps=10,
            use_distributed_sampler=False,
        )
        trainer.fit(module, datamodule=dm)
        # the full validation pass, as training runs it at every val_check_interval
        _, val_seconds = full_val_pass(module.model, dm.val_ids, T, B, precision)

    flops = flops_per_step(mcfg, B, T)
    steps_s = {
        "naive": statistics.median(naive.times[warmup:]),
        "fast": statistics.median(timer.times[warmup * per_naive :]),
        "bare": statistics.median(bare.times[warmup * per_naive :]),
        "muon": statistics.median(muon.times[warmup * per_naive :]),
    }
    return {
        "preset": name,
        "batch_size": B,
        "seq_len": T,
        "precision_fast": precision,
        "params_non_embedding": GPT(mcfg).num_params(non_embedding=True),
        "flops_per_step": flops,
        "step_s": steps_s,
        "raw_step_s": {"naive": naive.times, "fast": timer.times, "bare": bare.times, "muon": muon.times},
        "tokens_per_s": {k: B * T / v for k, v in steps_s.items()},
        "speedup_fast_vs_naive": steps_s["naive"] / steps_s["fast"],
        "lightning_overhead": steps_s["fast"] / steps_s["bare"] - 1,
        "muon_vs_adamw": steps_s["muon"] / steps_s["bare"],
        "val_pass_s": val_seconds,
        "val_windows": (len(dm.val_ids) - 1) // T,
    }


def ablation_options() -> list[str]:
    """The options of the ablation sweep, in its order (conf/experiment/ablation.yaml)."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "experiment" / "ablation.yaml")
    return str(cfg.hydra.sweeper.params.ablation).split(",")


def bench_ablation(corpus: Path, options: list[str], steps: int, warmup: int, overrides: list[str] = ()) -> dict:
    """Seconds per training step (forward, backward, clipping, optimizer) of each ablation option at
    the ablation's shape (or the shape `overrides` set): one bare loop per option, a step of each in turn (each round starting one
    option further on), medians of `steps` after `warmup` rounds; `vs_base` is the ratio to base's."""
    loops, shapes = {}, {}
    for option in options:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("train", overrides=["experiment=ablation", f"ablation={option}", *overrides])
        B, T, o = cfg.data.batch_size, cfg.data.seq_len, cfg.optim
        shapes[option] = {"batch_size": B, "seq_len": T}
        if not loops:
            dm = CharDataModule(path=str(corpus), batch_size=B, seq_len=T, seed=cfg.seed)
            dm.setup("fit")
        mcfg = GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), dm.tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        model = GPT(mcfg)
        opt = build_optimizer(model, o.name, o.lr, o.weight_decay, o.betas, **own_settings(o))
        loops[option] = Loop(
            model,
            opt,
            RandomWindows(dm.train_ids, B, T, cfg.seed),
            autocast=resolve_precision(cfg.trainer.precision, "cpu", mcfg.d_model) == "bf16-mixed",
            clip=cfg.trainer.gradient_clip_val,
        )
    for r in range(warmup + steps):
        k = r % len(options)
        for option in options[k:] + options[:k]:
            loops[option].step()
    step_s = {option: statistics.median(loop.times[warmup:]) for option, loop in loops.items()}
    base = step_s.get("base", next(iter(step_s.values())))
    return {option: {"step_s": s, "vs_base": s / base, **shapes[option]} for option, s in step_s.items()}


def bench_generation(preset: str, num_chars: int) -> dict:
    """Seconds to sample `num_chars` characters at the preset's shape with and without the KV cache
    (cached, full recompute, cached again: the better cached time is kept)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={preset}"])
    torch.manual_seed(0)
    # the vocabulary size only sizes the output: tinyshakespeare's stands for any
    model = GPT(GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), TINYSHAKESPEARE_VOCAB_SIZE)).eval()
    prompt = torch.zeros(1, 1, dtype=torch.long)
    seconds = {"cached": [], "full": []}
    for kind in ("cached", "full", "cached"):
        g = torch.Generator().manual_seed(0)
        t = time.perf_counter()
        for _ in stream(model, prompt, num_chars, generator=g, use_cache=kind == "cached"):
            pass
        seconds[kind].append(time.perf_counter() - t)
    cached, full = min(seconds["cached"]), seconds["full"][0]
    return {
        "preset": preset,
        "num_chars": num_chars,
        "cached_s": cached,
        "full_s": full,
        "speedup": full / cached,
        "cached_chars_per_s": num_chars / cached,
    }


def measure_peaks(native_bf16: bool) -> dict[str, float]:
    """The fp32 and bf16 matmul peaks. Without native bf16 (no AMX or AVX512-BF16) a bf16 matmul is
    emulated, tens of times slower than fp32, so it is measured at one small size only: the full
    sizes would take minutes and the figure only shows that bf16 does not pay there."""
    return {
        "fp32": matmul_peak(torch.float32),
        "bf16": matmul_peak(torch.bfloat16) if native_bf16 else matmul_peak(torch.bfloat16, sizes=(256,)),
    }


def table(results: list[dict], peak: dict[str, float]) -> str:
    head = (
        f"{'preset':<8} {'naive s/step':>12} {'fast s/step':>11} {'bare s/step':>11} {'fast/naive':>10} "
        f"{'Lightning':>9} {'Muon/AdamW':>10} {'fast tok/s':>10} {'MFU fast':>8} {'MFU naive':>9} {'val pass':>8}"
    )
    rows, best = [head, "-" * len(head)], mfu_peak(peak)
    for r in results:
        s = r["step_s"]
        rows.append(
            f"{r['preset']:<8} {s['naive']:>12.3f} {s['fast']:>11.3f} {s['bare']:>11.3f} "
            f"{r['speedup_fast_vs_naive']:>9.1f}x {100 * r['lightning_overhead']:>+8.1f}% {r['muon_vs_adamw']:>9.2f}x "
            f"{r['tokens_per_s']['fast']:>10,.0f} {100 * r['flops_per_step'] / s['fast'] / best:>7.1f}% "
            f"{100 * r['flops_per_step'] / s['naive'] / best:>8.1f}% {r['val_pass_s']:>7.1f}s"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="python -m shakegpt bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated model presets (default: %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="timed naive steps (default: 3; with --ablation 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed naive steps first (default: 1; with --ablation 3)")
    p.add_argument(
        "--per-naive",
        type=int,
        default=2,
        help="fast and bare steps per naive step, timed and warm-up alike (default: %(default)s)",
    )
    p.add_argument("--out", default="bench.json", help="JSON results file (default: %(default)s)")
    p.add_argument("--data", default=None, help="corpus path (default: data.path, $SHAKEGPT_DATA, cache, download)")
    p.add_argument(
        "--gen-chars",
        type=int,
        default=1000,
        help="characters to generate at the v3 shape, with and without KV cache; 0 skips (default: %(default)s)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="time a step of each option of `python train.py experiment=ablation` instead of the presets",
    )
    p.add_argument(
        "overrides", nargs="*", help="Hydra overrides for the shape, e.g. data.batch_size=32 data.seq_len=128"
    )
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 20 if args.ablation else 3  # an ablation step is milliseconds: take more of them
    if args.warmup is None:
        args.warmup = 3 if args.ablation else 1
    presets = [s for s in args.presets.split(",") if s]
    for name in presets:
        if not (Path(CONF_DIR) / "model" / f"{name}.yaml").is_file():
            p.error(f"--presets: unknown preset {name!r}; choose among {', '.join(PRESETS)}, quickstart")
    if args.steps < 1 or args.warmup < 0 or args.per_naive < 1:
        p.error(f"--steps={args.steps} and --per-naive={args.per_naive} must be >= 1, --warmup={args.warmup} >= 0")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    from shakegpt.corpus import resolve_corpus

    corpus = resolve_corpus(args.data)
    torch.set_num_threads(physical_cores())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16: {cpu_has_fast_bf16()}", flush=True
    )
    if args.ablation:
        return _main_ablation(args, corpus)
    peak = measure_peaks(cpu_has_fast_bf16())
    print(f"matmul peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    for name in presets:
        t = time.perf_counter()
        results.append(bench_preset(name, corpus, args.steps, args.warmup, args.per_naive, args.overrides))
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", flush=True)
    generation = bench_generation("v3", args.gen_chars) if args.gen_chars > 0 else None
    print()
    print(table(results, peak))
    if generation:
        g = generation
        print(
            f"\ngeneration, v3 shape, {g['num_chars']} characters: KV cache {g['cached_s']:.2f} s "
            f"({g['cached_chars_per_s']:.0f} chars/s), full recompute {g['full_s']:.2f} s: {g['speedup']:.1f}x"
        )
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "native_bf16": cpu_has_fast_bf16(),
        "peak_flops": peak,
        "steps": args.steps,
        "warmup": args.warmup,
        "per_naive": args.per_naive,
        "overrides": args.overrides,
        "results": results,
        "generation": generation,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwritten: {args.out}")
    return out


def _main_ablation(args, corpus: Path) -> dict:
    steps, warmup = args.steps, args.warmup
    options = ablation_options()
    print(f"ablation: {len(options)} options, {warmup} + {steps} steps each, in turn", flush=True)
    result = bench_ablation(corpus, options, steps, warmup, args.overrides)
    print(f"\n{'option':<13} {'s/step':>8} {'vs base':>8}")
    for option, r in result.items():
        print(f"{option:<13} {r['step_s']:>8.4f} {r['vs_base']:>7.2f}x")
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "warmup": warmup,
        "ablation": result,
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"\nwritten: {args.out}")
    return out


if __name__ == "__main__":
    main()
