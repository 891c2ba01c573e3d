"""`python -m shakegpt gpu-check`: everything a lent GPU should run, in one go.

On one CUDA GPU, within a budget of running time (`--minutes`, default 5, so that a rerun fits in a
short loan), writing into `--out` as it goes:

1. `env.json`: the GPU, the torch and CUDA versions, and the measured bf16 and fp32 matmul peaks;
2. `runs/v2-original`, `runs/v3-original`: the original v2 and v3 recipes,
   `python train.py model=v2|v3 trainer.accelerator=gpu`, to their full step counts (7,270 and
   7,657), and `runs/v2-seqnorm`, `runs/v3-seqnorm`: the same with the original runs' own norm
   (`model/norm=seq_layernorm`); all at once (small models share the GPU; `--runs` picks fewer),
   each stopped by `trainer.max_time` if the budget runs out; each keeps its small results (events,
   config, log, sample), not its checkpoints;
3. `pytest-gpu.txt`: `pytest -m gpu` (the GPU tests), while the runs train;
4. `bench-gpu.json`: once the runs are done, for v1, v2, v3 and nanogpt, eager and compiled: time
   per training step of a bare loop (bf16 autocast, fused AdamW), tokens/s and MFU against the
   measured peak; and at v3, eager, the step through Lightning's Trainer, alone and with DDP on
   one device, to say what each adds.

After each part the archive `gpu-check.tar.gz` in `--out` is written again, so a check cut short
still leaves what it finished. `python -m shakegpt results keep <out>/gpu-check.tar.gz --member
v3-original --name v3-gpu --command "python train.py …"` keeps a run from it.

`--dry-run` runs the same flow on the CPU at tiny sizes (the tiny corpus, a few steps, and
torch.compile with its eager backend instead of generating kernels), so the flow is tested anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import torch

from shakegpt.timing import Loop, flops_per_step, matmul_peak, mfu_peak, sync

ARCHIVE = "gpu-check.tar.gz"
# the original v2 and v3 recipes as configured (causal), and with the original runs' own norm
RUNS = {
    "v2-original": ["model=v2"],
    "v3-original": ["model=v3"],
    "v2-seqnorm": ["model=v2", "model/norm=seq_layernorm"],
    "v3-seqnorm": ["model=v3", "model/norm=seq_layernorm"],
}
BENCH_PRESETS = ("v1", "v2", "v3", "nanogpt")
REPO = Path(__file__).resolve().parents[2]  # the checkout (or site-packages): where `python -m shakegpt` runs from
DRY_CORPUS_CHARS = 20_000  # the dry run trains on the corpus's first characters only
# the dry run's sizes: every preset shrunk to seconds on a CPU
DRY_DATA = ["data.batch_size=4", "data.seq_len=32"]
DRY_RUN = [*DRY_DATA, "trainer.max_steps=4", "trainer.val_check_interval=2", "sample.num_chars=20"]
DRY_RUN += ["callbacks.text_sample.num_chars=20", "trainer.log_every_n_steps=1"]

log = logging.getLogger(__name__)


class Check:
    """The folder results go to, the budget's clock, and the archive rewritten after each part."""

    def __init__(self, out: Path, minutes: float, dry_run: bool, data: Path):
        self.out, self.dry_run, self.data = out, dry_run, data
        self.deadline = time.monotonic() + 60 * minutes
        self.device = "cpu" if dry_run else "cuda"
        out.mkdir(parents=True, exist_ok=True)
        self.progress = out / "progress.txt"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def say(self, line: str) -> None:
        stamped = f"[{time.strftime('%H:%M:%S')}] {line}"
        print(stamped, flush=True)
        with self.progress.open("a") as f:
            f.write(stamped + "\n")

    def write_json(self, name: str, data: dict) -> None:
        (self.out / name).write_text(json.dumps(data, indent=2) + "\n")

    def archive(self) -> Path:
        path = self.out / ARCHIVE
        tmp = path.with_suffix(".tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for p in sorted(self.out.rglob("*")):
                rel = p.relative_to(self.out)
                if rel.name in (ARCHIVE, tmp.name) or "checkpoints" in rel.parts or p.is_dir():
                    continue
                try:  # a run still training writes and replaces its files meanwhile
                    tar.add(p, arcname=str(rel), recursive=False)
                except FileNotFoundError:
                    continue
        tmp.replace(path)
        return path


def environment(check: Check) -> dict:
    env = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0) if check.device == "cuda" else platform.processor() or "cpu",
        "dry_run": check.dry_run,
    }
    # a dry run's peak: the best of a few sizes, so that one slow moment on a shared CPU does not set it
    sizes = (256, 512, 1024) if check.dry_run else (8192,)
    reps = 3 if check.dry_run else 10
    env["bf16_peak_flops"] = matmul_peak(torch.bfloat16, sizes, reps=reps, device=check.device)
    env["fp32_peak_flops"] = matmul_peak(torch.float32, sizes, reps=reps, device=check.device)
    return env


