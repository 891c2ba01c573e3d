"""`python -m shakegpt evaluate ckpt_path=…` (or `shakegpt-eval`): val loss, bits per character and
accuracy of one or several checkpoints over the full validation split, as a table and JSON.

It runs the same deterministic pass as training's validation (every non-overlapping window, the
same precision rule), so a checkpoint's numbers here equal the val/* metrics logged when it was saved.
The values are checked before torch is imported, so a mistake is refused at once.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig

from shakegpt.errors import ConfigError, DataError, exit_on_user_error, positive_int
from shakegpt.run.checks import PRECISIONS as TRAINING_PRECISIONS
from shakegpt.run.checks import check_path_exists, check_writable, require
from shakegpt.run.configs import CONF_DIR, hydra_errors_in_one_line

# training's precisions less fp16 without mixed precision and the short aliases
PRECISIONS = tuple(p for p in TRAINING_PRECISIONS if p not in ("16-true", "64", "bf16", "16"))


def evaluate_checkpoint(path: str | Path, data: dict, precision: str = "auto", allow_unk: bool = False) -> dict:
    """The val metrics of one checkpoint (a file, or a run directory's best) over `data`'s validation split."""
    from shakegpt.corpus import read_corpus, resolve_corpus, split_ids
    from shakegpt.hardware import resolve_precision
    from shakegpt.training.checkpoint import load_bundle, model_from_checkpoint, resolve_checkpoint
    from shakegpt.training.val_pass import full_val_pass

    if (Path(path).expanduser() / "model.safetensors").is_file():  # an exported bundle, as sample takes it
        ckpt_file = Path(path).expanduser()
        (model, tokenizer), ckpt = load_bundle(ckpt_file), {}  # a bundle keeps no step
    else:
        ckpt_file = resolve_checkpoint(path)
        model, tokenizer, ckpt = model_from_checkpoint(ckpt_file)  # one read, weights_only: no code runs from the file
    seq_len = data.get("seq_len") or model.cfg.max_seq_len
    corpus = resolve_corpus(
        data.get("path"), data.get("cache_dir"), **{k: data[k] for k in ("url", "sha256") if k in data}
    )
    _, val_ids = split_ids(read_corpus(corpus), tokenizer, data.get("val_fraction", 0.1), seq_len, corpus)
    unk_share = (val_ids == tokenizer.unk_id).float().mean().item()
    if unk_share > 0 and not allow_unk:
        raise DataError(
            f"{unk_share:.1%} of the validation characters of {corpus} are outside the vocabulary of "
            f"{ckpt_file} (they would all be <unk>), so its val loss would not measure that text; evaluate on the "
            "corpus the model was trained on (data.path), or pass allow_unk=true to evaluate anyway"
        )
    precision = resolve_precision(precision, "cpu", model.cfg.d_model)
    metrics, seconds = full_val_pass(model, val_ids, seq_len, data.get("batch_size", 64), precision)
    return {
        "ckpt": str(ckpt_file),
        "step": ckpt.get("global_step"),
        "val_loss": metrics["val/loss"],
        "val_bpc": metrics["val/bpc"],
        "val_acc": metrics["val/acc"],
        "val_loss_last": metrics["val/loss_last"],
        "unk_share": unk_share,
        "precision": precision,
        "seq_len": seq_len,
        "val_windows": (len(val_ids) - 1) // seq_len,
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    """One line per checkpoint; `last pos` is the val loss at each window's last position alone."""
    out = [f"{'checkpoint':<60} {'step':>7} {'val loss':>9} {'bpc':>7} {'acc':>7} {'last pos':>9}"]
    for r in rows:
        name = r["ckpt"] if len(r["ckpt"]) <= 60 else "…" + r["ckpt"][-59:]
        out.append(
            f"{name:<60} {'-' if r['step'] is None else r['step']:>7} {r['val_loss']:>9.4f} {r['val_bpc']:>7.4f} {r['val_acc']:>7.4f} "
            f"{r['val_loss_last']:>9.4f}"
        )
    return "\n".join(out)


def evaluate(cfg: DictConfig) -> list[dict]:
    require(cfg, "ckpt_path", "a checkpoint or run directory, or a list '[a,b]', e.g. ckpt_path=outputs/runs/<run>")
    paths = list(cfg.ckpt_path) if isinstance(cfg.ckpt_path, (list, ListConfig)) else [cfg.ckpt_path]
    # the data config's keys that say which text and how it is split (its seed draws training windows only)
    keys = ("path", "cache_dir", "url", "sha256", "batch_size", "seq_len", "val_fraction")
    data = {k: cfg.data[k] for k in keys if k in cfg.data}
    # before the work, not after it
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    for key in ("batch_size", "seq_len"):
        if data.get(key) is not None:
            positive_int(f"data.{key}", data[key])
    for path in paths:
        check_path_exists(path)
    if cfg.out:
        if Path(cfg.out).expanduser().is_dir():
            raise ConfigError(f"out={cfg.out} is a directory; give a file name, e.g. out={Path(cfg.out) / 'eval.json'}")
        check_writable(Path(cfg.out).expanduser().parent, f"out={cfg.out}")
    allow_unk = bool(cfg.get("allow_unk", False))
    rows = [evaluate_checkpoint(p, data, cfg.precision, allow_unk) for p in paths]
    print(table(rows))
    for r in rows:
        if r["unk_share"] > 0:
            print(f"warning: {r['unk_share']:.1%} of the validation characters are <unk> for {r['ckpt']}")
    if cfg.out:
        try:
            Path(cfg.out).expanduser().parent.mkdir(parents=True, exist_ok=True)  # out=results/eval.json
            Path(cfg.out).expanduser().write_text(json.dumps(rows, indent=2))
        except OSError as e:
            raise ConfigError(f"out={cfg.out} could not be written: {e.strerror or e}") from None
        print(f"written: {cfg.out}")
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@exit_on_user_error
def run(cfg: DictConfig) -> None:
    evaluate(cfg)


def main() -> None:
    with hydra_errors_in_one_line():
        run()


if __name__ == "__main__":
    main()
