"""`edge-duet serve`: the assistant behind a local HTTP/WebSocket API and a kiosk page (apps/server.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge_duet.apps import remote_options as ro
from edge_duet.apps.common import handle_errors


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_command)


@handle_errors
def serve_command(
    camera: Optional[str] = typer.Option(None, "--camera", help="Camera index (0 = /dev/video0).", rich_help_panel="Source"),
    video: Optional[Path] = typer.Option(None, "--video", help="A video file, played in real time.", rich_help_panel="Source"),
    url: Optional[str] = typer.Option(None, "--url", help="A stream: rtsp://..., http://...", rich_help_panel="Source"),
    gst: Optional[str] = typer.Option(
        None, "--gst", help="A GStreamer pipeline ending in appsink (Jetson CSI cameras).", rich_help_panel="Source",
    ),
    demo: bool = typer.Option(
        False, "--demo", help="Play the generated demo scene (looped) and ask the demo question.", rich_help_panel="Source",
    ),
    loop: bool = typer.Option(False, "--loop", help="Start a --video file over when it ends.", rich_help_panel="Source"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on. Anything but loopback needs --token.",
                             rich_help_panel="Server"),
    port: int = typer.Option(8765, "--port", help="TCP port.", min=1, max=65535, rich_help_panel="Server"),
    token: Optional[str] = typer.Option(
        None, "--token", envvar="EDGE_DUET_TOKEN", show_envvar=True,
        help="Bearer token clients must send (prefer the EDGE_DUET_TOKEN variable: arguments show in `ps`).",
        rich_help_panel="Server",
    ),
    allow_origin: list[str] = typer.Option(
        [], "--allow-origin", help="Another web origin allowed to call the API (repeatable), e.g. https://kiosk.local.",
        rich_help_panel="Server",
    ),
    max_frame_mb: float = typer.Option(4.0, "--max-frame-mb", help="Largest posted frame.", min=0.01, rich_help_panel="Server"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every request.", rich_help_panel="Server"),
    model: Optional[Path] = typer.Option(None, "--model", help="Model bundle directory (default: the bundled demo model)."),
    frame_interval: Optional[float] = typer.Option(
        None, "--frame-interval", help="Seconds between frames the model sees (default: the bundle's).", min=0.01,
    ),
    frames_per_turn: Optional[int] = typer.Option(
        None, "--frames-per-turn", help="Frames per model turn (default: the bundle's).", min=1, max=16,
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest reply, in tokens.", min=1, rich_help_panel="Model"),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Context budget in tokens (default: the bundle's).", min=256, rich_help_panel="Model",
    ),
    token_drop: Optional[float] = typer.Option(
        None, "--token-drop", help="Drop visual tokens more similar than this to the previous frame's (0-1).",
        min=0.0, max=1.0, rich_help_panel="Model",
    ),
    providers: Optional[str] = typer.Option(
        None, "--providers", help="ONNX Runtime providers in order, comma-separated.", rich_help_panel="Model",
    ),
    server: Optional[str] = ro.SERVER,
    served_model: Optional[str] = ro.SERVED_MODEL,
    server_token: Optional[str] = ro.SERVER_TOKEN,
    server_api: str = ro.SERVER_API,
    server_image: str = ro.SERVER_IMAGE,
    server_timeout: float = ro.SERVER_TIMEOUT,
) -> None:
    """Serve the assistant to browsers and apps: the kiosk page at /, the API described at /openapi.json.

    \b
    Without a source, clients post frames (POST /api/frames) or the page sends the browser's camera.
    Binds 127.0.0.1 by default; another --host needs --token, and clients then send
    'Authorization: Bearer TOKEN' (open the page as http://HOST:PORT/#token=TOKEN).
    Ctrl-C stops the server.
    """
    from edge_duet.errors import UsageError, require

    require("starlette", "serve", "edge-duet serve")
    require("uvicorn", "serve", "edge-duet serve")
    from edge_duet.apps.common import eprint, resolve_model
    from edge_duet.apps.server import ServerOptions, check_bind, check_port_free, is_loopback, run_server
    from edge_duet.runtime.assistant import Assistant, AssistantOptions
    from edge_duet.runtime.capture import SourceSpec

    sources = [(k, v) for k, v in (("camera", camera), ("file", video), ("url", url), ("gst", gst)) if v is not None]
    if len(sources) + demo > 1:
        raise UsageError("give at most one source: --camera, --video, --url, --gst or --demo.")
    if loop and not (video or demo):
        raise UsageError("--loop applies to --video files only.")
    if demo:
        from edge_duet.apps.demo_scene import DEMO_QUESTION, demo_video

        sources, loop = [("file", str(demo_video()))], True
    options = ServerOptions(host=host, port=port, token=token or None, allowed_origins=tuple(allow_origin),
                            max_frame_bytes=int(max_frame_mb * 1024 * 1024))
    remote = ro.server_options(server, served_model, server_token, server_api, server_image, server_timeout)
    check_bind(options)  # before loading anything
    check_port_free(host, port)
    session_options = {"max_context_tokens": max_context, "token_drop_threshold": token_drop,
                       "providers": tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None}
    assistant_options = AssistantOptions(frame_interval_s=frame_interval, frames_per_turn=frames_per_turn,
                                         max_new_tokens=max_new_tokens)
    if remote is None:
        assistant = Assistant(resolve_model(model), assistant_options, session_options)
    else:
        from edge_duet.runtime.session import SessionOptions

        session = ro.open_session(model, remote, SessionOptions(max_new_tokens=max_new_tokens, **session_options))
        assistant = Assistant(options=assistant_options, session=session)
    try:
        if sources:
            assistant.attach(SourceSpec(*sources[0]), loop=loop)
        if demo:
            assistant.ask(DEMO_QUESTION)
    except BaseException:
        assistant.close()
        raise
    shown = f"[{host}]" if ":" in host else host
    eprint(f"edge-duet serve · model {assistant.model_name} · {assistant.source or 'frames posted by clients'}\n"
           f"kiosk page: http://{shown}:{port}/{'#token=…' if token else ''} · API: http://{shown}:{port}/openapi.json")
    if not is_loopback(host):
        eprint(f"WARNING: listening on {host}:{port}, reachable from other machines. Every client must send "
               "'Authorization: Bearer TOKEN'. Traffic is plain HTTP: on an untrusted network put a TLS proxy in front.")
    run_server(assistant, options, log_level="info" if verbose else "warning")
