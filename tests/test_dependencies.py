"""The dependency ranges users install from: the compromised Lightning releases are never admitted,
and the versions this suite runs with are."""

import os
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement

from .conftest import ROOT

tomllib = pytest.importorskip("tomllib", reason="Python 3.11+ reads pyproject.toml itself")


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["dependencies"])}


def test_the_compromised_lightning_releases_are_excluded():
    """lightning 2.6.2 and 2.6.3 ran credential-stealing code on import (advisory GHSA-w37p-236h-pfx3)."""
    lightning = requirements()["lightning"].specifier
    assert "2.6.2" not in lightning and "2.6.3" not in lightning
    assert "2.6.1" in lightning and "2.6.4" in lightning and "2.4.0" in lightning


def test_the_installed_versions_are_within_the_ranges():
    for name, req in requirements().items():
        assert req.specifier.contains(version(name), prereleases=True), f"{name} {version(name)} is outside {req}"


LOCK = ROOT / "requirements" / "lock.txt"


def locked() -> list[Requirement]:
    """The lock's requirements (name==version ; markers), each line's hashes set aside."""
    return [
        Requirement(line.rstrip(" \\"))
        for line in LOCK.read_text().splitlines()
        if line and not line[0].isspace() and not line.startswith(("#", "--"))
    ]


def test_the_lock_pins_every_package_with_hashes_and_no_compromised_release():
    reqs = locked()
    assert len(reqs) > 100
    for r in reqs:
        (spec,) = r.specifier
        assert spec.operator == "==", r
    # every pinned line is followed by at least one sha256 hash (pip's --require-hashes needs them)
    blocks = LOCK.read_text().split("\n")
    pinned = [i for i, line in enumerate(blocks) if line and not line[0].isspace() and "==" in line]
    assert all(blocks[i + 1].strip().startswith("--hash=sha256:") for i in pinned)
    for name in ("lightning", "pytorch-lightning"):
        for r in (r for r in reqs if r.name == name):
            assert str(next(iter(r.specifier)).version) not in ("2.6.2", "2.6.3"), r


def test_the_lock_covers_every_dependency_but_torch():
    """Every dependency and extra of pyproject.toml is in the lock; torch alone is left to the user's
    own install (a CPU or a CUDA build), its marker never true."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name for r in project["dependencies"]}
    wanted |= {Requirement(r).name for extra in project["optional-dependencies"].values() for r in extra}
    wanted -= {"shakegpt"}
    names = {r.name for r in locked()}
    assert wanted - names == set()
    torch_lines = [r for r in locked() if r.name == "torch"]
    assert torch_lines and all('sys_platform == "never"' in str(r.marker) for r in torch_lines)


@pytest.mark.skipif(
    not os.environ.get("SHAKEGPT_LOCKED"),
    reason="installed from the lock only where SHAKEGPT_LOCKED=1 says so (.ci/run); a plain install may be newer",
)
def test_this_suite_runs_with_the_locked_versions():
    """In CI, installed from the lock (.ci/run): each locked package that applies here is the installed version."""
    from importlib.metadata import PackageNotFoundError

    differ = []
    for r in locked():
        if r.marker is not None and not r.marker.evaluate():
            continue
        want = next(iter(r.specifier)).version
        try:
            have = version(r.name)
        except PackageNotFoundError:
            have = None
        if have != want:
            differ.append(f"{r.name}: locked {want}, installed {have}")
    assert not differ, "; ".join(differ) + " (refresh the lock, or install from it: see README, Development)"


def test_plain_pytest_runs_a_worker_per_core_with_one_thread_each():
    """The README's `pytest`: pytest-xdist, a worker per core, each worker's torch on one thread (so
    that two workers' thread pools do not fight over the cores)."""
    import torch

    addopts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["addopts"]
    assert "-n auto" in addopts
    if "PYTEST_XDIST_WORKER" not in os.environ:
        pytest.skip("run with -n 0: no workers")
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
