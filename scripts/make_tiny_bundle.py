"""Regenerate tests/fixtures/tiny-bundle: the committed random-weight bundle that runtime-only tests run on.

    python scripts/make_tiny_bundle.py            # needs the export extra (torch, transformers, onnx)

It is the bundle tests/conftest.py exports at the start of a full test run (the "tiny" shape, seed 0, init std
0.1, validated against PyTorch), so a machine without torch (``pip install -e .[serve]`` plus pytest) runs the
session, driver, CLI and server tests on the same model. Rerun it whenever the export or the manifest changes;
``tests/test_tiny_fixture.py`` fails (with torch installed) when the committed bundle no longer matches what the
exporter writes.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-bundle"
# What tests/conftest.py's tiny_export makes; change both together.
SHAPE, SEED, INIT_STD = "tiny", 0, 0.1


def build(out: Path, work: Path) -> Path:
    """Export the tiny checkpoint into ``out`` (replaced); ``work`` holds the checkpoint."""
    from edge_duet.export.checkpoint import make_checkpoint
    from edge_duet.export.onnx_export import ExportOptions, export_bundle

    ckpt = make_checkpoint(work / f"ckpt-{SHAPE}", SHAPE, seed=SEED, init_std=INIT_STD)  # as conftest names it
    if out.exists():
        shutil.rmtree(out)
    export_bundle(ckpt, out, ExportOptions(), log=lambda s: None)
    return out


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        build(FIXTURE, Path(tmp))
    size = sum(p.stat().st_size for p in FIXTURE.iterdir())
    print(f"{FIXTURE.relative_to(ROOT)}: {size / 1024:.0f} KiB in {len(list(FIXTURE.iterdir()))} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
