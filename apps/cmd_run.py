"""`edge-duet run`: watch a camera, stream or file and talk about it as it happens."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from edge_duet.apps import remote_options as ro
from edge_duet.apps.common import handle_errors


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)


@handle_errors
def run_command(
    camera: Optional[str] = typer.Option(None, "--camera", help="Camera index (0 = /dev/video0).", rich_help_panel="Source"),
    video: Optional[Path] = typer.Option(None, "--video", help="A video file.", rich_help_panel="Source"),
    url: Optional[str] = typer.Option(None, "--url", help="A stream: rtsp://..., http://...", rich_help_panel="Source"),
    gst: Optional[str] = typer.Option(
        None, "--gst", help="A GStreamer pipeline ending in appsink (Jetson CSI cameras; needs OpenCV with GStreamer).",
        rich_help_panel="Source",
    ),
    demo: bool = typer.Option(
        False, "--demo", help="No camera needed: play a generated demo scene in real time through the demo model "
                               "(--fast: as fast as the model goes).",
        rich_help_panel="Source",
    ),
    model: Optional[Path] = typer.Option(None, "--model", help="Model bundle directory (default: the bundled demo model)."),
    frame_interval: Optional[float] = typer.Option(
        None, "--frame-interval", help="Seconds between frames the model sees (default: the bundle's, 1 s).", min=0.01,
    ),
    frames_per_turn: Optional[int] = typer.Option(
        None, "--frames-per-turn", help="Frames per model turn (default: the bundle's, 2).", min=1, max=16,
    ),
    realtime: bool = typer.Option(
        True, "--realtime/--fast",
        help="Files only: play at real speed (frames are skipped when the model is slow), or as fast as the model "
             "goes with every sampled frame used (deterministic; tests and evaluation use --fast).",
    ),
    ask: list[str] = typer.Option([], "--ask", help="A question attached to the first turn (repeatable). End it with ?! to demand an answer."),
    must_reply: bool = typer.Option(False, "--must-reply", help="Every question demands an answer in its own turn."),
    events: Optional[Path] = typer.Option(None, "--events", help="Write every turn/reply event to this JSONL file (flushed per event)."),
    speak: bool = typer.Option(False, "--speak", help="Speak replies (espeak-ng unless --tts/--voice say otherwise).", rich_help_panel="Speech"),
    tts: str = typer.Option("auto", "--tts", help="auto | espeak-ng | piper | none.", rich_help_panel="Speech"),
    voice: Optional[str] = typer.Option(
        None, "--voice", help="espeak-ng voice name (en-us) or a Piper voice file (.onnx, selects Piper).", rich_help_panel="Speech",
    ),
    audio_dir: Optional[Path] = typer.Option(
        None, "--audio-dir", help="Also save spoken replies as WAV files here (where they go when there is no audio device).",
        rich_help_panel="Speech",
    ),
    display: bool = typer.Option(False, "--display", help="Show an OpenCV window with the frame, the last reply and the status."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Longest reply, in tokens.", min=1, rich_help_panel="Model"),
    max_context: Optional[int] = typer.Option(
        None, "--max-context", help="Context budget in tokens; older turns are evicted past it (default: the bundle's).",
        min=256, rich_help_panel="Model",
    ),
    system_prompt: Optional[str] = typer.Option(
        None, "--system-prompt", help="System prompt (default: the bundle's; MMDuet2's for its checkpoints).",
        rich_help_panel="Model",
    ),
    max_pixels: Optional[int] = typer.Option(
        None, "--max-pixels", help="Per-frame pixel budget, 28x28 px per visual token (default: the bundle's; "
                                   "MMDuet2's 100352 = 128 tokens for its checkpoints).", min=1, rich_help_panel="Model",
    ),
    token_drop: Optional[float] = typer.Option(
        None, "--token-drop", help="Drop a visual token whose cosine similarity to the previous frame's exceeds this (0-1; off by default).",
        min=0.0, max=1.0, rich_help_panel="Model",
    ),
    providers: Optional[str] = typer.Option(
        None, "--providers", help="cpu, cuda or tensorrt, comma-separated in order of preference (e.g. cuda,cpu; default: the best available).",
        rich_help_panel="Model",
    ),
    decoder: str = typer.Option(
        "auto", "--decoder", help="Decoder flavour: auto (fused on the CPU when the bundle has it), plain or fused.",
        rich_help_panel="Model",
    ),
    server: Optional[str] = ro.SERVER,
    served_model: Optional[str] = ro.SERVED_MODEL,
    server_token: Optional[str] = ro.SERVER_TOKEN,
    server_api: str = ro.SERVER_API,
    server_image: str = ro.SERVER_IMAGE,
    server_timeout: float = ro.SERVER_TIMEOUT,
) -> None:
    """Watch a camera, stream or video file and reply as things happen; type questions while it runs.

    \b
    Typed lines are questions for the next turn; end one with ?! to demand an answer now.
    Commands: /reset (forget the dialogue), /stop (stop the current reply), /quit, /help.
    Ctrl-C stops the current reply; a second Ctrl-C exits (code 130).
    """
    from edge_duet.apps.common import resolve_model
    from edge_duet.apps.outputs import check_dir, check_file
    from edge_duet.errors import UsageError
    from edge_duet.runtime.assistant import open_capture
    from edge_duet.runtime.capture import SourceSpec

    sources = [(k, v) for k, v in (("camera", camera), ("file", video), ("url", url), ("gst", gst)) if v is not None]
    if demo and sources:
        raise UsageError("--demo plays its own scene: leave out --camera/--video/--url/--gst.")
    if len(sources) > 1:
        raise UsageError("give one source: --camera, --video, --url or --gst (got " + ", ".join(k for k, _ in sources) + ").")
    if not sources and not demo:
        raise UsageError(
            "no source: give --camera INDEX, --video FILE, --url rtsp://..., --gst 'PIPELINE ! appsink', "
            "or try `edge-duet run --demo`."
        )
    if sources and not realtime and sources[0][0] != "file":
        raise UsageError("--fast plays files only; a camera or stream runs on the wall clock.")
    remote = ro.server_options(server, served_model, server_token, server_api, server_image, server_timeout)
    check_file(events, "--events", "events.jsonl")
    check_dir(audio_dir, "--audio-dir")
    # before rendering the demo scene: a missing model fails at once
    bundle = resolve_model(model) if remote is None else ro.require_model(model)
    questions = list(ask)
    if demo:
        from edge_duet.apps.demo_scene import DEMO_QUESTION, demo_video

        sources = [("file", str(demo_video()))]
        questions = questions or [DEMO_QUESTION]
    kind, target = sources[0]
    spec = SourceSpec(kind, str(target))
    speech = _speech_options(speak or demo, tts, voice, audio_dir, strict=not demo)
    if speech is not None and demo and not speak and audio_dir is None:
        from edge_duet.apps.common import eprint
        from edge_duet.runtime.speech import find_player

        player, why = find_player()
        if player is None:  # the demo speaks only where it can be heard; --speak asks for WAV files anyway
            eprint(f"note: replies are printed, not spoken: {why} (add --audio-dir DIR to keep them as WAV files)")
            speech = None
    if display:
        from edge_duet.apps.runner import display_available

        ok, why = display_available()
        if not ok:
            raise UsageError(f"--display cannot open a window: {why}. Run without --display.")

    source, clock = open_capture(spec, realtime)  # fails fast, before the model loads
    try:
        session = _load_session(bundle, max_new_tokens, max_context, token_drop, providers, remote,
                                system_prompt=system_prompt, max_pixels=max_pixels, decoder=decoder)
    except BaseException:
        source.release()
        raise
    prompt = session.manifest.prompt
    interval = frame_interval if frame_interval is not None else prompt.frame_interval_s
    per_turn = frames_per_turn if frames_per_turn is not None else prompt.frames_per_turn
    code = _run(session, source, clock, interval, per_turn, questions, must_reply, events, speech, display, bundle)
    raise typer.Exit(code)


def _speech_options(speak: bool, tts: str, voice: Optional[str], audio_dir: Optional[Path], strict: bool):
    """--tts/--voice/--audio-dir imply --speak; ``strict=False`` (the demo) turns a missing engine into a note."""
    from edge_duet.errors import UsageError
    from edge_duet.runtime.speech import SpeechOptions, resolve_engine

    wanted = speak or (tts not in ("auto", "none")) or voice is not None or audio_dir is not None
    if not wanted or tts == "none":
        return None
    try:
        engine = resolve_engine(tts, voice)
    except UsageError as exc:
        if strict:
            raise
        from edge_duet.apps.common import cli_text, eprint

        eprint(f"note: replies are printed, not spoken ({cli_text(exc)})")
        return None
    return SpeechOptions(engine=engine, voice=voice, audio_dir=audio_dir)


def _load_session(bundle: Path, max_new_tokens: int, max_context: Optional[int], token_drop: Optional[float],
                  providers: Optional[str], remote=None, system_prompt: Optional[str] = None,
                  max_pixels: Optional[int] = None, decoder: str = "auto"):
    from edge_duet.runtime.session import SessionOptions

    options = SessionOptions(
        max_new_tokens=max_new_tokens, system_prompt=system_prompt, max_pixels=max_pixels,
        max_context_tokens=max_context,
        token_drop_threshold=token_drop,
        providers=tuple(p.strip() for p in providers.split(",") if p.strip()) if providers else None,
        decoder=decoder,
    )
    return ro.open_session(bundle, remote, options)


def _run(session, source, clock, interval, per_turn, questions, must_reply, events, speech, display, bundle) -> int:
    from edge_duet.apps.common import eprint
    from edge_duet.apps.runner import Runner, RunOptions

    speaker = None
    if speech is not None:
        from edge_duet.runtime.speech import Speaker

        speaker = Speaker(speech, on_message=eprint)
    options = RunOptions(
        frame_interval_s=interval, frames_per_turn=per_turn, questions=tuple(questions), must_reply=must_reply,
        events_path=events, display=display,
    )
    manifest = session.manifest
    banner = (
        f"edge-duet run · model {manifest.name} ({manifest.variant}) {_where(session, bundle)} · {source.spec.describe()} · "
        f"{interval:g} s/frame, {per_turn} frame(s)/turn · {clock.name} clock"
        + (f" · speech: {speech.engine}" if speech else "")
        + "\ntype a question and Enter (end it with ?! to demand an answer now); /help lists commands"
    )
    try:
        runner = Runner(session, source, clock, options, speaker=speaker, banner=banner)
    except BaseException:
        source.release()
        if speaker is not None:
            speaker.close()
        raise
    return runner.run()


def _where(session, bundle) -> str:
    remote = getattr(session, "server", None)
    return f"from {bundle}" if remote is None else f"on {remote.api_url} as {remote.served_model!r} ({remote.api} API)"
