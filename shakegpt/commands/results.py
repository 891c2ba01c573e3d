"""Reference runs: keep a run's small artifacts, tabulate them, plot their curves.

    python -m shakegpt results keep outputs/runs/<run> --name v3-original --command "python train.py model=v3"
    python -m shakegpt results table                      # markdown table of outputs/reference/
    python -m shakegpt results plot --out docs/results.png      # the kept runs
    python -m shakegpt results plot outputs/multiruns/<sweep>   # a sweep's jobs (or run directories)
    python -m shakegpt results ablation outputs/multiruns/<sweep> --bench bench.json --out ablation.png

`keep` copies what a reader needs to check a run without its checkpoints: the TensorBoard event
files, the resolved config, the log, the last text sample, and a `metrics.json` summary (best and
last val loss, steps, training time from the event timestamps, parameters, the command).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tarfile
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from shakegpt.errors import EVENT_FILES, JOB_ERROR_FILE, ConfigError, exit_on_user_error
from shakegpt.run.configs import checkout
from shakegpt.run.records import RECORD_FILE, _job_overrides, is_run, last_sample, read_scalars, run_hparams, summarize


def reference_dir() -> Path:
    """Where kept runs live: a checkout's `outputs/reference/` when shakegpt runs from one, else
    `outputs/reference/` under the current directory, beside the runs in `outputs/runs/` (never
    inside an installed package's folder)."""
    root = checkout()
    return root / "outputs" / "reference" if root is not None else Path("outputs") / "reference"


REFERENCE_DIR = reference_dir()

# the original shakeGPT runs' val losses and wall times (their own hardware) and nanoGPT's published figure
ORIGINAL = {"v1": 1.7002, "v2": 1.7531, "v3": 1.6900}
ORIGINAL_WALL = {"v1": "5h20m", "v2": "38 min", "v3": "40 min"}
NANOGPT = 1.4697


def original_row(name: str) -> float | None:
    """The original run's val loss for a kept run named `<preset>-...` (v1-fast -> 1.7002), or None."""
    return ORIGINAL.get(name.split("-")[0])


@contextlib.contextmanager
def run_from(path: str | Path, member: str | None = None):
    """A run directory as it is, or the run `member` of a `python -m shakegpt gpu-check`
    archive, unpacked into a temporary folder for as long as the block runs."""
    path = Path(path)
    if not path.is_file():
        if member:
            raise ConfigError(f"--member={member} is for an archive; {path} is not a file")
        yield path
        return
    if not tarfile.is_tarfile(path):
        raise ConfigError(f"{path} is neither a run directory nor an archive of runs")
    with tarfile.open(path) as tar, tempfile.TemporaryDirectory(prefix="shakegpt-keep-") as tmp:
        names = sorted({n.split("/")[1] for n in tar.getnames() if n.startswith("runs/") and n.count("/") >= 2})
        if member is None:
            raise ConfigError(f"{path} is an archive: name the run to keep with --member, one of {', '.join(names)}")
        if member not in names:
            raise ConfigError(f"--member={member} is not a run of {path}; its runs: {', '.join(names) or 'none'}")
        members = [m for m in tar.getmembers() if m.name.startswith(f"runs/{member}/")]
        if any(".." in Path(m.name).parts or m.issym() or m.islnk() for m in members):
            raise ConfigError(f"{path} holds links or paths outside its runs: not unpacked")
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # refuses links and paths out of tmp
        tar.extractall(tmp, members=members, **safe)
        yield Path(tmp) / "runs" / member


def keep(
    run_dir: str | Path,
    name: str,
    command: str,
    dest_root: str | Path = REFERENCE_DIR,
    note: str = "",
    overwrite: bool = False,
) -> Path:
    """Copy a run's small artifacts to `dest_root/name` and write its metrics.json. Everything is
    gathered in a temporary folder first; a kept run of the same name is replaced only with
    `overwrite`, and only once the new one is complete."""
    from shakegpt.model import GPT, GPTConfig, original_formula_params

    run_dir = Path(run_dir)
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir} has no .hydra/config.yaml; give a run directory made by train.py")
    dest = Path(dest_root) / name
    if dest.exists() and not overwrite:
        raise ConfigError(
            f"a kept run named {name!r} exists in {dest_root}; choose another --name, or pass --force to replace it"
        )
    summary = summarize(run_dir)  # refuses a run that has not validated, before anything is touched
    cfg = OmegaConf.load(config)  # as Hydra saved it: paths still refer to ${hydra:...}, so resolve parts
    vocab_size = run_hparams(run_dir).get("model", {}).get("vocab_size")  # the presets' null, as the run derived it
    model = GPT(GPTConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True), vocab_size))
    metrics = {
        "name": name,
        "command": command,
        **summary,
        "max_steps": cfg.trainer.max_steps,
        "params": model.num_params(),
        "original_formula_params": original_formula_params(model.cfg, cfg.data.seq_len),
        "tokens_per_step": cfg.data.batch_size * cfg.data.seq_len,
        "note": note,
    }
    try:
        Path(dest_root).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest_root, prefix=f".{name}-") as tmp:
            new = Path(tmp) / name
            new.mkdir(parents=True)
            for f in [*run_dir.glob(EVENT_FILES), *run_dir.glob(f"tensorboard/{EVENT_FILES}")]:
                shutil.copy2(f, new / f.name)  # beside the rest, so TensorBoard names the run by its folder
            if (run_dir / RECORD_FILE).is_file():  # the times metrics.json quotes are the record's
                shutil.copy2(run_dir / RECORD_FILE, new / RECORD_FILE)
            shutil.copy2(config, new / "config.yaml")
            shutil.copy2(run_dir / ".hydra" / "overrides.yaml", new / "overrides.yaml")
            if (run_dir / "train.log").is_file():
                shutil.copy2(run_dir / "train.log", new / "train.log")
            sample = last_sample(run_dir)
            if sample:
                (new / "sample.txt").write_text(sample)
            (new / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
            old = Path(tmp) / "replaced"
            if dest.exists():
                dest.rename(old)  # removed with the temporary folder once the new one is in place
            new.rename(dest)
    except OSError as e:
        raise ConfigError(f"the run could not be kept in {dest}: {e.strerror or e}") from None
    return dest


def load_reference(root: str | Path = REFERENCE_DIR) -> list[dict]:
    """metrics.json of every kept run, sorted by name."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).glob("*/metrics.json"))]


def _hms(seconds: float) -> str:
    m = round(seconds / 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m} min" if m else f"{seconds:.0f} s"


def table(root: str | Path = REFERENCE_DIR) -> str:
    """Markdown table of the kept runs against the original run of their preset and nanoGPT."""
    rows = [
        "| run | params | steps done / planned | best val loss | training time | original run | nanoGPT |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in load_reference(root):
        ref = original_row(m["name"])
        original = f"{ref:.4f}" if ref else "—"
        rows.append(
            f"| {m['name']} | {m['params'] / 1e6:.2f} M | {m['steps']:,} / {m['max_steps']:,} | "
            f"{m['best_val_loss']:.4f} | {_hms(m['train_seconds'])} | {original} | {NANOGPT:.4f} |"
        )
    return "\n".join(rows)


def ablation_runs(sweep_dir: str | Path) -> dict[str, list[dict]]:
    """The jobs of an ablation sweep (`python train.py experiment=ablation`), by option in job order:
    option -> [{"seed", "best", "steps", "curve": [(step, val loss)]}]; a failed job has best None."""
    sweep_dir = Path(sweep_dir)
    jobs = sorted(
        (p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()),
        key=lambda p: int(p.name.split("_", 1)[0]) if p.name.split("_", 1)[0].isdigit() else 0,
    )
    runs: dict[str, list[dict]] = {}
    for job in jobs:
        overrides = _job_overrides(job)
        if "ablation" not in overrides:
            raise ConfigError(f"{job} has no ablation=… override: give a sweep made by `train.py experiment=ablation`")
        run = {"seed": overrides.get("seed", "?"), "best": None, "steps": 0, "curve": []}
        if not (job / JOB_ERROR_FILE).is_file():
            with contextlib.suppress(ConfigError):  # no event file or no validation: it failed early
                val = read_scalars(job).get("val/loss", [])
                run["curve"] = [(step, value) for step, value, _ in val]
                run["best"] = min(v for _, v in run["curve"]) if val else None
                run["steps"] = val[-1][0] if val else 0
        runs.setdefault(overrides["ablation"], []).append(run)
    if not runs:
        raise ConfigError(f"{sweep_dir} holds no sweep jobs (no */.hydra/overrides.yaml)")
    if "base" not in runs:
        raise ConfigError(f"{sweep_dir} has no ablation=base job to compare the changes with")
    return runs


def _what(option: str) -> str:
    """The description at the top of conf/ablation/<option>.yaml, as one line."""
    from shakegpt.run.configs import CONF_DIR

    path = Path(CONF_DIR) / "ablation" / f"{option}.yaml"
    if not path.is_file():
        return ""
    lines = [line for line in path.read_text().splitlines() if "@package" not in line]
    words = []
    for line in lines:  # the comment block at the top of the file, as one sentence
        if not line.startswith("# "):
            break
        words.append(line[2:].strip())
    return " ".join(words)


def ablation_table(sweep_dir: str | Path, bench: str | Path | None = None) -> str:
    """An ablation sweep as a markdown table, in the sweep's order: each change, its best val loss per
    seed, their mean and spread, the mean's difference from base (negative: the change helps) and,
    from a `python -m shakegpt bench --ablation` JSON file, its step time against base's."""
    runs = ablation_runs(sweep_dir)
    ratios = {}
    if bench is not None:
        try:
            ratios = {k: v["vs_base"] for k, v in json.loads(Path(bench).read_text())["ablation"].items()}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"--bench {bench}: not a `python -m shakegpt bench --ablation` result ({e})") from None
    steps = max(r["steps"] for rs in runs.values() for r in rs)
    done = [r["best"] for r in runs["base"] if r["best"] is not None and r["steps"] == steps]
    if not done:
        raise ConfigError(f"no base job of {sweep_dir} ran to step {steps:,}: nothing to compare with")
    base = statistics.mean(done)  # the same complete runs as the base row's mean
    head = "| change | what it is | best val loss by seed | mean | spread | vs base |"
    rows = [head + (" step time vs base |" if ratios else ""), "|---" * (6 + bool(ratios)) + "|"]
    for option, rs in runs.items():
        bests = [r["best"] for r in rs if r["best"] is not None and r["steps"] == steps]
        stopped = sum(r["best"] is not None and r["steps"] != steps for r in rs)
        by_seed = ", ".join(f"{r['best']:.4f}" if r["best"] is not None else "failed" for r in rs)
        if stopped:
            by_seed += f" ({stopped} stopped before step {steps:,}: not in the mean)"
        if bests:
            mean, spread = statistics.mean(bests), max(bests) - min(bests)
            cells = [f"{mean:.4f}", f"{spread:.4f}", "—" if option == "base" else f"{mean - base:+.4f}"]
        else:
            cells = ["—", "—", "—"]
        ratio = [f"{ratios[option]:.2f}x" if option in ratios else "—"] if ratios else []
        rows.append(f"| {option} | {_what(option)} | {by_seed} | " + " | ".join(cells + ratio) + " |")
    return "\n".join(rows)


