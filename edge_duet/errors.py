"""The small exception hierarchy every stage raises; the CLI maps each class to an exit code.

Every message says what is wrong, what is allowed, and how to fix it.
"""

from __future__ import annotations


class EdgeDuetError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code = 1


class UsageError(EdgeDuetError):
    """A bad option or argument combination."""

    exit_code = 2


class OutputError(UsageError):
    """An output path that cannot be written: a folder where a file belongs, a file in the way, no permission.
    Checked before any work starts (``apps/outputs.py``), so it shares the usage exit code."""


class CheckpointError(EdgeDuetError):
    """A checkpoint directory that is missing, of the wrong architecture, or corrupt."""

    exit_code = 3


class BundleError(EdgeDuetError):
    """A model bundle that is missing, incomplete, corrupt or of an unsupported version."""

    exit_code = 4


class ValidationError(EdgeDuetError):
    """ONNX graphs that disagree with the PyTorch reference. ``mismatches`` lists every one found."""

    exit_code = 5

    def __init__(self, message: str, mismatches: list[str] | None = None):
        self.mismatches = list(mismatches or [])
        if self.mismatches:
            message = message + "\n" + "\n".join(f"  - {m}" for m in self.mismatches)
        super().__init__(message)


class InputError(EdgeDuetError):
    """Unreadable or malformed user input: a JSON file, an image, a video."""

    exit_code = 6


class SourceError(EdgeDuetError):
    """A camera, stream or file source that cannot be opened or stopped delivering."""

    exit_code = 7


class ProviderError(EdgeDuetError):
    """An execution provider that was requested but is not what the session actually got."""

    exit_code = 8


class ServerError(EdgeDuetError):
    """A remote serving engine (vLLM, ``--server``) that failed a request; the subclasses say how."""

    exit_code = 12


class ServerUnavailable(ServerError):
    """The server could not be reached (refused, reset, DNS) even after the retries."""


class ServerTimeout(ServerError):
    """The server accepted the request but sent nothing for longer than the read timeout."""


class ServerModelMismatch(ServerError):
    """The server runs, but does not serve the model asked for (or serves it with too short a context)."""


class ServerRejected(ServerError):
    """The server answered a request with an error status (bad token, bad request, engine failure)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


class MissingExtraError(EdgeDuetError):
    """An optional dependency is not installed; the message names the extra."""

    exit_code = 9

    def __init__(self, module: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the Python package '{module}', which is not installed. "
            f'Install it with: pip install "edge-duet[{extra}]"'
        )


def require(module: str, extra: str, what: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, what) from exc
