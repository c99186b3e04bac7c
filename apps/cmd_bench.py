"""`edge-duet bench`: edge-duet's per-turn cost side by side with the transformers loop, and against the limits."""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import List, Optional

import typer

from . import remote_options as ro
from .common import eprint, handle_errors

BASELINES = {"demo": True, "kv": False}  # name -> DemoLoop(rerender=...)


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
    from edge_duet.apps.outputs import check_file
    from edge_duet.errors import UsageError
    from edge_duet.manifest import Manifest
    from edge_duet.bench.harness import Job, run_bench
    from edge_duet.bench.stream import BenchOptions

    remote = ro.server_options(server, served_model, server_token, server_api, server_image, server_timeout)
    check_file(json_out, "--json", "bench.json")
    check_file(plot, "--plot", "turns.png")
    if remote is not None:
        return _bench_streams(target, remote, streams, turns, frame_size, reply_tokens, max_context, quick, json_out)
    if plot is not None:  # fail before measuring, not after
        from edge_duet.errors import require

        require("matplotlib", "plots", "--plot")
    report_turns = _ints(at, "--at") if not quick else (1, 3, 6)
    n_turns = turns or max(report_turns)
    if n_turns < max(report_turns):
        raise UsageError(f"--turns {n_turns} ends before the last --at turn ({max(report_turns)})")
    w, h = _ints(frame_size, "--frame-size") if not quick else (160, 120)
    cache = cache_dir or _default_cache()
    if quick and target is None and shape is None:
        shape = "tiny"
    has_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    wanted = {"demo": ["demo"], "kv": ["kv"], "both": ["demo", "kv"], "none": [], None: ["demo"]}.get(baseline)
    if wanted is None:
        raise UsageError(f"--baseline must be demo, kv, both or none (got {baseline!r})")

    ckpt, bundle = _resolve_target(target, shape, checkpoint, cache, validate)
    manifest = Manifest.load(bundle)
    variant = list(variant) + [_quantized(bundle, recipe, cache) for recipe in quantize]
    opts = BenchOptions(
        turns=n_turns, report_turns=report_turns, frame_size=(w, h), frames_per_turn=manifest.prompt.frames_per_turn,
        frame_interval_s=manifest.prompt.frame_interval_s,
        reply_turns=default_reply_turns(n_turns), reply_tokens=reply_tokens if not quick else 4,
        max_context_tokens=max_context, threads=threads, window=2 if not quick else 1)
    provs = [p.strip() for p in providers.split(",")] if providers else usable_providers()
    decoders = [d.strip() for d in decoder.split(",") if d.strip()] or ["auto"]
    jobs = _edge_jobs([bundle, *variant], provs, [None, token_drop] if drop_runs else [None], opts, decoders)
    if wanted and not has_torch:
        if baseline is not None:
            raise UsageError('the transformers baseline needs the export extra: pip install "edge-duet[export]"')
        eprint('warning: transformers baseline skipped: it needs the export extra (pip install "edge-duet[export]")')
    elif wanted and ckpt is None:
        msg = (f"no checkpoint for the transformers baseline: {bundle} does not name an existing one; "
               "pass --checkpoint PATH")
        if baseline is not None:
            raise UsageError(msg)
        eprint(f"warning: baseline skipped: {msg}")
    else:
        jobs += [Job(f"transformers {kind}", "transformers",
                     {"checkpoint": str(ckpt), "options": asdict(opts), "rerender": BASELINES[kind],
                      "system_prompt": manifest.prompt.system_prompt, "no_reply_text": manifest.prompt.no_reply_text},
                     str(bundle)) for kind in wanted]
    peer_names = _peer_names(peers, peer_python)
    if peer_names:
        from edge_duet.bench.peers import PeerSetup, peer_jobs

        jobs += peer_jobs(peer_names, PeerSetup(peer_python, llama_cpp_src, str(cache)),
                          str(ckpt) if ckpt else None, str(bundle), opts, manifest.prompt.system_prompt)
    target_info = {"name": shape or Path(target).name, "shape": shape, "bundle": str(bundle),
                   "checkpoint": str(ckpt) if ckpt else None, "variants": [str(v) for v in variant]}
    report = run_bench(jobs, opts, target_info, lockstep=not sequential, log=eprint)
    report["speedups"] = speedups(report["summaries"], report["jobs"])
    typer.echo(format_report(report))
    _write_json(json_out, report)
    typer.echo(f"wrote {json_out}")
    if plot is not None:
        typer.echo(f"wrote {plot_turns(report, plot)}")
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
    from edge_duet.bench.peers import PEERS
    from edge_duet.errors import UsageError

    if peers is None:
        return list(PEERS) if peer_python else []
    named = {"both": list(PEERS), "none": []}.get(peers) or [p.strip() for p in peers.split(",") if p.strip()]
    unknown = [p for p in named if p not in PEERS]
    if unknown:
        raise UsageError(f"--peers: unknown peer {', '.join(unknown)}; choose {', '.join(PEERS)}, both or none")
    return named


