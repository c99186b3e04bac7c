"""`edge-duet bench`: edge-duet's per-turn cost side by side with the transformers loop, and against the limits."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional

import typer

from . import remote_options as ro
from .common import eprint, handle_errors

def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)


def _default_cache() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "edge-duet" / "bench"


def _ints(text: str, what: str) -> tuple[int, ...]:
    from edge_duet.errors import UsageError

    try:
        values = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"{what} must be positive integers (got {text!r})")
    return values


@handle_errors
def bench_command(
    target: Optional[Path] = typer.Argument(None, help="A bundle, or a checkpoint (exported into the cache first)."),
    shape: Optional[str] = typer.Option(None, help="Bench a random-weight checkpoint of this shape instead "
                                                   "(bench, perf, 3b, 7b, tiny): made and exported into the cache."),
    checkpoint: Optional[Path] = typer.Option(None, help="Checkpoint for the transformers baseline when TARGET is "
                                                         "a bundle (default: the one it was exported from)."),
    variant: List[Path] = typer.Option([], "--variant", help="Another bundle of the same model (e.g. quantized); "
                                                             "repeatable."),
    quantize: List[str] = typer.Option([], "--quantize", help="Also bench a variant made with `edge-duet quantize "
                                                               "--recipe RECIPE` (kept in the cache); repeatable."),
    providers: Optional[str] = typer.Option(None, help="cpu, cuda, tensorrt, comma-separated (default: every "
                                                       "provider this machine can start)."),
    baseline: Optional[str] = typer.Option(None, help="Transformers loops to run beside: demo (the MMDuet2 demo "
                                                      "loop), kv (with KV reuse), both, none. Default: demo when "
                                                      "the export extra is installed."),
    peers: Optional[str] = typer.Option(None, help="Peer runtimes to run beside, on the same checkpoint: "
                                                   "onnxruntime-genai, llama.cpp, both, none. Default: both when "
                                                   "--peer-python is given."),
    peer_python: Optional[str] = typer.Option(None, envvar="EDGE_DUET_PEER_PYTHON",
                                              help="Python of the venv holding the peers (onnxruntime-genai, "
                                                   "llama-cpp-python), kept apart from this one's onnxruntime."),
    llama_cpp_src: Optional[str] = typer.Option(None, envvar="EDGE_DUET_LLAMA_CPP_SRC",
                                                help="A llama.cpp source tree: its convert_hf_to_gguf.py makes the "
                                                     "GGUF files for the llama.cpp peer."),
    turns: Optional[int] = typer.Option(None, help="Turns to run (default: the last --at turn)."),
    at: str = typer.Option("1,10,50,200", help="Turns whose per-turn cost is reported."),
    frame_size: str = typer.Option("640x480", help="Generated camera frames, WIDTHxHEIGHT (the model's pixel "
                                                   "budget resizes them)."),
    reply_tokens: int = typer.Option(32, help="Tokens in each scripted reply."),
    token_drop: float = typer.Option(0.5, help="Cosine threshold of the token-drop runs."),
    drop_runs: bool = typer.Option(True, "--drop-runs/--no-drop-runs", help="Also run each bundle with token drop."),
    decoder: str = typer.Option("auto", help="Decoder flavours to run, comma-separated: auto (fused on the CPU "
                                             "when the bundle has it), plain, fused; one job each."),
    max_context: Optional[int] = typer.Option(None, help="Context budget in tokens (default: the bundle's)."),
    threads: Optional[int] = typer.Option(None, help="Threads per job (default: every core)."),
    sequential: bool = typer.Option(False, help="Run the jobs one after another (less memory) instead of a turn "
                                                "of each in turn."),
    json_out: Path = typer.Option(Path("bench.json"), "--json", help="Where to write the full report."),
    plot: Optional[Path] = typer.Option(None, help="Write the per-turn latency plot (PNG) here."),
    cache_dir: Optional[Path] = typer.Option(None, help="Where made checkpoints and bundles are kept "
                                                        "(default ~/.cache/edge-duet/bench)."),
    validate: bool = typer.Option(True, "--validate/--no-validate", help="Validate bundles this command exports."),
    quick: bool = typer.Option(False, help="A seconds-long smoke run: the tiny shape (unless TARGET or --shape), "
                                           "6 turns, 160x120 frames, 4-token replies."),
    server: Optional[str] = ro.server_option("TARGET"),
    served_model: Optional[str] = ro.SERVED_MODEL,
    server_token: Optional[str] = ro.SERVER_TOKEN,
    server_api: str = ro.SERVER_API,
    server_image: str = ro.SERVER_IMAGE,
    server_timeout: float = ro.SERVER_TIMEOUT,
    streams: str = typer.Option("1,2,4", help="With --server: numbers of concurrent streams to measure.",
                                rich_help_panel=ro.PANEL),
) -> None:
    """Measure vision, prefill, silent-turn, reply and memory cost per turn, edge-duet against the transformers
    loop on the same checkpoint, and decode speed against the memory-bandwidth limit. Prints a table, writes JSON.
    Numbers on a shared machine are noisy: compare the ratios, which are measured side by side."""
    from edge_duet.apps.outputs import atomic_path, check_file
    from edge_duet.bench.report import format_report, plot_turns
    from edge_duet.bench.run import BenchRequest, run

    remote = ro.server_options(server, served_model, server_token, server_api, server_image, server_timeout)
    check_file(json_out, "--json", "bench.json")
    check_file(plot, "--plot", "turns.png")
    if remote is not None:
        return _bench_streams(target, remote, streams, turns, frame_size, reply_tokens, max_context, quick, json_out)
    if plot is not None:  # fail before measuring, not after
        from edge_duet.errors import require

        require("matplotlib", "plots", "--plot")
    report_turns = _ints(at, "--at") if not quick else (1, 3, 6)
    n_turns = turns or max(report_turns)  # the library checks it against --at (`BenchRequest.turns`)
    w, h = _ints(frame_size, "--frame-size") if not quick else (160, 120)
    if quick and target is None and shape is None:
        shape = "tiny"
    request = BenchRequest(
        cache_dir=cache_dir or _default_cache(), target=target, shape=shape, checkpoint=checkpoint,
        variants=tuple(variant), quantize=tuple(quantize),
        providers=tuple(p.strip() for p in providers.split(",")) if providers else None,
        decoders=tuple(d.strip() for d in decoder.split(",") if d.strip()) or ("auto",), baseline=baseline,
        peers=tuple(_peer_names(peers, peer_python)), peer_python=peer_python, llama_cpp_src=llama_cpp_src,
        turns=n_turns, report_turns=report_turns, frame_size=(w, h), reply_tokens=reply_tokens if not quick else 4,
        token_drop=token_drop, drop_runs=drop_runs, max_context_tokens=max_context, threads=threads,
        sequential=sequential, validate=validate, window=2 if not quick else 1)
    report = run(request, log=eprint)
    typer.echo(format_report(report))
    _write_json(json_out, report)
    typer.echo(f"wrote {json_out}")
    if plot is not None:
        with atomic_path(plot) as tmp:
            plot_turns(report, tmp)
        typer.echo(f"wrote {plot}")
    if any(r["error"] for r in report["results"]):
        raise typer.Exit(1)


def _bench_streams(target: Optional[Path], remote, streams: str, turns: Optional[int], frame_size: str,
                   reply_tokens: int, max_context: Optional[int], quick: bool, json_out: Path) -> None:
    """`bench --server`: per-turn latency and server throughput against the number of concurrent streams."""
    from edge_duet.bench.streams import StreamsOptions, format_streams, report, run_streams
    from edge_duet.runtime.session import SessionOptions

    model = ro.require_model(target)
    w, h = _ints(frame_size, "--frame-size") if not quick else (160, 120)
    options = StreamsOptions(streams=_ints(streams, "--streams"), turns=turns or (6 if quick else 20),
                             frame_size=(w, h), max_new_tokens=reply_tokens if not quick else 4)
    rows = run_streams(model, remote, options, SessionOptions(max_new_tokens=options.max_new_tokens,
                                                              max_context_tokens=max_context), log=eprint)
    typer.echo(format_streams(rows, f"{remote.served_model} on {remote.api_url} ({remote.api} API, "
                                    f"{remote.image_format} frames {w}x{h}, {options.turns} turns per stream)"))
    data = report(rows, options, remote, model)
    _write_json(json_out, data)
    typer.echo(f"wrote {json_out}")
    if data["errors"]:
        raise typer.Exit(1)


def _peer_names(peers: Optional[str], peer_python: Optional[str]) -> list[str]:
    """--peers as names (the library checks them: `BenchRequest.peers`); both / none, and both by default when
    --peer-python is given."""
    from edge_duet.bench.peers import PEERS

    if peers is None:
        return list(PEERS) if peer_python else []
    if peers in ("both", "none"):
        return list(PEERS) if peers == "both" else []
    return [p.strip() for p in peers.split(",") if p.strip()]


def _write_json(path: Path, data: dict) -> None:
    from edge_duet.apps.outputs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
