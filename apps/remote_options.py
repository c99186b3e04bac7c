"""The `--server` options that `run`, `infer`, `serve` and `bench` share: run the model on a remote vLLM server
instead of the local ONNX bundle (runtime/remote.py, docs/remote.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

PANEL = "Remote server (vLLM)"



def server_option(model_param: str = "--model"):
    """--server; ``model_param`` is what names the served model's folder in the command using it."""
    return typer.Option(
        None, "--server", help="Run the model on this OpenAI-compatible server (vLLM) instead of locally: "
        f"http://HOST:PORT/v1. {model_param} then names the served model's bundle or checkpoint folder (no weights "
        "needed).", rich_help_panel=PANEL,
    )


SERVER = server_option()
SERVED_MODEL = typer.Option(
    None, "--served-model", help="The name the server serves the model under (vLLM's --served-model-name).",
    rich_help_panel=PANEL,
)
SERVER_TOKEN = typer.Option(
    None, "--server-token", envvar="EDGE_DUET_SERVER_TOKEN", show_envvar=True,
    help="Bearer token the server wants (vLLM's --api-key; prefer the variable: arguments show in `ps`).",
    rich_help_panel=PANEL,
)
SERVER_API = typer.Option(
    "chat", "--server-api", help="chat: OpenAI chat completions (trained models); tokens: vLLM's token endpoint "
    "(--enable-scale-out), exact token ids.", rich_help_panel=PANEL,
)
SERVER_IMAGE = typer.Option(
    "jpeg", "--server-image", help="How frames travel: jpeg (small) or png (lossless, for exact comparisons).",
    rich_help_panel=PANEL,
)
SERVER_TIMEOUT = typer.Option(
    60.0, "--server-timeout", help="Seconds the server may stay silent within a reply before the turn fails.",
    min=0.1, rich_help_panel=PANEL,
)


def server_options(server: Optional[str], served_model: Optional[str], token: Optional[str], api: str, image: str,
                   timeout_s: float):
    """The ServerOptions the flags describe, or None without --server."""
    from edge_duet.errors import UsageError

    if server is None:
        if served_model is not None:
            raise UsageError("--served-model needs --server URL")
        return None
    if not served_model:
        raise UsageError("--server needs --served-model NAME (the name the server serves the model under; "
                         "GET http://HOST:PORT/v1/models lists them)")
    from edge_duet.runtime.remote_client import ServerOptions

    return ServerOptions(url=server, served_model=served_model, api=api, token=token or None, image_format=image,
                         read_timeout_s=timeout_s)


def require_model(model: Optional[Path]) -> Path:
    from edge_duet.errors import UsageError

    if model is None:
        raise UsageError("--server needs --model: the served model's bundle, or a folder with its checkpoint's "
                         "config.json, tokenizer.json and preprocessor_config.json (the weights stay on the server)")
    return model


def open_session(model: Optional[Path], remote, options):
    """A local Session over a bundle, or a RemoteSession when ``remote`` (ServerOptions) is given."""
    from edge_duet.apps.common import resolve_model

    if remote is None:
        from edge_duet.runtime.session import Session

        return Session(resolve_model(model), options)
    from edge_duet.runtime.remote import RemoteSession

    return RemoteSession(require_model(model), remote, options)
