"""`python -m shakegpt [train|sample|evaluate|export|results|bench|gpu-check] ARGS…`: one entry for every command.

Without a command name, `python -m shakegpt ARGS…` trains, as `python train.py ARGS…` does.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "shakegpt.commands.train",
    "sample": "shakegpt.commands.sample",
    "evaluate": "shakegpt.commands.evaluate",
    "eval": "shakegpt.commands.evaluate",
    "export": "shakegpt.commands.export",
    "results": "shakegpt.commands.results",
    "bench": "shakegpt.commands.bench",
    "gpu-check": "shakegpt.commands.gpu_check",
}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args and args[0] in COMMANDS else "train"
    rest = args[1:] if args and args[0] in COMMANDS else args
    # Hydra reads sys.argv itself: leave it as the command's own arguments
    sys.argv = [f"python -m shakegpt {name}", *rest]
    importlib.import_module(COMMANDS[name]).main()


if __name__ == "__main__":
    main()
