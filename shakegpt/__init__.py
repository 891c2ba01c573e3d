"""shakegpt: character-level GPTs on tinyshakespeare with PyTorch Lightning and Hydra.

Entry points: `python -m shakegpt` (training; `python -m shakegpt sample|evaluate|export|results …`
for the others) and the console scripts `shakegpt-train`, `shakegpt-sample`, `shakegpt-eval`,
`shakegpt-export`, `shakegpt-results`. The model itself is `shakegpt.model.GPT`, plain PyTorch.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shakegpt")
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"
