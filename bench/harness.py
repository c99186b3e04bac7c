"""``edge-duet bench``: scripted proactive streams over a bundle, run side by side with the transformers loops
(``baseline.py``) and the peer runtimes (``peers.py``), the hardware probes (``limits.py``) and the summary.

Every job (a bundle x provider x token-drop setting, a transformers loop, a peer) runs in its own process
(:class:`edge_duet.isolate.Worker`), so its peak memory is its own. The jobs advance in lockstep, a turn of each in
turn, so a change of load on a shared machine hits every job at the same turn index and the ratios stay fair::

    parent: bandwidth + matmul probes
       for turn in 1..N:  ──turn(n)──> job "edge fp32"             (edge.EdgeRunner: Session, ONNX Runtime)
                          ──turn(n)──> job "edge fp32 drop"
                          ──turn(n)──> job "transformers demo"     (baseline.DemoLoop, PyTorch)
                          ──turn(n)──> job "llama.cpp"             (peer_worker.py in the peers' own Python)
                          <──per-turn timings── each
       summaries (the app prints the table, writes the JSON and the plot)

Which code a job runs is decided here, by its ``kind``; a job process builds only the runner class the parent
names (no import by string), and a peer's process is a script of this package run by the peers' interpreter.
"""

from __future__ import annotations

import functools
import os
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from edge_duet import isolate
from edge_duet.errors import JobFailed, PeerUnavailable

from .limits import graph_weights, machine_info, measure_bandwidth, measure_matmul, prefill_flops, vision_flops
from .stream import BenchOptions, synthetic_frames


@dataclass(frozen=True)
class Job:
    """One column of the report. ``kind``: "edge" (``edge.EdgeRunner``), "transformers" (``baseline.DemoLoop``)
    or "peer" (``peers.py``); ``args``: the runner's keyword arguments; ``bundle``: the bundle whose decoder bytes
    bound its decode speed."""

    name: str
    kind: str
    args: dict
    bundle: str
    variant: str = "fp32"
    provider: str = "cpu"
    token_drop: float | None = None


def _start(job: Job) -> isolate.Worker:
    """The job's process, holding its runner. Raises :class:`PeerUnavailable` or :class:`JobFailed`."""
    if job.kind == "peer":
        from .peers import start_peer

        return start_peer(job)
    if job.kind == "edge":
        from .edge import EdgeRunner as runner
    elif job.kind == "transformers":
        from .baseline import DemoLoop as runner
    else:
        raise JobFailed(f"job {job.name!r}: unknown kind {job.kind!r} (edge, transformers, peer)")
    try:
        return isolate.Worker(functools.partial(runner, **job.args), what=f"job {job.name!r}")
    except Exception as exc:  # noqa: BLE001 - the runner's own error, reported with the job's name
        raise JobFailed(f"job {job.name!r} failed: {type(exc).__name__}: {exc}") from exc


