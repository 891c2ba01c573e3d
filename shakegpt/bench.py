"""`python -m shakegpt.bench [--gpu-check]`, the commands' path before the layers: the commands are
`shakegpt.commands.bench` and, with `--gpu-check`, `shakegpt.commands.gpu_check`."""

import sys

if __name__ == "__main__":
    if "--gpu-check" in sys.argv[1:]:
        from shakegpt.commands.gpu_check import main

        main([a for a in sys.argv[1:] if a != "--gpu-check"])
    else:
        from shakegpt.commands.bench import main

        main()