def _write_json(path: Path, data: dict) -> None:
    from edge_duet.apps.outputs import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")


def speedups(summaries: list[dict], jobs: list[dict]) -> dict:
    """Baseline / edge-duet per-turn time at every report turn, for each (edge job, baseline or peer job) pair."""
    pairs = [(e, ej, b, bj) for e, ej in zip(summaries, jobs) for b, bj in zip(summaries, jobs)
             if e and b and ej["kind"] == "edge" and bj["kind"] in ("transformers", "peer")]
    out = {}
    for e, ej, b, bj in pairs:
        ratios = {t: b["at"][t]["total_s"] / e["at"][t]["total_s"] for t in e["at"] if t in b["at"]}
        if e.get("run_s") and b.get("run_s") and e.get("turns") == b.get("turns"):
            ratios["run"] = b["run_s"] / e["run_s"]  # the whole run: load + every turn
        out[f"{bj['name']} / {ej['name']}"] = ratios
    return out


def _edge_jobs(bundles: list[Path], providers: list[str], drops: list, opts, decoders=("auto",)) -> list:
    """One job per bundle x decoder flavour x provider x token-drop setting, named
    "edge VARIANT [FLAVOUR] [PROVIDER] [drop]" (a bundle without the flavour asked for fails in its job)."""
    from edge_duet.bench.harness import Job
    from edge_duet.manifest import Manifest

    labels = [Manifest.load(b).variant for b in bundles]
    labels = [lab if labels.count(lab) == 1 or i == 0 else Path(b).name
              for i, (b, lab) in enumerate(zip(bundles, labels))]
    return [Job(" ".join(x for x in ("edge", lab, dec if len(decoders) > 1 else "",
                                     prov if len(providers) > 1 else "", "drop" if drop else "") if x),
                "edge",
                {"bundle": str(b), "options": asdict(opts), "provider": prov, "token_drop": drop, "decoder": dec},
                str(b), lab, prov, drop)
            for b, lab in zip(bundles, labels) for dec in decoders for prov in providers for drop in drops]


