"""Finding, loading and exporting trained models without running code from the file.

Checkpoints are read with `torch.load(weights_only=True)`: tensors and plain data only, so a
malicious file cannot execute anything. An exported bundle is a directory of plain files —
`model.safetensors` (weights), `config.json` (GPTConfig), `tokenizer.json` (vocabulary) — that
loads with neither Lightning nor Hydra:

    from shakegpt.training.checkpoint import load_bundle
    model, tokenizer = load_bundle("bundle/")
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from shakegpt.errors import CheckpointError, ConfigError
from shakegpt.model import GPT, GPTConfig
from shakegpt.tokenizer import CharTokenizer

BEST_VAL = re.compile(r"-val(\d+\.\d+)\.ckpt$")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run directory (or its checkpoints/) the best checkpoint
    by the val loss in its name, else last.ckpt."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        best = [(float(m.group(1)), c) for c in folder.glob("best-*.ckpt") if (m := BEST_VAL.search(c.name))]
        if best:
            return min(best)[1]
        if (folder / "last.ckpt").is_file():
            return folder / "last.ckpt"
        raise CheckpointError(f"ckpt_path={path} is a directory without best-*.ckpt or last.ckpt in {folder}")
    if not p.is_file():
        raise CheckpointError(f"ckpt_path={path} does not exist; give a .ckpt file or a run directory")
    return p


def step_of(path: Path) -> int:
    """A checkpoint's global_step, read without loading its tensors; -1 if unreadable."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("global_step", -1))
    except Exception:
        return -1


def resolve_resume(path: str | Path) -> Path:
    """The checkpoint to resume training from: a file as given, or for a run directory (or its
    checkpoints/) the later of `last.ckpt` and `interrupted.ckpt` by step: the run's latest state."""
    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
        found = [folder / n for n in ("last.ckpt", "interrupted.ckpt") if (folder / n).is_file()]
        if not found:
            raise CheckpointError(
                f"ckpt_path={path} is a directory without last.ckpt or interrupted.ckpt in {folder}; "
                "give a run directory or a checkpoint file"
            )
        return max(found, key=lambda f: (step_of(f), f.stat().st_mtime))
    if not p.is_file():
        raise CheckpointError(f"ckpt_path={path} does not exist; give a .ckpt file or a run directory")
    return p


def check_resumable(
    path: str | Path,
    model: GPTConfig,
    max_steps: int,
    vocab: str | None = None,
    optimizer: str = "adamw",
    vocab_size_unknown: bool = False,
) -> Path:
    """The checkpoint file for resuming a run of `model` on `vocab` up to `max_steps` with
    `optimizer`: it holds the full training state, the same architecture, optimizer and vocabulary,
    and a step before max_steps. `vocab_size_unknown`: the corpus is not read yet, so the model's
    vocabulary size is not compared (the vocabulary is, once it is known)."""
    f = resolve_resume(path)
    ckpt = read_checkpoint(f)
    hp = ckpt["hyper_parameters"]
    if vocab is not None and hp["vocab"] != vocab:
        raise ConfigError(
            f"ckpt_path={f} was trained on a vocabulary of {len(hp['vocab'])} characters, this corpus has "
            f"{len(vocab)}; resume with the corpus it was trained on (data.path)"
        )
    try:
        theirs, ours = GPTConfig.from_dict(dict(hp["model"])).to_dict(), model.to_dict()
    except ConfigError as e:
        raise CheckpointError(f"ckpt_path={f}: its model config is invalid: {e}") from None
    differ = [
        f"model.{k}={theirs[k]!r} there, {ours[k]!r} here"
        for k in GPTConfig.ARCHITECTURE
        if theirs[k] != ours[k] and not (k == "vocab_size" and vocab_size_unknown)
    ]
    theirs_opt = hp.get("name", "adamw")  # checkpoints from before optim=muon were all AdamW's
    if theirs_opt != optimizer:
        differ.append(f"optim={theirs_opt} there, {optimizer} here: its optimizer state is another optimizer's")
    if differ:
        raise ConfigError(f"ckpt_path={f} is from a different model ({'; '.join(differ)}); resume with its config")
    if not ckpt.get("optimizer_states") or "global_step" not in ckpt:
        raise CheckpointError(
            f"ckpt_path={f} holds weights only, not a training state (optimizer, step); it can be sampled or "
            "evaluated but not resumed"
        )
    step = ckpt["global_step"]
    if step >= max_steps:
        raise ConfigError(
            f"ckpt_path={f} is at step {step} and trainer.max_steps={max_steps}: that run has already finished; "
            f"raise trainer.max_steps above {step} to train it further"
        )
    return f


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents, read as tensors and plain data only."""
    p = resolve_checkpoint(path)
    if not zipfile.is_zipfile(p):  # torch.save writes a zip archive; a cut copy loses its directory at the end
        raise CheckpointError(
            f"ckpt_path={p} is not a readable checkpoint: it is not a file torch.save wrote, or it was cut short"
        )
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's own text here advises weights_only=False, which would run the code
        raise CheckpointError(
            f"ckpt_path={p} is not a readable checkpoint: it holds objects that would need code to load, "
            "and shakegpt never runs code from a checkpoint"
        ) from None
    except Exception as e:  # a damaged archive
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"ckpt_path={p} is not a readable checkpoint (truncated or corrupt?): {reason}") from None
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    if not isinstance(hp, dict) or "model" not in hp or "vocab" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(f"ckpt_path={p} is not a shakegpt checkpoint (no model config, vocabulary or weights)")
    return ckpt


def model_from_checkpoint(path: str | Path) -> tuple[GPT, CharTokenizer, dict[str, Any]]:
    """(model in eval mode, tokenizer, checkpoint dict) from a checkpoint file or run directory."""
    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    try:
        model = GPT(GPTConfig.from_dict(dict(hp["model"])))
    except ConfigError as e:
        raise CheckpointError(f"ckpt_path={path}: its model config is invalid: {e}") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    _load_weights(model, lambda: model.load_state_dict(state), path)
    return model.eval(), CharTokenizer(hp["vocab"]), ckpt


def _load_weights(model: GPT, load, origin: str | Path) -> None:
    try:
        load()
    except (RuntimeError, KeyError) as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(
            f"{origin}: the weights do not fit the model config "
            f"(d_model={model.cfg.d_model}, n_layer={model.cfg.n_layer}, vocab_size={model.cfg.vocab_size}): {detail}"
        ) from None


BUNDLE_FILES = ("model.safetensors", "config.json", "tokenizer.json")


def _write_export(out_dir: str | Path, names: tuple[str, ...], overwrite: bool, prepare, write) -> Path:
    """Write an export into `out_dir`: refused where one is already there (any of `names`) unless
    `overwrite`; `prepare()` runs before anything is written (it loads and checks the model) and
    returns what `write(folder, prepared)` writes. The files are written beside the folder's contents
    first and moved into place at the end, so a failed export leaves what was there."""
    out = Path(out_dir).expanduser()
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise CheckpointError(
            f"{out} already holds an export ({', '.join(existing)}); choose another folder, or pass --force to replace it"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, not a folder; choose a folder for the export")
    prepared = prepare()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
            write(Path(tmp), prepared)
            for f in sorted(Path(tmp).iterdir()):
                os.replace(f, out / f.name)
    except OSError as e:
        raise CheckpointError(f"the export could not be written to {out}: {e.strerror or e}") from None
    return out


def export_bundle(ckpt_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write `model.safetensors`, `config.json` and `tokenizer.json` for the checkpoint into `out_dir`
    (see `_write_export` for what is refused and how a failure leaves the folder)."""

    def write(folder: Path, loaded) -> None:
        model, tokenizer, _ = loaded
        save_model(model, str(folder / "model.safetensors"))  # handles the tied head/embedding matrix
        (folder / "config.json").write_text(json.dumps(model.cfg.to_dict(), indent=2))
        tokenizer.save(folder / "tokenizer.json")

    return _write_export(out_dir, BUNDLE_FILES, overwrite, lambda: model_from_checkpoint(ckpt_path), write)


