"""What every CLI command shares: error mapping, console output, the default model."""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path
from typing import Callable, TypeVar

import typer

from edge_duet.bundle_io import default_model_dir  # noqa: F401  (the CLI's default --model)
from edge_duet.errors import EdgeDuetError, MissingExtraError

F = TypeVar("F", bound=Callable)

# Top-level modules of the optional extras (pyproject.toml) -> the extra that installs them. A command that imports
# one without require() still ends in the same message and exit code as those that do.
EXTRA_OF_MODULE = {
    "torch": "export", "transformers": "export", "onnxscript": "export", "safetensors": "export", "onnx": "export",
    "onnx_ir": "quant", "starlette": "serve", "uvicorn": "serve", "websockets": "serve", "matplotlib": "plots",
}


# Library errors name an option as the Python API spells it, in backquotes (`max_context_tokens`, a source kind
# such as `camera`); on the command line the flag that sets it is what helps (edge_duet/errors.py says so).
FLAG_OF_OPTION = {
    "max_context_tokens": "--max-context", "providers": "--providers", "threads": "--threads",
    "decoder": "--decoder", "token_drop_threshold": "--token-drop", "max_pixels": "--max-pixels",
    "ServerOptions.url": "--server", "ServerOptions.served_model": "--served-model",
    "ServerOptions.token": "--server-token", "ServerOptions.api": "--server-api",
    "ServerOptions.read_timeout_s": "--server-timeout", "model": "--model",
    "SpeechOptions.engine": "--tts", "SpeechOptions.voice": "--voice",
    "camera": "--camera", "file": "--video", "url": "--url", "gst": "--gst", "demo": "--demo",
    "overwrite": "--overwrite", "ExportOptions.quantize": "--quantize", "frame_interval_s": "--frame-interval",
    "frames_per_turn": "--frames-per-turn", "n_examples": "--examples", "turn_interval_s": "--turn-interval",
    "QuantOptions.block_size": "--block-size", "QuantOptions.accuracy_level": "--accuracy-level",
    "CompareOptions.probe_turns": "--probe-turns", "CompareOptions.probe_tokens": "--probe-tokens",
    "EngineOptions.precision": "--precision", "EngineOptions.builder": "--builder",
    "EngineOptions.profiles": "--profiles",
    "BenchRequest.turns": "--turns", "BenchRequest.report_turns": "--at", "BenchRequest.baseline": "--baseline",
    "BenchRequest.checkpoint": "--checkpoint", "BenchRequest.shape": "--shape", "BenchRequest.quantize": "--quantize",
    "BenchRequest.variants": "--variant", "BenchRequest.peers": "--peers",
}
_OPTION = re.compile(r"`([A-Za-z_][\w.]*)`")


def cli_text(exc: BaseException | str) -> str:
    """An error message as the command line shows it: each option the library names becomes its flag."""
    return _OPTION.sub(lambda m: FLAG_OF_OPTION.get(m.group(1), m.group(0)), str(exc))


def missing_extra(exc: ModuleNotFoundError, command: str) -> MissingExtraError | None:
    """The :class:`MissingExtraError` for a missing optional module, or ``None`` for anything else (a real bug)."""
    root = (exc.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    return MissingExtraError(root, extra, f"`edge-duet {command}`") if extra else None


def handle_errors(fn: F) -> F:
    """Turn an :class:`EdgeDuetError` into a one-paragraph message on stderr and its exit code.

    Two more kinds never end in a traceback: a missing optional module (the extra to install, exit 9) and an
    operating-system error on a named file that no earlier check caught, e.g. a disk that fills up (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeDuetError as exc:
            typer.echo(f"error: {cli_text(exc)}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except ModuleNotFoundError as exc:
            known = missing_extra(exc, _command_name(fn))
            if known is None:
                raise
            typer.echo(f"error: {known}", err=True)
            raise typer.Exit(known.exit_code) from None
        except OSError as exc:
            if exc.filename is None:
                raise
            typer.echo(f"error: {exc.filename}: {exc.strerror or exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _command_name(fn: Callable) -> str:
    """``export_cmd`` -> ``export``, ``train_demo`` -> ``train-demo``: the command modules name functions so."""
    name = fn.__name__
    for suffix in ("_command", "_cmd"):
        name = name.removesuffix(suffix)
    return name.replace("_", "-")


def resolve_model(model: Path | None) -> Path:
    """``--model``, checked for the mistakes a new user makes, or the bundled demo model."""
    from edge_duet.bundle_io import demo_model

    if model is not None:
        _check_bundle_dir(Path(model))
        return model
    return demo_model()


def eprint(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def _check_bundle_dir(model: Path) -> None:
    """Two mistakes a new user makes with --model, each with its fix (Manifest.load checks the rest)."""
    from edge_duet.errors import BundleError

    if model.exists() and not model.is_dir():
        raise BundleError(f"--model {model} is a file; give the bundle's folder (the one holding manifest.json).")
    if not (model / "manifest.json").is_file() and (model / "config.json").is_file():
        suggested = model.parent / f"{model.name}-bundle"
        raise BundleError(
            f"--model {model} is a Hugging Face checkpoint, not an ONNX bundle. Export it into a new folder first: "
            f"`edge-duet export {model} {suggested}`, then pass --model {suggested}."
        )
