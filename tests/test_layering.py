"""The layering of pyproject.toml's [tool.importlinter] contracts holds, and a broken one fails the check.

The contracts are run by import-linter through scripts/lint_imports.py, which lays the checkout out as a wheel
would (the sub-packages live outside edge_duet/). The second test breaks a copy of the tree on purpose: a check
that cannot fail proves nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter", reason='import-linter is in the dev extra: pip install -e ".[dev]" (Python 3.11+)')
tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "lint_imports.py"
CONTRACTS = {c["id"]: c["name"] for c in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]}


def lint(root: Path) -> subprocess.CompletedProcess:
    # Unwrapped output: rich wraps at the terminal's width, which would cut contract names in two.
    return subprocess.run([sys.executable, str(SCRIPT), "--root", str(root), "--no-logo"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "400"}, cwd=root)


def copy_tree(dest: Path) -> Path:
    """The package folders of pyproject's package-dir and pyproject.toml, Python files only."""
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for folder in set(package_dir.values()):
        shutil.copytree(ROOT / folder, dest / folder, ignore=lambda d, names: [
            n for n in names if not n.endswith(".py") and not (Path(d) / n).is_dir() or n == "__pycache__"])
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def test_contracts_are_kept():
    result = lint(ROOT)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out, out
    for name in CONTRACTS.values():
        assert f"{name} KEPT" in out, out


# (file to break, the line added, the contract it breaks, what the report names)
VIOLATIONS = {
    "runtime imports export": ("runtime/clock.py", "import edge_duet.export", "runtime",
                               "edge_duet.runtime.clock -> edge_duet.export"),
    "runtime imports torch": ("runtime/positions.py", "import torch", "runtime",
                              "edge_duet.runtime.positions -> torch"),
    "core imports the runtime": ("edge_duet/manifest.py", "from edge_duet.runtime import engine", "core",
                                 "edge_duet.manifest -> edge_duet.runtime.engine"),
    "eval imports the runtime": ("eval/pauc.py", "from edge_duet.runtime.events import Reply", "layers",
                                 "edge_duet.eval.pauc -> edge_duet.runtime.events"),
    "quant imports export": ("quant/engines.py", "from edge_duet.export import checkpoint", "layers",
                             "edge_duet.quant.engines -> edge_duet.export.checkpoint"),
    "runtime imports bench": ("runtime/clock.py", "from edge_duet.bench import stream", "runtime",
                              "edge_duet.runtime.clock -> edge_duet.bench.stream"),
    "export imports bench": ("export/graphs.py", "from edge_duet.bench import stream", "layers",
                             "edge_duet.export.graphs -> edge_duet.bench.stream"),
    "public API imports train": ("edge_duet/__init__.py", "from .train import sft", "public-api",
                                 "edge_duet -> edge_duet.train.sft"),
    "public API imports an app": ("edge_duet/__init__.py", "from .apps import runner", "public-api",
                                  "edge_duet -> edge_duet.apps.runner"),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_a_forbidden_import_breaks_its_contract(tmp_path, case):
    path, line, contract, reported = VIOLATIONS[case]
    tree = copy_tree(tmp_path)
    with open(tree / path, "a") as f:
        f.write(f"\n{line}  # a forbidden import, on purpose\n")
    result = lint(tree)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert f"{CONTRACTS[contract]} BROKEN" in out, out
    assert reported in out, out