def _pyplot(out: str | Path | None):
    """matplotlib's pyplot, drawing to files when `out` is given; `out` checked before any work: a
    file name (not a folder) whose extension matplotlib writes."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "plots need matplotlib, which is not installed: pip install matplotlib (or shakegpt[notebooks])"
        ) from None
    if out is not None:
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase

        target = Path(out).expanduser()
        if target.is_dir():
            raise ConfigError(f"--out {out} is a folder; give an image file, e.g. --out {Path(out) / 'results.png'}")
        formats = FigureCanvasBase.get_supported_filetypes()
        if target.suffix.lstrip(".").lower() not in formats:
            raise ConfigError(
                f"--out {out}: {target.suffix or 'no extension'} is not an image format matplotlib writes; "
                f"end the name in one of {', '.join('.' + f for f in sorted(formats))}"
            )
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, legend_from, out: str | Path | None):
    """One legend beside the panels (from the axes `legend_from`), and the figure saved to `out`
    (then closed) when given. Returns the figure."""
    import matplotlib.pyplot as plt

    handles, labels = legend_from.get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    if out is not None:
        try:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(out, dpi=110, bbox_inches="tight")
        except OSError as e:
            raise ConfigError(f"--out {out} could not be written: {e.strerror or e}") from None
        plt.close(fig)
    return fig


def plot_ablation(sweep_dir: str | Path, out: str | Path | None = None):
    """Mean val loss over the seeds against step, one line per change (base in black), in two panels:
    every validation, and a zoom on the second half. A job that failed or stopped early is left out,
    as in the table. Returns the figure."""
    plt = _pyplot(out)
    runs = ablation_runs(sweep_dir)
    end = max(r["steps"] for rs in runs.values() for r in rs)
    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 4.8))
    colours = iter(plt.get_cmap("tab20").colors)
    last = []
    for option, rs in runs.items():
        curves = [dict(r["curve"]) for r in rs if r["curve"] and r["steps"] == end]  # as in the table's mean
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        mean = [statistics.mean([c[s] for c in curves]) for s in steps]
        style = dict(color="black", linewidth=2.2) if option == "base" else dict(color=next(colours), linewidth=1.2)
        label = f"{option} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        for ax in (full, zoom):
            ax.plot(steps, mean, marker=".", markersize=4, label=label, **style)
        last += [(s, m) for s, m in zip(steps, mean, strict=True) if s >= steps[-1] / 2]
    if not last:
        raise ConfigError(f"no job of {sweep_dir} has validated yet: nothing to plot")
    for ax in (full, zoom):
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    full.set_ylabel("validation loss (nats/char), mean over seeds")
    full.set_title("every validation")
    lo, hi = min(m for _, m in last), max(m for _, m in last)
    margin = max(0.005, 0.05 * (hi - lo))
    zoom.set_ylim(lo - margin, hi + margin)
    zoom.set_xlim(min(s for s, _ in last) * 0.97, max(s for s, _ in last) * 1.01)
    zoom.set_title("zoom on the second half")
    return _finish(fig, full, out)


# the reference lines: each its own colour and dash, so that 1.7002 and 1.6900 stay apart
REFERENCE_STYLES = {"v1": ("tab:red", ":"), "v2": ("tab:orange", "-."), "v3": ("tab:purple", "--")}


def runs_to_plot(paths: list[str | Path]) -> list[tuple[str, Path]]:
    """(label, run directory) for each run under `paths`: a folder of kept runs (outputs/reference),
    a sweep directory (its jobs, labelled by job number and the overrides that differ between them),
    or run directories (labelled by their names)."""
    found: list[tuple[str, Path, dict]] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise ConfigError(
                f"{path} is not a directory; give run directories, a sweep directory or outputs/reference"
            )
        if is_run(path):
            found.append((path.name, path, {}))
            continue
        children = sorted(p for p in path.iterdir() if p.is_dir() and is_run(p))
        if not children:
            raise ConfigError(f"{path} holds no runs (no run's record or event files in it or in its sub-directories)")
        for child in children:
            overrides_file = child / ".hydra" / "overrides.yaml"
            overrides = (
                dict(str(o).split("=", 1) for o in OmegaConf.load(overrides_file) if "=" in str(o))
                if overrides_file.is_file() and not (child / "metrics.json").is_file()
                else {}
            )
            found.append((child.name, child, overrides))
    keys = sorted({k for _, _, o in found for k in o})
    differ = [k for k in keys if len({o.get(k) for _, _, o in found}) > 1]
    labels = []
    for name, run, overrides in found:
        if overrides:  # a sweep job: its number and what differs
            name = " ".join([name.split("_", 1)[0] + ":", *(f"{k}={overrides[k]}" for k in differ if k in overrides)])
        labels.append((name, run))
    return labels


def plot(
    runs: str | Path | list = REFERENCE_DIR, out: str | Path | None = None, references: bool = True, x: str = "time"
):
    """Val loss against training time (or, with x="step", against step), one line per run, in two
    panels: every validation, and a zoom on the best val losses. `references` draws the original
    runs and nanoGPT as lines, each in the legend. `runs`: as `runs_to_plot` takes them. Returns the figure."""
    plt = _pyplot(out)
    import matplotlib.ticker

    if x not in ("time", "step"):
        raise ConfigError(f"x={x!r}: plot against time or step")
    by_step = x == "step"
    curves = []
    for label, run in runs_to_plot(runs if isinstance(runs, list) else [runs]):
        val = read_scalars(run).get("val/loss", [])
        if val:
            curves.append((label, [e[0] if by_step else e[2] for e in val], [e[1] for e in val]))
    if not curves:
        raise ConfigError(f"no run in {runs} has validated yet: nothing to plot")
    # minutes, or seconds for short runs; log scale from the first validation on
    if by_step:
        per, unit = 1, "steps"
    else:
        per, unit = (60, "minutes") if max(t[-1] for _, t, _ in curves) >= 120 else (1, "seconds")
    curves = [(label, [max(t, 1e-3) / per for t in ts], y) for label, ts, y in curves]
    lines = [(f"original {k}: {v:.4f} after {ORIGINAL_WALL[k]}", v, *REFERENCE_STYLES[k]) for k, v in ORIGINAL.items()]
    lines.append((f"nanoGPT: {NANOGPT} (A100)", NANOGPT, "black", "-"))
    if not references:
        lines = []

    fig, (full, zoom) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1]})
    bests = [min(y) for _, _, y in curves]
    for ax in (full, zoom):
        for label, x, y in curves:
            ax.plot(x, y, marker=".", markersize=4, linewidth=1.2, label=label)
        for label, value, colour, dash in lines:
            ax.axhline(value, color=colour, linestyle=dash, linewidth=1.2, label=label)
        ax.grid(True, which="both", alpha=0.3)
    full.set_xscale("log")  # the first minutes and the last hours on one axis
    full.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    full.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    full.set_xlabel("step (log scale)" if by_step else f"training time ({unit}, log scale)")
    zoom.set_xlabel("step" if by_step else f"training time ({unit})")
    values = [v for _, _, y in curves for v in y] + [v for _, v, _, _ in lines]
    full.set_ylim(min(values) - 0.05, min(max(values), 4.5) + 0.05)
    full.set_ylabel("validation loss (nats/char)")
    full.set_title("every validation")
    # the zoom: where runs that reach the reference lines bunch together (from just under the best
    # run to a little over the highest line); where none reaches them, the runs' own best figures
    refs = [v for _, v, _, _ in lines]
    if refs and min(bests) <= max(refs):
        top, bottom = max(refs), min(bests + refs)
    else:
        top, bottom = max(bests), min(bests)
    margin = max(0.01, 0.08 * (top - bottom))
    zoom.set_ylim(bottom - margin, top + margin)
    late = [x[i] for _, x, y in curves for i in range(len(y)) if y[i] <= top + margin]
    if late:
        left, right = min(late), max(x[-1] for _, x, _ in curves)
        pad = 0.04 * (right - left) or 0.1 * right
        zoom.set_xlim(left - pad, right + pad)
    zoom.set_title("zoom on the best val losses")
    return _finish(fig, full, out)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shakegpt results", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keep", help="copy a run's small artifacts into the reference folder")
    k.add_argument("run_dir", help="a run directory, or a `bench --gpu-check` archive with --member")
    k.add_argument("--member", default=None, help="with an archive: the run in it, e.g. v3-original")
    k.add_argument("--name", required=True, help="e.g. v3-original, v3-improved (the part before '-' names the preset)")
    k.add_argument("--command", required=True, help="the command that made the run, quoted in the README")
    k.add_argument("--note", default="", help="anything a reader must know, e.g. where the run was stopped")
    k.add_argument("--root", default=str(REFERENCE_DIR), help="the kept runs' folder (default: %(default)s)")
    k.add_argument("--force", action="store_true", help="replace a kept run of the same name")
    t = sub.add_parser("table", help="markdown table of the kept runs")
    t.add_argument("--root", default=str(REFERENCE_DIR), help="the kept runs' folder (default: %(default)s)")
    g = sub.add_parser(
        "plot",
        help="val loss against time, as an image: the kept runs, a sweep's jobs or any run directories",
    )
    g.add_argument("runs", nargs="*", help="a sweep directory or run directories (default: the kept runs)")
    g.add_argument("--root", default=str(REFERENCE_DIR), help="the kept runs' folder, when no runs are given")
    g.add_argument("--out", default="results.png", help="the image to write (default: results.png)")
    g.add_argument("--no-references", action="store_true", help="leave out the original runs' and nanoGPT's lines")
    g.add_argument("--x", choices=("time", "step"), default="time", help="the x axis (default: %(default)s)")
    a = sub.add_parser(
        "ablation",
        help="an ablation sweep (train.py experiment=ablation): each change against base, as a table and a plot",
    )
    a.add_argument("sweep_dir")
    a.add_argument("--bench", default=None, help="a `python -m shakegpt bench --ablation` JSON file: step times")
    a.add_argument("--out", default=None, help="also draw mean val loss against step into this image")
    args = p.parse_args(argv)
    if args.cmd == "ablation":
        print(ablation_table(args.sweep_dir, args.bench))
        if args.out:
            plot_ablation(args.sweep_dir, args.out)
            print(f"written: {args.out}")
    elif args.cmd == "keep":
        with run_from(args.run_dir, args.member) as run_dir:
            dest = keep(run_dir, args.name, args.command, args.root, args.note, overwrite=args.force)
        print(json.dumps(json.loads((dest / "metrics.json").read_text()), indent=2))
        print(f"kept in {dest}")
    elif args.cmd == "table":
        print(table(args.root))
    else:
        plot([Path(r) for r in args.runs] or Path(args.root), args.out, not args.no_references, args.x)
        print(f"written: {args.out}")


if __name__ == "__main__":
    main()