def start_runs(check: Check, names: list[str]) -> dict[str, tuple[subprocess.Popen, Path]]:
    """The runs `names` (of RUNS), started at once as `python -m shakegpt` processes."""
    runs = {}
    # leave time for the bench and the archive: the runs stop by max_time at the latest
    limit = max(60, int(check.left() - (20 if check.dry_run else 100)))
    for name in names:
        overrides = RUNS[name]
        run_dir = check.out / "runs" / name
        args = [
            *overrides,
            f"trainer.accelerator={'cpu' if check.dry_run else 'gpu'}",
            "trainer.enable_progress_bar=false",
            f"+trainer.max_time=00:{limit // 3600:02d}:{limit // 60 % 60:02d}:{limit % 60:02d}",
            *(DRY_RUN if check.dry_run else []),
        ]
        cmd = [sys.executable, "-m", "shakegpt", *args, f"hydra.run.dir={run_dir}"]
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        # the corpus through the environment, so that the run's overrides (its kept command) name no local path
        env = os.environ | {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SHAKEGPT_DATA": str(Path(check.data).resolve()),
        }
        with (run_dir.parent / f"{name}.out").open("w") as out:
            runs[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env), run_dir)
        check.say(f"started {name}: python train.py {' '.join(args)}")
    return runs


def finish_runs(check: Check, runs: dict[str, tuple[subprocess.Popen, Path]]) -> dict:
    from shakegpt.run.records import summarize

    results = {}
    for name, (proc, run_dir) in runs.items():
        try:
            rc = proc.wait(timeout=max(1, check.left()))
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # large, and not what is kept
        try:
            results[name] = {"returncode": rc, **summarize(run_dir)}
        except Exception as e:  # a run that never validated: say so, keep going
            results[name] = {"returncode": rc, "error": str(e)}
        check.say(f"{name}: {results[name]}")
    return results


def gpu_tests(check: Check) -> dict:
    tests = REPO / "tests" / "test_gpu.py"
    if not tests.is_file():
        return {"skipped": f"{tests} is not here (the GPU tests run from a checkout)"}
    # one process beside the runs, not a worker per core (pytest-xdist)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-n", "0", "-q", "-p", "no:cacheprovider", str(tests)]
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=max(30, check.left()))
    except subprocess.TimeoutExpired as e:
        (check.out / "pytest-gpu.txt").write_text(f"{e.output or ''}{e.stderr or ''}\nstopped: the time budget ran out")
        return {"returncode": None, "summary": "stopped: the time budget ran out"}
    (check.out / "pytest-gpu.txt").write_text(r.stdout + r.stderr)
    last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
    check.say(f"pytest -m gpu: {last}")
    return {"returncode": r.returncode, "summary": last, "seconds": round(time.perf_counter() - t, 1)}


