"""``edge-duet bench``, the torch-free side: scripted proactive streams over a bundle, run side by side with the
transformers baseline (``export/baseline.py``), the hardware probes and the summary.

Every job (a bundle x provider x token-drop setting, or a transformers loop) runs in its own process, so its peak
memory is its own. The jobs advance in lockstep, a turn of each in turn, so a change of load on a shared machine
hits every job at the same turn index and the ratios stay fair::

    parent: bandwidth + matmul probes
       for turn in 1..N:  ──{"turn": n}──> job "edge fp32"          (EdgeRunner: Session, ONNX Runtime)
                          ──{"turn": n}──> job "edge fp32 drop"
                          ──{"turn": n}──> job "transformers demo"  (export/baseline.py: DemoLoop, PyTorch)
                          <──{"record": per-turn timings}── each
       summaries (the app prints the table, writes the JSON and the plot)

Random weights decide nothing sensible, so every job follows one script: a question at turn 1, a reply of
``reply_tokens`` tokens at the scripted reply turns, ``NO REPLY`` at every other turn. The script acts on the
logits after the model ran (the wanted token's logit is raised above the rest, or tokens are banned), so every
graph still runs in full: it only fixes which path each turn takes, the same in every job.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edge_duet.errors import EdgeDuetError

from .engine import Engine
from .events import Evicted, TurnStats


@dataclass(frozen=True)
class BenchOptions:
    """What every job of one bench run shares."""

    turns: int = 200
    report_turns: tuple[int, ...] = (1, 10, 50, 200)
    frame_size: tuple[int, int] = (640, 480)  # (width, height) of the generated camera frames
    frames_per_turn: int = 2
    frame_interval_s: float = 1.0
    reply_turns: tuple[int, ...] = (2, 20, 60, 100, 140, 180)  # 1-based turns that reply; all others are silent
    reply_tokens: int = 32
    question: str = "Tell me whenever something changes."
    max_context_tokens: int | None = None  # None: the bundle's default
    threads: int | None = None  # None: every core
    window: int = 2  # per-turn cost at turn T = median of the silent turns T-window .. T+window

    @classmethod
    def from_dict(cls, d: dict) -> "BenchOptions":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# ---------------------------------------------------------------------------------------------- the stream


def synthetic_frames(turn: int, opts: BenchOptions, seed: int = 0) -> list[np.ndarray]:
    """``frames_per_turn`` RGB uint8 frames of a camera-like scene: a fixed textured background, a square that
    drifts across it, a little sensor noise. Consecutive frames are alike, as in real video (token drop sees it)."""
    w, h = opts.frame_size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([60 + 120 * xx / w, 80 + 100 * yy / h, 140 - 60 * xx / w], -1) + rng.normal(0, 12, (h, w, 3))
    out = []
    for k in range(opts.frames_per_turn):
        i = (turn - 1) * opts.frames_per_turn + k
        frame = base.copy()
        side = max(h // 5, 2)
        x0 = int((i * 7) % max(w - side, 1))
        y0 = int((h - side) * (0.5 + 0.4 * np.sin(i / 15)))
        frame[y0:y0 + side, x0:x0 + side] = (220, 40, 40)
        frame += np.random.default_rng(seed + 1 + i).normal(0, 2, frame.shape)
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


@dataclass(frozen=True)
class Script:
    """The scripted decisions, applied to logits rows (numpy). ``text_vocab``: ids at or above it are not in the
    tokenizer (the model's vocabulary is padded) and are never chosen for a reply."""

    no_reply: tuple[int, ...]
    im_end: int
    eos: tuple[int, ...]
    text_vocab: int

    @property
    def silence(self) -> tuple[int, ...]:  # what a silent turn generates: NO REPLY<|im_end|>
        return self.no_reply + (self.im_end,)

    @staticmethod
    def force(row: np.ndarray, token: int) -> None:
        row[token] = row.max() + 1.0

    def ban(self, row: np.ndarray, first: bool) -> None:
        """A reply token: never a stop token, never beyond the tokenizer, and (first token) never ``NO``."""
        row[self.text_vocab:] = -np.inf
        row[list(self.eos) + ([self.no_reply[0]] if first else [])] = -np.inf


class ScriptedEngine(Engine):
    """An :class:`Engine` whose decoder logits follow the bench script. Rows are told apart by the logits index
    the session asks for: a row before the last new token verifies a speculated ``NO REPLY`` (confirm it), a
    one-token call continues a reply, the last row of a prefill is the turn's decision."""

    script: Script | None = None
    reply = False
    steps = 0  # one-token calls: decoded reply tokens
    top = -1  # the model's own choice at the last decision, before the script acted

    def decode(self, embeds, positions, cache, logits_index=None):
        logits, cache = super().decode(embeds, positions, cache, logits_index)
        if self.script is None:
            return logits, cache
        s = embeds.shape[0]
        index = [s - 1] if logits_index is None else list(logits_index)
        spec = self.script.silence
        for row, i in zip(logits, index):
            if i < s - 1:
                if i + 1 < len(spec):
                    self.script.force(row, spec[i + 1])
            elif s == 1:
                self.script.ban(row, first=False)
                self.steps += 1
            else:
                self.top = int(np.argmax(row))
                if self.reply:
                    self.script.ban(row, first=True)
                else:
                    self.script.force(row, spec[0])
        return logits, cache


class EdgeRunner:
    """One edge-duet job: a :class:`Session` over ``bundle`` driven turn by turn (see :func:`_worker_main`)."""

    def __init__(self, bundle: str, options: dict, provider: str = "cpu", token_drop: float | None = None):
        from .session import Session, SessionOptions

        self.opts = BenchOptions.from_dict(options)
        t0 = time.perf_counter()
        engine = ScriptedEngine(bundle, providers=provider, threads=self.opts.threads)
        self.session = Session(bundle, SessionOptions(
            max_new_tokens=self.opts.reply_tokens, max_context_tokens=self.opts.max_context_tokens,
            token_drop_threshold=token_drop, providers=provider, threads=self.opts.threads), engine=engine)
        m = self.session.manifest
        engine.script = Script(tuple(self.session.renderer.text_ids(m.prompt.no_reply_text)), m.tokens.im_end,
                               tuple(m.tokens.eos_ids), self.session.tokenizer.get_vocab_size(with_added_tokens=True))
        self.engine = engine
        self.info = {"load_s": time.perf_counter() - t0, "providers": engine.sessions["decoder"].get_providers(),
                     "max_context_tokens": self.session.max_context_tokens}

    def turn(self, n: int) -> dict:
        s, o = self.session, self.opts
        reply = n in o.reply_turns
        self.engine.reply = reply
        frames = synthetic_frames(n, o)
        p_before, pending, steps = s.cache.length, s.context_tokens - s.cache.length, self.engine.steps
        t0 = time.perf_counter()
        if n == 1:
            s.ask(o.question)
        s.add_frames(frames, t=n * o.frames_per_turn * o.frame_interval_s, channels="rgb")
        t1 = time.perf_counter()
        evict_s, st = 0.0, None
        for ev in s.step():
            if isinstance(ev, Evicted):
                evict_s += ev.reprefill_s
            elif isinstance(ev, TurnStats):
                st = ev
        total = time.perf_counter() - t0
        rec = {"turn": n, "kind": "reply" if reply else "silent", "total_s": total, "render_s": t1 - t0,
               "vision_s": st.vision_s, "prefill_s": st.prefill_s, "decode_s": st.decode_s, "evict_s": evict_s,
               "calls": st.decoder_calls, "prefill_tokens": pending + st.new_tokens, "cache_before": p_before,
               "cache_after": s.cache.length, "kept": st.visual_tokens_kept, "dropped": st.visual_tokens_dropped,
               "top": self.engine.top}
        if reply:
            rec["ttft_s"] = (t1 - t0) + evict_s + st.vision_s + st.prefill_s
            rec["decode_tokens"] = self.engine.steps - steps
        return rec


# ---------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Job:
    """One column of the report. ``factory``: "module:callable" making, in the job's process, a runner with
    ``info`` and ``turn(n) -> record``; ``bundle``: the bundle whose decoder bytes bound its decode speed."""

    name: str
    kind: str  # "edge" or "transformers"
    factory: str
    args: dict
    bundle: str
    variant: str = "fp32"
    provider: str = "cpu"
    token_drop: float | None = None


class JobFailed(EdgeDuetError):
    """A job process reported an error or died; the others go on."""


class _Worker:
    """The parent's handle on one job process (JSON lines over stdin/stdout; the child's stderr is ours)."""

    def __init__(self, job: Job):
        self.job = job
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_duet.runtime.bench"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self.request({"factory": job.factory, "args": job.args})["ready"]

    def request(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            raise JobFailed(f"job {self.job.name!r} died: {exc}") from exc
        out = json.loads(line) if line else {"error": f"exited with code {self.proc.wait()} (see its messages above)"}
        if "error" in out:
            self.close()
            raise JobFailed(f"job {self.job.name!r} failed: {out['error']}")
        return out

    def close(self) -> dict:
        out = {}
        try:
            out = self.request({"end": True})["done"] if self.proc.poll() is None else {}
            self.proc.stdin.close()
        except (JobFailed, OSError):
            pass
        self.proc.wait(timeout=60)
        return out


def _worker_main() -> None:
    """``python -m edge_duet.runtime.bench``: one job's process."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever libraries print goes to stderr; stdout carries only the protocol

    def send(obj: dict) -> None:
        proto.write(json.dumps(obj) + "\n")

    runner = None
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if "factory" in msg:
                mod, name = msg["factory"].split(":")
                runner = getattr(importlib.import_module(mod), name)(**msg["args"])
                send({"ready": runner.info})
            elif "turn" in msg:
                send({"record": runner.turn(int(msg["turn"]))})
            else:
                send({"done": {"peak_rss_gb": _peak_rss_gb()}})
                return
        except Exception as exc:  # reported to the parent, which names the job
            send({"error": f"{type(exc).__name__}: {exc}"})
            return


def _peak_rss_gb() -> float | None:
    """This process's peak resident memory (Linux: VmHWM starts afresh at exec, unlike ru_maxrss)."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    hwm = [ln.split()[1] for ln in lines if ln.startswith("VmHWM:")]
    return int(hwm[0]) / 1024**2 if hwm else None  # kB


def run_jobs(jobs: list[Job], opts: BenchOptions, lockstep: bool = True,
             log: Callable[[str], None] = print) -> list[dict]:
    """Run every job over ``opts.turns`` turns; returns one result per job: info, records, peak memory, error."""
    results = [{"job": asdict(j), "info": {}, "records": [], "error": None} for j in jobs]
    groups = [list(range(len(jobs)))] if lockstep else [[i] for i in range(len(jobs))]
    for group in groups:
        workers: dict[int, _Worker] = {}
        try:
            for i in group:
                log(f"loading {jobs[i].name} ...")
                try:
                    workers[i] = _Worker(jobs[i])
                    results[i]["info"] = workers[i].info
                except JobFailed as exc:
                    results[i]["error"] = str(exc)
                    log(f"error: {exc}")
            _run_turns(jobs, workers, results, opts, lockstep, log)
            for i, w in list(workers.items()):
                results[i]["info"].update(w.close())
                del workers[i]
        finally:  # an error or Ctrl-C here: no job process outlives the bench
            for w in workers.values():
                w.proc.kill()
    return results


def _run_turns(jobs, workers: dict, results: list[dict], opts: BenchOptions, lockstep: bool, log) -> None:
    from tqdm import tqdm

    bar = tqdm(range(1, opts.turns + 1), desc="bench" if lockstep else jobs[next(iter(workers), 0)].name,
               unit="turn", disable=None)
    every = None if not bar.disable else max(opts.turns // 20, 1)  # no terminal: a line now and then
    for n in bar:
        for i in list(workers):
            try:
                results[i]["records"].append(workers[i].request({"turn": n})["record"])
            except JobFailed as exc:
                results[i]["error"] = str(exc)
                log(f"error: {exc}")
                del workers[i]
        if every and (n % every == 0 or n == opts.turns):
            log(f"turn {n}/{opts.turns}: " + ", ".join(
                f"{jobs[i].name} {results[i]['records'][-1]['total_s']:.2f} s" for i in workers))


# ---------------------------------------------------------------------------------------------- the limits


def measure_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> dict:
    """Copy bandwidth of a large float32 array (read + write bytes / s, STREAM's convention), best of
    ``repeats``, with 1 and ``threads`` threads (numpy releases the GIL while copying)."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    out = {}
    for k in sorted({1, max(threads, 1)}):
        cuts = np.linspace(0, src.size, k + 1).astype(int)
        best = float("inf")
        for _ in range(repeats):
            ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in zip(cuts, cuts[1:])]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        out[f"copy_gbs_{k}t"] = 2 * src.nbytes / best / 1e9
    return {**out, "bandwidth_gbs": max(out.values())}


def measure_matmul(threads: int, n: int = 2048) -> float:
    """float32 GEMM GFLOP/s through numpy's BLAS on ``threads`` threads (a fresh process: BLAS reads its thread
    count at start), best of 3: the practical compute peak for prefill."""
    code = (f"import numpy as np, time\na = np.ones(({n}, {n}), np.float32)\nb = []\n"
            "for _ in range(3):\n    t = time.perf_counter(); a @ a; b.append(time.perf_counter() - t)\n"
            f"print(2 * {n}**3 / min(b) / 1e9)")
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)


def graph_weights(bundle: str | Path, graph: str = "decoder") -> dict:
    """A graph's weights: ``bytes`` by element type (all read once per decode step) and ``elements``. Needs the
    ``onnx`` package; without it the file size stands in (``{"file": bytes}``, float32 elements assumed)."""
    from edge_duet.manifest import Manifest

    bundle = Path(bundle)
    spec = Manifest.load(bundle).graphs[graph]
    try:
        import onnx
        from onnx import helper
    except ImportError:
        size = sum((bundle / p).stat().st_size for p in (spec.path, *spec.external_data))
        return {"bytes": {"file": size}, "elements": size // 4}
    by_type: dict[str, int] = {}
    elements = 0
    for init in onnx.load(str(bundle / spec.path), load_external_data=False).graph.initializer:
        dtype, n = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)), int(np.prod(init.dims))
        by_type[dtype.name] = by_type.get(dtype.name, 0) + n * dtype.itemsize
        elements += n
    return {"bytes": by_type, "elements": elements}


def prefill_flops(text, s: int, p: int, decoder_params: int, n_logits: int = 1) -> float:
    """FLOPs the exported decoder executes for ``s`` new tokens on a ``p``-token cache: 2 per weight per token
    in the layers (norms and biases are a rounding error), the attention it computes in full (s x (p+s) scores
    and weighted sum: masked, not skipped), and the lm_head for ``n_logits`` rows."""
    head = text.vocab_size * text.hidden_size
    attn = text.num_layers * 4 * s * (p + s) * text.num_attention_heads * text.head_dim
    return 2 * s * (decoder_params - head) + attn + 2 * n_logits * head


def vision_flops(vision, vision_params: int, patches: int) -> float:
    """FLOPs of the vision graph on ``patches`` patches: 2 per weight per patch (the merger's weights per merged
    token), and per block a full patches x patches attention (the frames of a turn share one masked matrix)."""
    m, e = vision.merge_size**2, vision.hidden_size
    merger = (m * e) ** 2 + m * e * vision.out_hidden_size
    return 2 * patches * (vision_params - merger) + 2 * (patches // m) * merger + vision.depth * 4 * patches**2 * e


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
                  "evict_s", "cache_before")}
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
        "evictions": len(evicts), "evict_s": _median(evicts), "evict_amortized_s": sum(evicts) / len(recs),
        "dropped_share": dropped / (kept + dropped) if kept + dropped else None,
    }
    if first in at:
        out["flat_ratio"] = {"from": first, "to": last, "ratio": at[last]["total_s"] / at[first]["total_s"]}
    return out


def machine_info(threads: int) -> dict:
    import platform

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_end": os.getloadavg()}


def run_bench(jobs: list[Job], opts: BenchOptions, target: dict, lockstep: bool = True,
              log: Callable[[str], None] = print) -> dict:
    """Probe the machine, run the jobs, summarize: the whole report as a JSON-ready dict. ``jobs[0].bundle`` is
    the model's reference (float32) bundle: FLOP counts and the baseline's bytes per token come from it."""
    from edge_duet.manifest import Manifest

    from .preprocess import preprocess_frame

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


if __name__ == "__main__":
    _worker_main()
