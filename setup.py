"""Build hook (the project itself is described in pyproject.toml): ship a copy of the top-level
`conf/` inside the package as `shakegpt/conf/`, so an installed wheel finds its configs. An
editable install reads `conf/` where it is (see shakegpt/run/configs.py)."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConfigs(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "shakegpt" / "conf"
        shutil.copytree(CONF, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithConfigs})
