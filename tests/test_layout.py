"""The package's shape: no command imports another command, the model knows nothing of Lightning or Hydra."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shakegpt"
ENTRIES = ("train", "sample", "evaluate", "export", "results", "bench")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("entry", ENTRIES)
def test_no_command_imports_another(entry):
    others = {f"shakegpt.{e}" for e in ENTRIES if e != entry}
    assert imported_modules(PACKAGE / f"{entry}.py") & others == set()


@pytest.mark.parametrize("module", ["model", "pos_encoding", "fast_cpu", "generate", "tokenizer"])
def test_the_model_side_knows_nothing_of_lightning_or_hydra(module):
    roots = {name.split(".")[0] for name in imported_modules(PACKAGE / f"{module}.py")}
    assert roots & {"lightning", "pytorch_lightning", "hydra", "omegaconf"} == set(), roots