def _compose(preset: str, extra: list[str]):
    from hydra import compose, initialize_config_dir

    from shakegpt.run.configs import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"model={preset}", "optim=adamw", *extra])


def bare_step_seconds(
    cfg, device: str, compiled: bool, backend: str, steps: int, warmup: int, ids, vocab_size: int
) -> float:
    """Median seconds of a plain training step (bench.Loop: bf16 autocast where the device has it,
    fused AdamW, clipping), a sync after each."""
    from omegaconf import OmegaConf

    from shakegpt.corpus import RandomWindows
    from shakegpt.model import GPT, GPTConfig
    from shakegpt.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), vocab_size)).to(device)
    opt = build_optimizer(model, "adamw", cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
    forward = torch.compile(model, backend=backend) if compiled else model
    windows = RandomWindows(ids, cfg.data.batch_size, cfg.data.seq_len, cfg.seed)
    loop = Loop(forward, opt, windows, autocast=device == "cuda", clip=1.0, device=device)
    for _ in range(warmup + steps):
        loop.step()
    return statistics.median(loop.times[warmup:])


def lightning_step_seconds(cfg, device: str, strategy: str, steps: int, warmup: int, data: Path) -> float:
    """Median seconds between training steps of Lightning's Trainer (eager, with the GPU's other
    choices), a device sync at each: against the eager bare loop, what Lightning (and DDP) add."""
    import lightning as L
    from omegaconf import OmegaConf

    from shakegpt.training.data import CharDataModule
    from shakegpt.training.module import LitGPT

    times: list[float] = []

    class Clock(L.Callback):
        last = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            sync(device)
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

    dm = CharDataModule(path=str(data), batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len, seed=cfg.seed)
    dm.setup("fit")
    dm.cut_on_device = device == "cuda"
    module = LitGPT(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        vocab=dm.tokenizer.chars,
        **OmegaConf.to_container(cfg.optim, resolve=True),
    )
    module.use_step_choices(compile=False, finite_check_every=50 if device == "cuda" else 1)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        strategy=strategy,
        precision="bf16-mixed" if device == "cuda" else "32-true",
        max_steps=warmup + steps + 1,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Clock()],
        gradient_clip_val=1.0,
    )
    trainer.fit(module, datamodule=dm)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return statistics.median(times[warmup:])


def bench(check: Check) -> dict:
    from omegaconf import OmegaConf

    from shakegpt.model import GPTConfig
    from shakegpt.training.data import CharDataModule

    env = json.loads((check.out / "env.json").read_text())
    # the faster peak: bf16's on a GPU; fp32's in a dry run on a CPU without native bf16 (as bench's MFU)
    peak = mfu_peak({"bf16": env["bf16_peak_flops"], "fp32": env["fp32_peak_flops"]})
    backend = "eager" if check.dry_run else "inductor"
    steps, warmup = (2, 1) if check.dry_run else (20, 5)
    extra = DRY_DATA if check.dry_run else []
    results: dict = {"peak_flops": peak, "presets": {}, "note": "ms per step, a device sync after each step"}
    cfgs = {preset: _compose(preset, extra) for preset in BENCH_PRESETS}
    dm = CharDataModule(path=str(check.data), seq_len=max(c.data.seq_len for c in cfgs.values()))
    dm.setup("fit")
    ids, vocab = dm.train_ids, dm.tokenizer.vocab_size
    # eager first (quick), then what Lightning and DDP add at v3, then compiled (each preset compiles for
    # tens of seconds): a budget that runs out leaves the most figures
    for compiled in (False, True):
        kind = "compiled" if compiled else "eager"
        for preset, cfg in cfgs.items():
            row = results["presets"].setdefault(preset, {})
            if check.left() < 15:
                row[kind] = "skipped: the time budget ran out"
                continue
            mcfg = GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), vocab)
            s = bare_step_seconds(cfg, check.device, compiled, backend, steps, warmup, ids, vocab)
            row[kind] = {
                "ms_per_step": round(1000 * s, 3),
                "tokens_per_s": round(cfg.data.batch_size * cfg.data.seq_len / s),
                "mfu": round(flops_per_step(mcfg, cfg.data.batch_size, cfg.data.seq_len) / s / peak, 4),
            }
            check.say(f"bench {preset} {kind}: {row[kind]}")
            check.write_json("bench-gpu.json", results)
        if compiled:
            break
        for strategy in ("auto", "ddp"):  # eager, against the eager bare loop above
            key = f"lightning_{strategy}_v3_ms_per_step"
            if check.left() < 20:
                results[key] = "skipped: the time budget ran out"
                continue
            s = lightning_step_seconds(cfgs["v3"], check.device, strategy, steps, warmup, check.data)
            results[key] = round(1000 * s, 3)
            check.say(f"bench v3 through Lightning (strategy={strategy}, eager): {1000 * s:.2f} ms per step")
            check.write_json("bench-gpu.json", results)
    return results