def val_loss_of(ckpt: dict[str, Any]) -> float | None:
    """The val loss a checkpoint was saved at, as its checkpoint callback recorded it (None if it has none)."""
    for state in (ckpt.get("callbacks") or {}).values():
        if isinstance(state, dict) and state.get("monitor") == "val/loss":
            score = state.get("current_score", state.get("best_model_score"))
            if score is not None:
                return float(score)
    return None


def export_hf(ckpt_path: str | Path, out_dir: str | Path, command: str | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint's model as a Hugging Face `transformers` model directory (`shakegpt.hf`):
    weights, config, tokenizer and a model card naming its val loss and `command`. A model no
    `transformers` architecture computes exactly is refused before anything is written."""
    from shakegpt import hf

    def prepare():
        model, tokenizer, ckpt = model_from_checkpoint(ckpt_path)
        hf.check_exportable(model.cfg)
        try:
            import tokenizers  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--format hf needs the transformers and tokenizers libraries: pip install 'shakegpt[hf]'"
            ) from None
        arch = hf.HF_ARCHITECTURES[model.cfg.pos_encoding].name
        card = hf.model_card(model.cfg, arch, val_loss_of(ckpt), ckpt.get("global_step"), command)
        return model, tokenizer, card

    def write(folder: Path, prepared) -> None:
        model, tokenizer, card = prepared
        hf.save_hf(model, tokenizer, folder, card)

    return _write_export(out_dir, hf.HF_FILES, overwrite, prepare, write)


def load_bundle(path: str | Path) -> tuple[GPT, CharTokenizer]:
    """(model in eval mode, tokenizer) from a directory written by `export_bundle`."""
    p = Path(path).expanduser()
    missing = [n for n in BUNDLE_FILES if not (p / n).is_file()]
    if missing:
        raise CheckpointError(f"bundle {p} lacks {', '.join(missing)}; export one with python -m shakegpt export")
    try:
        cfg = GPTConfig.from_dict(json.loads((p / "config.json").read_text()))
        tokenizer = CharTokenizer.load(p / "tokenizer.json")
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"bundle {p}: unreadable config.json or tokenizer.json: {e}") from None
    model = GPT(cfg)
    _load_weights(model, lambda: load_model(model, str(p / "model.safetensors")), p)
    return model.eval(), tokenizer
