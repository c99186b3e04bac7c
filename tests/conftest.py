"""Shared fixtures: small random-weight checkpoints and their exported bundles, built once per test run.

Without torch (a runtime-only install: ``pip install -e .[serve]`` plus pytest) ``tiny_bundle`` is the committed
copy in tests/fixtures/tiny-bundle (``python scripts/make_tiny_bundle.py`` regenerates it; tests/test_tiny_fixture.py
checks it against a fresh export), so the session, driver, CLI and server tests run there too. With torch it is
exported here, from the same checkpoint as ``tiny_checkpoint``, so parity tests compare the pair they made.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _export(tmp_root: Path, shape: str, seed: int = 0, **ckpt_kwargs) -> tuple[Path, Path]:
    from edge_duet.export.checkpoint import make_checkpoint
    from edge_duet.export.onnx_export import ExportOptions, export_bundle

    ckpt = make_checkpoint(tmp_root / f"ckpt-{shape}", shape, seed=seed, init_std=0.1, **ckpt_kwargs)
    bundle = tmp_root / f"bundle-{shape}"
    export_bundle(ckpt, bundle, ExportOptions(), log=lambda s: None)
    return ckpt, bundle


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, bundle dir) of the "tiny" shape: exported and validated once per session."""
    pytest.importorskip("torch", reason="exporting needs the export extra (torch)")
    return _export(tmp_path_factory.mktemp("tiny"), "tiny")


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_export) -> Path:
    return tiny_export[0]


FIXTURE_BUNDLE = Path(__file__).resolve().parent / "fixtures" / "tiny-bundle"


def have_torch() -> bool:
    return importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="session")
def tiny_bundle(request) -> Path:
    """A tiny random-weight bundle (2 layers, hidden 64): seconds to run, says nonsense, exercises every path.
    Exported from ``tiny_checkpoint`` where torch is installed, else the committed copy of that export."""
    if not have_torch():
        return FIXTURE_BUNDLE
    return request.getfixturevalue("tiny_export")[1]