def run_jobs(jobs: list[Job], opts: BenchOptions, lockstep: bool = True,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run every job over ``opts.turns`` turns; returns one result per job: info, records, peak memory, error
    (the job failed) or unavailable (a peer that cannot run here, and why)."""
    results = [{"job": asdict(j), "info": {}, "records": [], "error": None, "unavailable": None} for j in jobs]
    groups = [list(range(len(jobs)))] if lockstep else [[i] for i in range(len(jobs))]
    for group in groups:
        workers: dict[int, isolate.Worker] = {}
        try:
            for i in group:
                log(f"loading {jobs[i].name} ...")
                try:
                    workers[i] = _start(jobs[i])
                    results[i]["info"] = dict(workers[i].info or {})
                except PeerUnavailable as exc:
                    results[i]["unavailable"] = str(exc)
                    log(f"{jobs[i].name}: unavailable: {exc}")
                except (JobFailed, isolate.ChildFailed) as exc:
                    results[i]["error"] = str(exc)
                    log(f"error: {exc}")
            _run_turns(jobs, workers, results, opts, lockstep, log)
            for i, w in list(workers.items()):
                peak = w.close()
                results[i]["info"]["peak_rss_gb"] = peak / 1024**3 if peak else None
                del workers[i]
        finally:  # an error or Ctrl-C here: no job process outlives the bench
            for w in workers.values():
                w.kill()
    return results


def _run_turns(jobs, workers: dict, results: list[dict], opts: BenchOptions, lockstep: bool, log) -> None:
    from tqdm import tqdm

    bar = tqdm(range(1, opts.turns + 1), desc="bench" if lockstep else jobs[next(iter(workers), 0)].name,
               unit="turn", disable=None)
    every = None if not bar.disable else max(opts.turns // 20, 1)  # no terminal: a line now and then
    for n in bar:
        for i in list(workers):
            try:
                results[i]["records"].append(workers[i].call("turn", n))
            except Exception as exc:  # noqa: BLE001 - the job's own error, raised again here by isolate
                results[i]["error"] = f"job {jobs[i].name!r} failed at turn {n}: {type(exc).__name__}: {exc}"
                log(f"error: {results[i]['error']}")
                workers.pop(i).kill()
        if every and (n % every == 0 or n == opts.turns):
            log(f"turn {n}/{opts.turns}: " + ", ".join(
                f"{jobs[i].name} {results[i]['records'][-1]['total_s']:.2f} s" for i in workers))


# ---------------------------------------------------------------------------------------------- summary


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(result: dict, opts: BenchOptions, model: dict, probes: dict, decoder_bytes: dict[str, int]) -> dict:
    """Per-job numbers of the report (times in seconds). ``model``: what :func:`run_bench` learnt of the model
    (manifest, parameter counts, patches per turn); ``decoder_bytes``: this job's decoder weights by type."""
    manifest = model["manifest"]
    recs = result["records"]
    if not recs:
        return {}
    quiet = [r for r in recs if r["kind"] == "silent" and r["turn"] > 1 and not r.get("evict_s")]
    replies = [r for r in recs if r["kind"] == "reply"]
    at = {}
    for t in opts.report_turns:
        if t > len(recs):
            continue  # a failed job stopped early
        lo, hi = max(t - opts.window, 2), min(t + opts.window, len(recs))  # turn 1 (the system prompt) is alone
        win = [r for r in recs[lo - 1:hi] if r["kind"] == "silent"] if t > 1 else []
        win = win or [recs[t - 1]]
        at[t] = {k: _median(r.get(k) for r in win) for k in
                 ("total_s", "render_s", "positions_s", "vision_s", "prefill_s", "decode_s",
                  "evict_s", "other_s", "cache_before")}
        at[t]["turn_s"] = recs[t - 1]["total_s"]
    gflops = [prefill_flops(manifest.text, r["prefill_tokens"], r["cache_before"], model["decoder_params"])
              / r["prefill_s"] / 1e9 for r in quiet if r["prefill_s"]]
    vis = [r["vision_s"] for r in recs if r["turn"] > 1]
    evicts = [r["evict_s"] for r in recs if r.get("evict_s")]
    dec_tok, dec_s = sum(r.get("decode_tokens", 0) for r in replies), sum(r["decode_s"] for r in replies)
    bytes_tok = sum(decoder_bytes.values())
    limit = probes["bandwidth_gbs"] * 1e9 / bytes_tok  # tokens/s if every weight byte streamed at copy speed
    tok_s = dec_tok / dec_s if dec_s and dec_tok else None
    kept, dropped = sum(r.get("kept", 0) for r in recs), sum(r.get("dropped", 0) for r in recs)
    calls = [r["calls"] for r in quiet]
    first, last = (sorted(opts.report_turns)[1:] or list(opts.report_turns))[0], max(at)
    out = {
        "load_s": result["info"].get("load_s"), "peak_rss_gb": result["info"].get("peak_rss_gb"),
        "vision_s": _median(vis),
        "vision_gflops": _median(vision_flops(manifest.vision, model["vision_params"], model["patches_per_turn"])
                                 / v / 1e9 for v in vis if v),
        "prefill_s": _median(r["prefill_s"] for r in quiet),
        "prefill_tokens": _median(r["prefill_tokens"] for r in quiet),
        "prefill_gflops": _median(gflops),
        "silent_turn_s": _median(r["total_s"] for r in quiet),
        "silent_calls": _median(calls), "silent_calls_max": max(calls) if calls else None,
        "silent_one_call_share": (sum(c == 1 for c in calls) / len(calls)) if calls else None,
        "ttft_s": _median(r.get("ttft_s") for r in replies),
        "decode_tok_s": tok_s, "decode_bytes_per_token": bytes_tok, "decode_limit_tok_s": limit,
        "decode_fraction_of_limit": tok_s / limit if tok_s and limit else None,
        "decode_by_reply": [{"turn": r["turn"], "context": r["cache_before"],
                             "tok_s": r["decode_tokens"] / r["decode_s"] if r["decode_s"] else None}
                            for r in replies if r.get("decode_tokens")],
        "at": at,
        "run_s": (result["info"].get("load_s") or 0.0) + sum(r["total_s"] for r in recs),  # load + every turn
        "turns": len(recs),
        "evictions": len(evicts), "evict_s": _median(evicts), "evict_amortized_s": sum(evicts) / len(recs),
        "dropped_share": dropped / (kept + dropped) if kept + dropped else None,
    }
    if first in at:
        out["flat_ratio"] = {"from": first, "to": last, "ratio": at[last]["total_s"] / at[first]["total_s"]}
    return out


def run_bench(jobs: list[Job], opts: BenchOptions, target: dict, lockstep: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Probe the machine, run the jobs, summarize: the whole report as a JSON-ready dict. ``jobs[0].bundle`` is
    the model's reference (float32) bundle: FLOP counts and the baseline's bytes per token come from it."""
    from edge_duet.manifest import Manifest
    from edge_duet.runtime.preprocess import preprocess_frame

    threads = opts.threads or os.cpu_count() or 1
    log("measuring memory bandwidth and matmul speed ...")
    probes = {"load_average_start": os.getloadavg(), **measure_bandwidth(threads),
              "matmul_gflops": measure_matmul(threads)}
    main = jobs[0].bundle
    manifest = Manifest.load(main)
    weights = {b: graph_weights(b) for b in dict.fromkeys(j.bundle for j in jobs)}
    grid = preprocess_frame(synthetic_frames(1, opts)[0], manifest.preprocess, channels="rgb")[1]
    model = {"manifest": manifest, "decoder_params": weights[main]["elements"],
             "vision_params": graph_weights(main, "vision")["elements"],
             "patches_per_turn": int(np.prod(grid)) * opts.frames_per_turn}
    results = run_jobs(jobs, opts, lockstep, log)
    sums = [summarize(r, opts, model, probes, weights[j.bundle]["bytes"]) for r, j in zip(results, jobs)]
    return {
        "machine": {**machine_info(threads), **probes}, "target": target, "options": asdict(opts),
        "model": {"name": manifest.name, "text": asdict(manifest.text), "vision": asdict(manifest.vision),
                  "decoder_params": model["decoder_params"], "vision_params": model["vision_params"],
                  "frame_grid_thw": list(grid), "patches_per_turn": model["patches_per_turn"],
                  "decoder_bytes": {b: w["bytes"] for b, w in weights.items()}},
        "jobs": [asdict(j) for j in jobs], "results": results, "summaries": sums,
    }
