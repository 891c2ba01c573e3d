"""`python -m shakegpt.sample`, the command's path before the layers: the command is `shakegpt.commands.sample`."""

from shakegpt.commands.sample import main

if __name__ == "__main__":
    main()
