"""`python -m shakegpt.export`, the command's path before the layers: the command is `shakegpt.commands.export`."""

from shakegpt.commands.export import main

if __name__ == "__main__":
    main()
