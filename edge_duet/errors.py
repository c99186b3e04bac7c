"""The small exception hierarchy every stage raises; the CLI maps each class to an exit code.

Every error class of the project is declared here, once. Every message says what is wrong, what is allowed, and
how to fix it. Library messages name options and parameters as the API spells them (``max_context_tokens``);
the CLI adds its flag where that helps (``apps/common.py``: :data:`FLAG_HINTS`).
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


class ChildFailed(EdgeDuetError):
    """A child process (``edge_duet.isolate``) died without a result (killed for memory: exit -9)."""

    exit_code = 1


class JobFailed(EdgeDuetError):
    """A benchmark job process reported an error or died; the others go on."""


class PeerUnavailable(EdgeDuetError):
    """A peer runtime cannot run this model here (not installed, cannot convert it, no multimodal path)."""


class JudgeError(EdgeDuetError):
    """A judge endpoint that cannot be reached or refuses the requests (after the retries)."""

    exit_code = 10


class AssistantBusy(EdgeDuetError):
    """Too many commands wait for the model: the app sends questions faster than turns run."""

    exit_code = 13


class AssistantClosed(EdgeDuetError):
    """The assistant was closed; create a new one."""

    exit_code = 11


class MissingExtraError(EdgeDuetError):
    """An optional dependency is not installed; the message names the extra."""

    exit_code = 9

    def __init__(self, module: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the Python package '{module}', which is not installed. "
            f'Install it with: pip install "edge-duet[{extra}]"'
        )


class TensorRTMissing(MissingExtraError):
    """NVIDIA's ``tensorrt`` package (and a CUDA GPU) for building TensorRT engines."""

    def __init__(self, what: str = "edge-duet build-engines"):
        EdgeDuetError.__init__(
            self,
            f"{what} needs NVIDIA's `tensorrt` Python package and a CUDA GPU. On Jetson it ships with JetPack "
            "(sudo apt install python3-libnvinfer; use the system Python or a venv with --system-site-packages); "
            "on a desktop: pip install tensorrt (NVIDIA's package, matching the TensorRT your onnxruntime-gpu was "
            "built with). Or build through ONNX Runtime instead: edge-duet build-engines BUNDLE --builder ort",
        )


def require(module: str, extra: str, what: str):
    """Import an optional dependency or raise :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra, what) from exc
