"""The distribution maps every source folder: a package missing from pyproject.toml would install broken."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).parents[2]
FOLDERS = {"core": "tether.core", "adapters": "tether.adapters", "sim": "tether.sim"}


def test_every_package_folder_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == listed


def test_shipped_scenarios_are_package_data() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "scenarios/*.yaml" in data["tether.sim"]
    assert list((ROOT / "sim" / "scenarios").glob("*.yaml"))


def test_test_module_names_are_unique() -> None:
    """pytest's default import mode imports test modules by basename: two test_x.py in different folders
    make collection fail with "import file mismatch"."""
    names = [path.name for path in (ROOT / "tests").rglob("test_*.py")]
    assert sorted(name for name in set(names) if names.count(name) > 1) == []
