"""The package's layers, as the README's code map draws them, and the one rule each keeps:

- the core (`shakegpt/*.py`): plain PyTorch, imports neither Lightning nor Hydra/OmegaConf, nor a layer above;
- `shakegpt/training/`: Lightning, never Hydra/OmegaConf, nor the run layer or the commands;
- `shakegpt/run/`: the only library code that sees a Hydra config; never imports a command;
- `shakegpt/commands/`: one entry each; they import the layers, never each other.

Nothing in the package imports `tests/`, and no module imports itself back through others (no cycles),
whether the import is at the top of a file or inside a function."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shakegpt"
# `python -m shakegpt.<command>`, the commands' paths before the layers: each only runs a command's main
SHIMS = {"sample", "evaluate", "export", "results", "bench"}
FRAMEWORKS = {"lightning", "pytorch_lightning", "torchmetrics"}
CONFIG_SYSTEMS = {"hydra", "omegaconf"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "conf" not in p.relative_to(PACKAGE).parts}


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 2:
        return parts[1]  # training, run, commands
    if parts[-1] in SHIMS:
        return "shim"
    return "top" if parts[-1] in ("shakegpt", "__main__") else "core"


def imported(module: str) -> set[str]:
    """Every module `module` imports, anywhere in the file; `from shakegpt.run import checks` counts
    as shakegpt.run.checks."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return names


def ours(module: str) -> set[str]:
    return {m for m in imported(module) if m in MODULES and m != module}


def roots(module: str) -> set[str]:
    return {m.split(".")[0] for m in imported(module)}


def of_layer(name: str) -> list[str]:
    return [m for m in MODULES if layer(m) == name]


def test_the_tree_has_each_layer():
    assert {layer(m) for m in MODULES} == {"top", "core", "training", "run", "commands", "shim"}
    assert len(of_layer("core")) >= 10 and len(of_layer("commands")) >= 7


@pytest.mark.parametrize("module", of_layer("core"))
def test_the_core_is_plain_pytorch(module):
    assert roots(module) & (FRAMEWORKS | CONFIG_SYSTEMS) == set(), roots(module)
    assert {layer(m) for m in ours(module)} <= {"core", "top"}, ours(module)


@pytest.mark.parametrize("module", of_layer("training"))
def test_the_lightning_layer_knows_no_config_system(module):
    assert roots(module) & CONFIG_SYSTEMS == set(), roots(module)
    assert {layer(m) for m in ours(module)} <= {"core", "training", "top"}, ours(module)


@pytest.mark.parametrize("module", of_layer("run"))
def test_the_run_layer_imports_no_command(module):
    assert {layer(m) for m in ours(module)} <= {"core", "training", "run", "top"}, ours(module)


@pytest.mark.parametrize("module", of_layer("commands"))
def test_no_command_imports_another(module):
    assert {m for m in ours(module) if layer(m) == "commands"} <= {"shakegpt.commands"}, ours(module)


@pytest.mark.parametrize("module", sorted(SHIMS))
def test_an_old_command_path_only_runs_the_command(module):
    name = f"shakegpt.{module}"
    assert {layer(m) for m in ours(name)} == {"commands"} and roots(name) <= {"shakegpt", "sys"}, imported(name)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_nothing_in_the_package_imports_the_tests(module):
    assert "tests" not in roots(module)


def test_no_import_cycles():
    graph = {m: ours(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                cycle = [*path[path.index(n) :], n]
                raise AssertionError(" -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
    """The test above can fail: a made-up import of the run layer from the core is a cycle it names."""
    real = ours
    monkeypatch.setitem(
        globals(), "ours", lambda m: real(m) | ({"shakegpt.run.checks"} if m == "shakegpt.optim" else set())
    )
    with pytest.raises(AssertionError, match=r"shakegpt.optim -> .*shakegpt.optim"):
        test_no_import_cycles()


def test_the_tests_are_laid_out_like_the_package():
    """tests/<layer>/ holds the tests of shakegpt/<layer>/ (training, run, commands); the core's tests
    and those of the project as a whole (docs, layout, install, notebooks, GPU) are in tests/."""
    tests = Path(__file__).resolve().parent
    layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    test_dirs = {p.name for p in tests.iterdir() if p.is_dir() and any(p.glob("test_*.py"))}
    assert test_dirs == layers
    for d in test_dirs:
        assert (tests / d / "__init__.py").is_file(), f"tests/{d} needs __init__.py (its modules import ..conftest)"


def test_the_readme_code_map_names_every_module():
    readme = (PACKAGE.parent / "README.md").read_text()
    code_map = readme.split("## Code map", 1)[1].split("\n## ", 1)[0]
    missing = [
        str(path.relative_to(PACKAGE))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "__init__.py"
        and path.stem not in SHIMS
        and "conf" not in path.relative_to(PACKAGE).parts
        and path.name not in code_map
        and path.stem not in code_map
    ]
    assert not missing, f"the README's code map does not name {missing}"


@pytest.mark.parametrize(
    "module", ["shakegpt.commands.train", "shakegpt.commands.sample", "shakegpt.commands.evaluate"]
)
def test_a_command_imports_no_torch_before_it_runs(module):
    """A command's module loads without torch or Lightning, so `--help`, a bad value and a missing
    checkpoint are answered at once (a module-level import of a Lightning-layer name undoes that)."""
    import subprocess
    import sys

    code = (
        f"import sys, {module}; "
        "loaded = {m.split('.')[0] for m in sys.modules} & {'torch', 'lightning', 'pytorch_lightning', 'torchmetrics'}; "
        "assert not loaded, loaded"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-1500:]
