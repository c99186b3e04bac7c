"""Check the layering contracts of pyproject.toml (``[tool.importlinter]``) with import-linter, over a checkout.

import-linter (through grimp) finds a package's modules by walking the folder of its ``__init__.py``. Our
sub-packages live in other folders (``[tool.setuptools] package-dir``: ``edge_duet.runtime`` = ``runtime/``, ...),
which an editable install resolves with an import hook that grimp does not follow: run in the checkout,
``lint-imports`` would see ``edge_duet/`` alone. So this script lays the checkout out as an installed wheel is
laid out, with symbolic links in a temporary folder, and runs ``lint-imports`` there::

    TMP/edge_duet/manifest.py  -> CHECKOUT/edge_duet/manifest.py   (every entry of edge_duet/)
    TMP/edge_duet/runtime      -> CHECKOUT/runtime                 (every other package-dir entry)
    TMP/pyproject.toml         -> CHECKOUT/pyproject.toml          (the contracts)

Usage: ``python scripts/lint_imports.py [--root CHECKOUT] [lint-imports options]``. The exit code is
lint-imports': 0 when every contract is kept, 1 when one is broken. Needs the dev extra (import-linter).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lay_out(root: Path, dest: Path) -> None:
    """Link ``root``'s packages into ``dest`` at the paths their module names give."""
    import tomllib  # Python 3.11, as import-linter

    package_dir: dict[str, str] = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    for name in sorted(package_dir, key=lambda n: n.count(".")):  # parents before the packages mapped inside them
        src = (root / package_dir[name]).resolve()
        target = dest.joinpath(*name.split("."))
        if target.exists() or target.is_symlink():
            raise SystemExit(f"{name}: {target.relative_to(dest)} is already taken by a file of its parent package")
        if any(other.startswith(name + ".") for other in package_dir):
            target.mkdir(parents=True)  # a real folder, so the packages mapped inside it can be linked in
            for entry in src.iterdir():
                if entry.name != "__pycache__":
                    (target / entry.name).symlink_to(entry)
        else:
            target.symlink_to(src, target_is_directory=True)
    (dest / "pyproject.toml").symlink_to((root / "pyproject.toml").resolve())


def lint(root: Path, lint_args: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="edge-duet-layout-") as tmp:
        dest = Path(tmp)
        lay_out(root, dest)
        # The laid-out tree first on the path: it wins over the editable install's hook (which comes after the
        # path finder). lint-imports reads pyproject.toml from its working folder and caches its graph there.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([tmp, *filter(None, [os.environ.get("PYTHONPATH")])])}
        cmd = [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()"]
        return subprocess.run([*cmd, *lint_args], cwd=dest, env=env).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout (default: this script's)")
    args, lint_args = parser.parse_known_args()
    try:
        import importlinter  # noqa: F401
    except ImportError:
        print('import-linter is not installed: pip install -e ".[dev]" (it needs Python 3.11)', file=sys.stderr)
        return 2
    return lint(args.root.resolve(), lint_args)


if __name__ == "__main__":
    sys.exit(main())
