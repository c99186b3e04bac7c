"""What a wheel ships is decided by pyproject.toml: every file of the demo model and the kiosk page must match its
package-data globs (a new file that does not would be missing from the wheel while the checkout works).
scripts/check_wheel.sh, run by CI, builds and installs the real wheel."""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
DATA_PACKAGES = {"edge_duet.apps.static": ROOT / "apps" / "static", "edge_duet.models.demo": ROOT / "edge_duet" / "models" / "demo"}


def setuptools_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


@pytest.mark.parametrize("package", sorted(DATA_PACKAGES))
def test_data_folders_ship_every_file(package):
    config = setuptools_config()
    assert package in config["packages"], f"{package} is not in [tool.setuptools] packages"
    globs = config["package-data"][package]
    files = [p for p in DATA_PACKAGES[package].iterdir() if p.is_file()]
    assert files
    missed = [p.name for p in files if not any(fnmatch.fnmatch(p.name, g) for g in globs)]
    assert missed == [], f"not matched by {package}'s package-data {globs}: {missed}"


def test_every_package_folder_exists():
    config = setuptools_config()
    mapping = config["package-dir"]
    for package in config["packages"]:
        parent = max((p for p in mapping if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / mapping[parent] / Path(*package[len(parent):].lstrip(".").split(".") if package != parent else ())
        assert folder.is_dir(), f"{package} -> {folder} does not exist"
