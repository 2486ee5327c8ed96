"""Build step: the wheel carries configs/ and launch/ under openbook/_bundled/ (openbook.resources finds
them there), so recipes and launch templates work without a checkout. Metadata lives in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        for kind in ("configs", "launch"):
            dest = Path(self.build_lib) / "openbook" / "_bundled" / kind
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(ROOT / kind, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildWithRecipes})
