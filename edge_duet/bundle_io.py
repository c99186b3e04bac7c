"""Writing bundles safely: every stage that writes one (export, quantize) writes it to a temporary directory
beside the target and renames it into place only when it is complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UsageError


def prepare_target(out: Path, overwrite: bool) -> Path:
    """Check that ``out`` may be written and return a fresh temporary directory beside it."""
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it")
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
