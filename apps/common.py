"""What every CLI command shares: error mapping, console output, the default model."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable, TypeVar

import typer

from edge_duet.errors import EdgeDuetError

F = TypeVar("F", bound=Callable)


def handle_errors(fn: F) -> F:
    """Turn an :class:`EdgeDuetError` into a one-paragraph message on stderr and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeDuetError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def default_model_dir() -> Path:
    """The demo bundle shipped inside the package (see docs/MODEL_CARD.md)."""
    import edge_duet

    return Path(edge_duet.__file__).resolve().parent / "models" / "demo"


def resolve_model(model: Path | None) -> Path:
    from edge_duet.errors import BundleError

    if model is not None:
        return model
    path = default_model_dir()
    if not (path / "manifest.json").is_file():
        raise BundleError(
            f"no --model given and the bundled demo model is missing at {path}. "
            "Pass a bundle made with `edge-duet export CHECKPOINT BUNDLE`, or reinstall edge-duet."
        )
    return path


def eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)