def dry_corpus(corpus: Path, out: Path) -> Path:
    """The first DRY_CORPUS_CHARS characters of `corpus`, as a file in `out`: enough for a dry run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "dry-corpus.txt"
    with corpus.open(encoding="utf-8") as f:
        path.write_text(f.read(DRY_CORPUS_CHARS), encoding="utf-8")
    return path


def run_check(
    out: str | Path,
    minutes: float = 5.0,
    dry_run: bool = False,
    data: str | Path | None = None,
    runs: list[str] | None = None,
) -> Path:
    """The whole check; returns the archive's path."""
    from shakegpt.corpus import resolve_corpus

    if (Path(out) / "progress.txt").exists():
        raise SystemExit(
            f"error: --out={out} holds an earlier check (its progress.txt); choose another folder or remove it"
        )
    if not dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "error: --gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); --dry-run runs it on the CPU"
        )
    warnings.filterwarnings("ignore", module="lightning")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    torch.set_float32_matmul_precision("high")
    corpus = Path(data) if data else resolve_corpus()
    if dry_run and not data:
        corpus = dry_corpus(corpus, Path(out))
    check = Check(Path(out), minutes, dry_run, corpus)
    summary: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_minutes": minutes}
    summary["env"] = environment(check)
    check.write_json("env.json", summary["env"])
    check.say(f"env: {summary['env']}")
    runs = start_runs(check, list(RUNS) if runs is None else runs)
    summary["gpu_tests"] = gpu_tests(check)
    check.write_json("summary.json", summary)
    check.archive()
    summary["runs"] = finish_runs(check, runs)
    check.write_json("summary.json", summary)
    check.archive()
    try:
        summary["bench"] = bench(check)
    except Exception as e:  # the runs' results are kept whatever the bench does
        summary["bench"] = {"error": f"{type(e).__name__}: {e}"}
        check.say(f"bench failed: {e}")
    summary["seconds"] = round(60 * minutes - check.left(), 1)
    check.write_json("summary.json", summary)
    path = check.archive()
    check.say(f"done in {summary['seconds']:.0f} s: {path}")
    return path


def main(argv: list[str] | None = None) -> Path:
    import argparse

    p = argparse.ArgumentParser(prog="python -m shakegpt gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="gpu-check", help="folder for the results and the archive (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=5.0, help="running-time budget (default: %(default)s)")
    p.add_argument("--data", default=None, help="corpus path (default: $SHAKEGPT_DATA, the cache, or download)")
    p.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU at tiny sizes")
    p.add_argument(
        "--runs",
        default=",".join(RUNS),
        help="the training runs, all at once (default: %(default)s; '' for none)",
    )
    args = p.parse_args(argv)
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown run(s) {', '.join(unknown)}; choose among {', '.join(RUNS)}")
    if args.minutes <= 0:
        p.error(f"--minutes={args.minutes} must be > 0")
    return run_check(args.out, args.minutes, args.dry_run, args.data, runs)
