"""`python -m shakegpt export CKPT OUT_DIR`: write a checkpoint as a bundle of plain files
(model.safetensors, config.json, tokenizer.json) that loads without Lightning or Hydra."""

from __future__ import annotations

import argparse

from shakegpt.errors import exit_on_user_error
from shakegpt.training.checkpoint import export_bundle


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m shakegpt export", description=__doc__.split("\n")[0])
    p.add_argument("ckpt", help="a .ckpt file or a run directory (its best checkpoint)")
    p.add_argument("out_dir", help="the bundle directory to write")
    p.add_argument("--force", action="store_true", help="replace a bundle already in out_dir")
    args = p.parse_args(argv)
    out = export_bundle(args.ckpt, args.out_dir, overwrite=args.force)
    print(f"written: {out}/model.safetensors, config.json, tokenizer.json")


if __name__ == "__main__":
    main()
