"""The dependency ranges users install from: the compromised Lightning releases are never admitted,
and the versions this suite runs with are."""

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
