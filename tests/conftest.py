"""Shared fixtures: small random-weight checkpoints and their exported bundles, built once per test run."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def tiny_bundle(tiny_export) -> Path:
    """A tiny random-weight bundle (2 layers, hidden 64): seconds to run, says nonsense, exercises every path."""
    return tiny_export[1]