def default_reply_turns(turns: int) -> tuple[int, ...]:
    """Replies at turn 2 (decode speed on a short context) and 20, 60, 100, ... (away from the report turns
    1, 10, 50, 200); short runs reply at turn 2 and mid-run."""
    if turns >= 40:
        return (2, *range(20, turns + 1, 40))
    return tuple(sorted({2, turns // 2 + 1}))


def usable_providers() -> list[str]:
    """Short names (cpu, cuda, tensorrt) of the providers this onnxruntime has and this machine can start."""
    import onnxruntime as ort

    from edge_duet.runtime.engine import PROVIDER_NAMES, _cuda_device_present

    have = ort.get_available_providers()
    return [k for k, v in PROVIDER_NAMES.items() if v in have and (k == "cpu" or _cuda_device_present())]


def _quantized(bundle: Path, recipe: str, cache: Path) -> Path:
    """``bundle`` quantized with ``recipe`` by `edge-duet quantize`, made once into the cache."""
    import hashlib

    from edge_duet.errors import UsageError

    try:
        from edge_duet.quant.quantize import QuantOptions, quantize_bundle
    except ImportError as exc:
        raise UsageError(f"--quantize needs `edge-duet quantize`, which this install lacks ({exc}); "
                         "make the variant yourself and pass it with --variant") from exc
    key = hashlib.sha1((Path(bundle) / "manifest.json").read_bytes()).hexdigest()[:8]
    out = cache / "variants" / f"{Path(bundle).name}-{key}-{recipe.replace('=', '_').replace(',', '+')}"
    if not (out / "manifest.json").is_file():
        eprint(f"quantizing {bundle} with recipe {recipe} into {out} ...")
        quantize_bundle(bundle, out, recipe, QuantOptions(overwrite=True), log=eprint)
    return out


def _resolve_target(target: Optional[Path], shape: Optional[str], checkpoint: Optional[Path], cache: Path,
                    validate: bool) -> tuple[Optional[Path], Path]:
    """(checkpoint or None, bundle) for a bundle, a checkpoint, or a named shape."""
    from edge_duet.errors import UsageError, require
    from edge_duet.manifest import Manifest

    if (target is None) == (shape is None):
        raise UsageError("give a bundle or checkpoint directory, or --shape NAME (not both); e.g. "
                         "`edge-duet bench --shape bench` or `edge-duet bench ./bundle`")
    if shape is not None:
        require("torch", "export", "--shape (making and exporting a random checkpoint)")
        from edge_duet.bench.baseline import prepare_shape, shape_names

        if shape not in shape_names():
            raise UsageError(f"unknown shape {shape!r}; choose one of: {', '.join(shape_names())}")
        return prepare_shape(shape, cache, validate=validate, log=eprint)
    if (target / "manifest.json").is_file():
        if checkpoint is None:
            named = Manifest.load(target).export_info.get("checkpoint")
            checkpoint = Path(named) if named and (Path(named) / "config.json").is_file() else None
        return checkpoint, target
    if (target / "config.json").is_file():
        require("torch", "export", "Benchmarking a checkpoint (it is exported first)")
        from edge_duet.bench.baseline import prepare_checkpoint

        return target, prepare_checkpoint(target, cache, validate=validate, log=eprint)
    raise UsageError(f"{target} is neither a bundle (manifest.json) nor a checkpoint (config.json)")


# ----------------------------------------------------------------------------------------- presentation


def format_report(report: dict) -> str:
    """The terminal table: one column per job."""
    jobs, sums = report["jobs"], report["summaries"]
    names = [j["name"] for j in jobs]

    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f}"

    def num(x, f="{:.1f}"):
        return "-" if x is None else f.format(x)

    status = ["unavailable" if r.get("unavailable") else "failed" if r["error"] else "ok" for r in report["results"]]
    rows = [("status", status), ("load (s)", [num(s.get("load_s")) for s in sums]),
            ("vision / turn (ms)", [ms(s.get("vision_s")) for s in sums]),
            ("prefill / silent turn (ms)", [ms(s.get("prefill_s")) for s in sums]),
            ("  new tokens / achieved GFLOP/s", [f"{num(s.get('prefill_tokens'), '{:.0f}')} / "
                                                 f"{num(s.get('prefill_gflops'))}" for s in sums]),
            ("silent turn (ms)", [ms(s.get("silent_turn_s")) for s in sums]),
            ("  decoder calls (median / max)", [f"{num(s.get('silent_calls'), '{:.0f}')} / "
                                                f"{num(s.get('silent_calls_max'), '{:.0f}')}" for s in sums]),
            ("reply time to first token (ms)", [ms(s.get("ttft_s")) for s in sums]),
            ("decode tokens/s (all replies)", [num(s.get("decode_tok_s")) for s in sums]),
            ("  at the first reply (context)", [_first_decode(s) for s in sums]),
            ("  limit tokens/s (bandwidth/bytes)", [num(s.get("decode_limit_tok_s")) for s in sums]),
            ("  share of the limit", [num(s.get("decode_fraction_of_limit") and 100 * s["decode_fraction_of_limit"],
                                          "{:.0f} %") for s in sums])]
    turns = sorted({t for s in sums if s for t in s["at"]})
    for t in turns:
        rows.append((f"per turn at turn {t} (ms)", [ms(s["at"][t]["total_s"]) if s and t in s["at"] else "-"
                                                    for s in sums]))
    if turns:
        t = turns[-1]
        rows.append((f"  turn {t}: render/vision/prefill/decode/other", [
            "/".join(ms(s["at"][t].get(k) or 0) for k in ("render_s", "vision_s", "prefill_s", "decode_s", "other_s"))
            if s and t in s["at"] else "-" for s in sums]))
    rows += [("last / first report turn", [num(s.get("flat_ratio", {}).get("ratio"), "{:.2f}x") for s in sums]),
             ("evictions (n, re-prefill ms)", [f"{s.get('evictions', 0)}, {ms(s.get('evict_s'))}" if s else "-"
                                               for s in sums]),
             ("visual tokens dropped", [num(s.get("dropped_share") and 100 * s["dropped_share"], "{:.0f} %")
                                        for s in sums]),
             ("whole run: load + all turns (s)", [num(s.get("run_s")) for s in sums]),
             ("peak memory RSS (GB)", [num(s.get("peak_rss_gb"), "{:.2f}") for s in sums])]
    errors = [(j["name"], r["error"]) for j, r in zip(jobs, report["results"]) if r["error"]]
    missing = [(j["name"], r.get("unavailable")) for j, r in zip(jobs, report["results"]) if r.get("unavailable")]
    width = max(len(r[0]) for r in rows) + 2
    cols = [max(len(n), 10) + 2 for n in names]
    lines = ["".ljust(width) + "".join(n.rjust(c) for n, c in zip(names, cols))]
    lines += [label.ljust(width) + "".join(v.rjust(c) for v, c in zip(vals, cols)) for label, vals in rows]
    for pair, ratios in report["speedups"].items():
        lines.append(f"{pair}: " + ", ".join(f"{'turn ' + str(t) if t != 'run' else 'whole run'}: {r:.1f}x"
                                             for t, r in ratios.items()))
    m = report["machine"]
    lines.append(f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads; copy bandwidth "
                 f"{m['bandwidth_gbs']:.1f} GB/s; float32 matmul {m['matmul_gflops']:.0f} GFLOP/s")
    lines += [f"{n}: unavailable: {why}" for n, why in missing]
    lines += [f"FAILED {n}: {e}" for n, e in errors]
    return "\n".join(lines)


def _first_decode(s: dict) -> str:
    first = (s or {}).get("decode_by_reply") or [None]
    return "-" if first[0] is None or first[0]["tok_s"] is None else f"{first[0]['tok_s']:.1f} ({first[0]['context']})"


def plot_turns(report: dict, path: str | Path) -> Path:
    """Per-turn latency against turn index, one line per job (log scale), reply turns marked."""
    from edge_duet.errors import require

    require("matplotlib", "plots", "The bench plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for job, res in zip(report["jobs"], report["results"]):
        recs = res["records"]
        if not recs:
            continue
        plain = [r for r in recs if r["kind"] == "silent" and not r.get("evict_s")]
        line, = ax.plot([r["turn"] for r in plain], [r["total_s"] for r in plain], lw=1.2, label=job["name"])
        for marker, sel in (("x", lambda r: r["kind"] == "reply"), ("^", lambda r: r.get("evict_s"))):
            pts = [r for r in recs if sel(r)]
            ax.plot([r["turn"] for r in pts], [r["total_s"] for r in pts], marker, ms=5, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("turn (2 frames each). Line: silent turns; x: a reply turn; ^: a turn that evicted old turns")
    ax.set_ylabel("turn latency (s)")
    t = report["target"]
    m = report["machine"]
    ax.set_title(f"{t['name']}: per-turn latency, {m['cores']}-core CPU, {m['threads']} thread(s) per job", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from edge_duet.apps.outputs import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path
