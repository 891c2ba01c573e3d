"""`python -m shakegpt.results`, the command's path before the layers: the command is `shakegpt.commands.results`."""

from shakegpt.commands.results import main

if __name__ == "__main__":
    main()
