"""`python -m shakegpt.evaluate`, the command's path before the layers: the command is `shakegpt.commands.evaluate`."""

from shakegpt.commands.evaluate import main

if __name__ == "__main__":
    main()
