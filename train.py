"""Train a character-level GPT on tinyshakespeare: `python train.py model=v3` (see README)."""

from shakegpt.commands.train import main

if __name__ == "__main__":
    main()
