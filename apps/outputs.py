"""One rule for every path the CLI writes (events, predictions, reports, plots, WAV files, benchmark folders).

1. Checked before any work starts (:func:`check_file`, :func:`check_dir`): a directory where a file belongs, a file
   where a folder belongs, or a place that cannot be written is an :class:`OutputError` (exit code 2) naming the
   option and the fix, not a traceback an hour into a run.
2. Written under a temporary name in the same folder and renamed at the end (:func:`atomic_path`): a command that
   fails leaves the user's previous file as it was and no half-written one beside it.

The one exception is ``run --events``, a live log that must be readable while the run goes on: it is checked the
same way, created only once the model has loaded, flushed per event, and always ends with an ``end`` record.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from edge_duet.errors import OutputError


def _first_existing(path: Path) -> Path:
    """The nearest ancestor of ``path`` (or ``path`` itself) that exists."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, flag: str, shown: Path) -> None:
    """Create the missing folders up to ``folder`` and a probe file in it, then remove both; raise
    :class:`OutputError` if that fails. Nothing is left behind: the writer creates the folders when it writes.

    Actually writing is the only check that holds as root and on read-only mounts (``os.access`` says yes to both)."""
    existing = _first_existing(folder)
    if not existing.is_dir():
        raise OutputError(f"{flag} {shown}: {existing} is a file, not a folder. Give a path in a folder.")
    folder = folder.absolute()
    created = [p for p in (folder, *folder.parents) if p.is_relative_to(existing) and p != existing]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edge-duet-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(
            f"{flag} {shown}: cannot write in {folder} ({reason}). Give a path in a folder you can write to."
        ) from None
    finally:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()


def check_file(path: Path | None, flag: str, example: str = "out.jsonl") -> Path | None:
    """``path`` will be written as a file: not a directory, its folder writable (created if missing)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; it needs a file name, e.g. {flag} {path / example}.")
    if path.exists() and not path.is_file():
        raise OutputError(f"{flag} {path} exists and is not a regular file; give another file name.")
    _probe_writable(path.parent, flag, path)
    return path


def check_dir(path: Path | None, flag: str) -> Path | None:
    """``path`` is a folder files will be written into: not a file, writable (created if missing)."""
    if path is None:
        return None
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; it needs a folder (missing folders are created).")
    _probe_writable(path, flag, path)
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error it is removed.

    ::

        with atomic_path(out) as tmp:
            tmp.write_text(...)          # `out` appears, whole, only here
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix is kept: writers such as matplotlib's savefig pick the format from it
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
