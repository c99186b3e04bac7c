"""Where bundles are, and writing them safely: every stage that writes one (export, quantize) writes it to a
temporary directory beside the target and renames it into place only when it is complete."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import BundleError, UsageError


def default_model_dir() -> Path:
    """The demo bundle shipped inside the package (see docs/MODEL_CARD.md)."""
    return Path(__file__).resolve().parent / "models" / "demo"


def demo_model() -> Path:
    """:func:`default_model_dir`, checked: a package installed without its data files says so."""
    path = default_model_dir()
    if not (path / "manifest.json").is_file():
        raise BundleError(
            f"the bundled demo model is missing at {path}. Pass a bundle made with "
            "`edge-duet export CHECKPOINT BUNDLE`, or reinstall edge-duet."
        )
    return path


def prepare_target(out: Path, overwrite: bool) -> Path:
    """Check that ``out`` may be written and return a fresh temporary directory beside it."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; set `overwrite` to replace it")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {parent}: {exc}") from exc
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to {parent}: choose an output directory you can write to")
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


@contextlib.contextmanager
def staged_bundle(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory to write a bundle into; on success it replaces ``out``, on any failure
    (Ctrl-C included) it is removed, so a half-written bundle never sits where a good one is expected."""
    tmp = prepare_target(out, overwrite)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
