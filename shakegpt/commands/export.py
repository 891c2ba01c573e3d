"""`python -m shakegpt export CKPT OUT_DIR [--format bundle|hf]`: write a checkpoint as a bundle of
plain files (model.safetensors, config.json, tokenizer.json) that loads without Lightning or Hydra,
or with `--format hf` as a Hugging Face model directory that `transformers` loads without shakegpt."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from shakegpt.errors import exit_on_user_error
from shakegpt.training.checkpoint import export_bundle, export_hf, resolve_checkpoint


def training_command(ckpt_path: str | Path) -> str | None:
    """`python train.py <overrides>` as the checkpoint's run was started, from the run directory's
    .hydra/overrides.yaml (None for a checkpoint outside a run directory)."""
    from omegaconf import OmegaConf

    ckpt = resolve_checkpoint(ckpt_path)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return None
    return " ".join(["python train.py", *(shlex.quote(str(o)) for o in OmegaConf.load(overrides))])


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shakegpt export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a .ckpt file or a run directory (its best checkpoint)")
    p.add_argument("out_dir", help="the directory to write")
    p.add_argument(
        "--format",
        choices=("bundle", "hf"),
        default="bundle",
        help="bundle: shakegpt's plain files; hf: a transformers model directory (pip install 'shakegpt[hf]')",
    )
    p.add_argument("--force", action="store_true", help="replace an export already in out_dir")
    args = p.parse_args(argv)
    if args.format == "hf":
        out = export_hf(args.ckpt, args.out_dir, training_command(args.ckpt), overwrite=args.force)
        print(f"written: {out} (transformers: AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained)")
        return
    out = export_bundle(args.ckpt, args.out_dir, overwrite=args.force)
    print(f"written: {out}/model.safetensors, config.json, tokenizer.json")


if __name__ == "__main__":
    main()
