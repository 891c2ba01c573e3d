"""`python -m shakegpt.evaluate ckpt_path=…` (or `shakegpt-eval`): val loss, bits per character and
accuracy of one or several checkpoints over the full validation split, as a table and JSON.

It runs the same deterministic pass as training's validation (every non-overlapping window, the
same precision rule), so a checkpoint's numbers here equal the val/* metrics logged when it was saved.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, ListConfig, OmegaConf

from shakegpt.checkpoint import read_checkpoint, resolve_checkpoint
from shakegpt.checks import check_writable
from shakegpt.configs import CONF_DIR
from shakegpt.data import CharDataModule
from shakegpt.errors import CheckpointError, ConfigError, DataError, exit_on_user_error
from shakegpt.hardware import resolve_precision
from shakegpt.module import LitGPT


def full_val_pass(module: LitGPT, datamodule: CharDataModule, precision: str) -> tuple[dict[str, float], float]:
    """(val metrics, seconds) of one deterministic pass over every validation window, on the CPU."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    t = time.perf_counter()
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    return metrics, time.perf_counter() - t


def evaluate_checkpoint(path: str | Path, data: dict, precision: str = "auto", allow_unk: bool = False) -> dict:
    ckpt_file = resolve_checkpoint(path)
    ckpt = read_checkpoint(ckpt_file)  # one read, weights_only: no code runs from the file
    try:
        module = LitGPT(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"ckpt_path={ckpt_file}: the weights or settings do not fit a shakegpt model: {detail}"
        ) from None
    data = dict(data)
    data["seq_len"] = data.get("seq_len") or module.config.max_seq_len
    dm = CharDataModule(**data, vocab=module.tokenizer.chars)
    dm.setup("validate")
    unk = dm.val_ids == module.tokenizer.unk_id
    unk_share = unk.float().mean().item()
    if unk_share > 0 and not allow_unk:
        raise DataError(
            f"{unk_share:.1%} of the validation characters of {dm.corpus_path} are outside the vocabulary of "
            f"{ckpt_file} (they would all be <unk>), so its val loss would not measure that text; evaluate on the "
            "corpus the model was trained on (data.path), or pass allow_unk=true to evaluate anyway"
        )
    precision = resolve_precision(precision, "cpu", module.config.d_model)
    metrics, seconds = full_val_pass(module, dm, precision)
    return {
        "ckpt": str(ckpt_file),
        "step": ckpt.get("global_step"),
        "val_loss": metrics["val/loss"],
        "val_bpc": metrics["val/bpc"],
        "val_acc": metrics["val/acc"],
        "unk_share": unk_share,
        "precision": precision,
        "seq_len": data["seq_len"],
        "val_windows": (len(dm.val_ids) - 1) // data["seq_len"],
        "seconds": seconds,
    }


def table(rows: list[dict]) -> str:
    out = [f"{'checkpoint':<60} {'step':>7} {'val loss':>9} {'bpc':>7} {'acc':>7}"]
    for r in rows:
        name = r["ckpt"] if len(r["ckpt"]) <= 60 else "…" + r["ckpt"][-59:]
        out.append(f"{name:<60} {r['step']:>7} {r['val_loss']:>9.4f} {r['val_bpc']:>7.4f} {r['val_acc']:>7.4f}")
    return "\n".join(out)


def evaluate(cfg: DictConfig) -> list[dict]:
    paths = list(cfg.ckpt_path) if isinstance(cfg.ckpt_path, (list, ListConfig)) else [cfg.ckpt_path]
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "_target_"}
    if cfg.out:  # before the work, not after it
        check_writable(Path(cfg.out).expanduser().parent, f"out={cfg.out}")
    L.seed_everything(cfg.seed, verbose=False)
    allow_unk = bool(cfg.get("allow_unk", False))
    rows = [evaluate_checkpoint(p, data, cfg.precision, allow_unk) for p in paths]
    print(table(rows))
    for r in rows:
        if r["unk_share"] > 0:
            print(f"warning: {r['unk_share']:.1%} of the validation characters are <unk> for {r['ckpt']}")
    if cfg.out:
        try:
            Path(cfg.out).expanduser().write_text(json.dumps(rows, indent=2))
        except OSError as e:
            raise ConfigError(f"out={cfg.out} could not be written: {e.strerror or e}") from None
        print(f"written: {cfg.out}")
    return rows


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="evaluate")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    evaluate(cfg)


if __name__ == "__main__":
    main()
