"""The project is three distributions: the core (with the lab) and the plugin packages
clipguard-cbpt and clipguard-baselines, each with its own pyproject and entry point."""

from __future__ import annotations

from importlib.metadata import distribution
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {
    "cbpt": ("clipguard-cbpt", "clipguard_cbpt"),
    "baselines": ("clipguard-baselines", "clipguard_baselines"),
}


def _pyproject(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("folder", sorted(PLUGINS))
def test_each_plugin_is_its_own_distribution(folder: str) -> None:
    name, package = PLUGINS[folder]
    project = _pyproject(ROOT / "plugins" / folder)
    assert project["project"]["name"] == name
    assert any(
        d.startswith("clipguard") and "-" not in d for d in project["project"]["dependencies"]
    )
    [(entry, module)] = project["project"]["entry-points"]["clipguard"].items()
    assert (entry, module) == (folder, f"{package}.plugin")
    assert (ROOT / "plugins" / folder / package / "py.typed").is_file()
    assert project["tool"]["setuptools"]["package-data"] == {package: ["py.typed"]}


def test_the_core_distribution_holds_only_the_core_and_the_lab() -> None:
    project = _pyproject(ROOT)
    assert project["project"]["entry-points"]["clipguard"] == {"lab": "clipguard.lab.plugin"}
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "clipguard",
        "clipguard.*",
    ]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "PLUGINS := plugins/cbpt plugins/baselines" in makefile


@pytest.mark.parametrize("folder", sorted(PLUGINS))
def test_the_installed_plugins_come_from_their_own_distribution(folder: str) -> None:
    """`make install` installs each plugin package beside the core."""
    name, package = PLUGINS[folder]
    dist = distribution(name)
    [entry] = [e for e in dist.entry_points if e.group == "clipguard"]
    assert entry.value == f"{package}.plugin"
    core_entries = {
        e.name for e in distribution("clipguard").entry_points if e.group == "clipguard"
    }
    assert core_entries == {"lab"}
