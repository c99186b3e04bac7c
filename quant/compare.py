"""``edge-duet compare BUNDLE_A BUNDLE_B``: how far a variant (B) is from a reference (A), in the numbers that
matter for a proactive assistant.

1. Probe (teacher-forced): a few turns of one dialogue; A decodes greedily, B is fed A's tokens. Per position:
   logits cosine, max |dlogit|, whether B's argmax is A's token. Each bundle runs its own vision graph, so this
   measures the whole pipeline, not the decoder alone.
2. Dialogues (free-running): both Sessions over the same frames - the benchmark's frame-input file with
   ``--benchmark DIR``, else generated dialogues - and per turn the final decision (reply or silence, after a
   late-confirmed silence is resolved) and the reply text. Decision agreement is over all turns.
3. With a benchmark's ``gold.json``: PAUC and duplicate % of both (offline overlap judge) and their deltas.
4. Cost: size on disk, per-turn latency, decode speed, and peak memory (RSS): each bundle runs its dialogues in
   a fresh child process, so its peak is its own.

Random-weight models say nothing about quantization *quality* (their logits are near-uniform noise that any
rounding reorders): run this on trained weights (the demo model) before trusting a number.
"""

from __future__ import annotations

import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge_duet.errors import BundleError, InputError, UsageError
from edge_duet.manifest import Manifest


@dataclass(frozen=True)
class CompareOptions:
    dialogues: int | None = None  # generated dialogues (default 3) / benchmark examples (default: all)
    turns: int | None = None  # turns per dialogue (generated default 10; benchmark: all)
    probe_turns: int = 3
    probe_tokens: int = 12  # forced tokens per probe turn
    max_new_tokens: int = 32
    frame_size: int = 224
    providers: str | None = None
    threads: int | None = None
    isolate: bool = True  # run each bundle in its own process (needed for a per-bundle peak RSS)
    seed: int = 0


# ----------------------------------------------------------------------------------------------- dialogues


@dataclass(frozen=True)
class DTurn:
    frames: tuple  # HxWx3 uint8 RGB arrays, or image paths
    text: str | None
    time_s: float
    must_reply: bool = False


@dataclass(frozen=True)
class Dialogue:
    question_id: str
    system: str | None
    turns: tuple[DTurn, ...]


def generated_dialogues(n: int, turns: int, frames_per_turn: int, interval_s: float, size: int,
                        seed: int) -> list[Dialogue]:
    """Deterministic synthetic streams: coloured squares that appear, move and leave on a noisy background;
    a watch question on turn 0 and a must-reply question half way, so replies happen even on random weights."""
    out = []
    for d in range(n):
        rng = np.random.default_rng([seed, d])
        squares = []  # (appear_turn, leave_turn, colour, x, y, dx, dy, side)
        for _ in range(4):
            a = int(rng.integers(0, max(turns - 1, 1)))
            squares.append((a, int(rng.integers(a + 1, turns + 2)), rng.integers(40, 255, 3), *rng.uniform(0, 0.7, 2),
                            *rng.uniform(-0.04, 0.04, 2), int(rng.integers(size // 8, size // 3))))
        base = rng.integers(60, 120, 3)
        dialogue_turns = []
        for k in range(turns):
            frames = []
            for f in range(frames_per_turn):
                step = k * frames_per_turn + f
                img = np.clip(base + rng.normal(0, 6, (size, size, 3)), 0, 255).astype(np.uint8)
                for a, leave, colour, x, y, dx, dy, side in squares:
                    if a <= k < leave:
                        px = int(((x + dx * step) % 0.8) * size)
                        py = int(((y + dy * step) % 0.8) * size)
                        img[py:py + side, px:px + side] = colour
                frames.append(img)
            text = ("Tell me when something appears." if k == 0 else
                    "What colour is the biggest square?" if k == turns // 2 else None)
            dialogue_turns.append(DTurn(tuple(frames), text, round((k + 1) * frames_per_turn * interval_s, 3),
                                        must_reply=k == turns // 2))
        out.append(Dialogue(f"gen-{seed}-{d}", None, tuple(dialogue_turns)))
    return out


def benchmark_dialogues(bench_dir: Path, limit: int | None, turns: int | None) -> list[Dialogue]:
    from edge_duet.runtime.infer import load_examples

    path = bench_dir / "infer_input.json"
    if not path.is_file():
        raise InputError(f"{bench_dir} has no infer_input.json: make one with `edge-duet make-benchmark DIR`")
    examples = load_examples(path)[:limit]
    return [Dialogue(ex.question_id, ex.system,
                     tuple(DTurn(t.images, t.text, t.time, t.must_reply) for t in ex.turns[:turns]))
            for ex in examples]


# ----------------------------------------------------------------------------------------------- probe


def _probe(session, turns: Sequence[DTurn], tokens: int, forced: list[list[int]] | None, encoded=None):
    """Run ``turns`` through the engine on one growing cache; per turn: greedy (or ``forced``) tokens and the
    logits rows that chose them ((n+1, vocab): the row after the prompt, then one per token). ``encoded``: each
    turn's visual embeddings computed beforehand (see ``_staged_probe``)."""
    from edge_duet.runtime.context import Chunk, Context, frames_to_chunks
    from edge_duet.runtime.preprocess import preprocess_frame

    engine, r, m = session.engine, session.renderer, session.manifest
    eos = set(m.tokens.eos_ids)
    nl = list(r.assistant_end()[0].ids[1:])
    ctx = Context(engine, m.prompt.max_context_tokens)
    pending = list(r.system(session.system_prompt)[0].ids)
    rows_out, tokens_out = [], []
    for k, turn in enumerate(turns):
        pre = [preprocess_frame(_load(f), m.preprocess, channels="rgb") for f in turn.frames]
        frames = []
        if pre:
            vis = (encoded[k] if encoded is not None
                   else engine.encode_frames(np.concatenate([p for p, _ in pre]), [g for _, g in pre]))
            frames = frames_to_chunks(vis, [g for _, g in pre], m.vision.merge_size)
        it = iter(frames)
        pieces = r.user([g for _, g in pre], turn.text) + r.assistant_start(None)
        chunks = [Chunk(ids=tuple(pending))] + [Chunk(ids=tuple(p.ids)) if hasattr(p, "ids") else next(it)
                                               for p in pieces]
        logits = ctx.prefill(chunks)
        seq = forced[k] if forced is not None else None
        rows, out = [logits[-1]], []
        for i in range(tokens):  # rows[i] chose out[i]
            if seq is not None and i >= len(seq):
                break
            tok = seq[i] if seq is not None else int(np.argmax(rows[-1]))
            out.append(tok)
            if tok in eos:  # a stop token is not fed: it opens the closing ids below
                break
            rows.append(ctx.decode(tok))
        rows_out.append(np.stack(rows).astype(np.float32))
        tokens_out.append(out)
        stopped = bool(out) and out[-1] in eos
        pending = ([out[-1]] if stopped else []) + ([] if stopped and out[-1] == m.tokens.im_end
                                                    else [m.tokens.im_end]) + nl
    return rows_out, tokens_out


def _load(frame):
    if isinstance(frame, (str, Path)):
        from PIL import Image

        with Image.open(frame) as im:
            return np.asarray(im.convert("RGB"))
    return frame


def probe_metrics(rows_a: list[np.ndarray], rows_b: list[np.ndarray], tokens_a: list[list[int]]) -> dict:
    cos, diff, agree, n = [], 0.0, 0, 0
    for ra, rb, toks in zip(rows_a, rows_b, tokens_a):
        k = min(len(ra), len(rb))
        a, b = ra[:k].astype(np.float64), rb[:k].astype(np.float64)
        cos += list((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30))
        diff = max(diff, float(np.abs(a - b).max()))
        for i, t in enumerate(toks[:k]):
            agree += int(np.argmax(rb[i]) == t)
            n += 1
    return {"logits_cosine": float(np.mean(cos)), "logits_cosine_min": float(np.min(cos)), "max_abs_diff": diff,
            "argmax_agree": agree / max(n, 1), "positions": len(cos), "per_position_cosine": [float(c) for c in cos]}


def _staged_probe(bundle: str, turns: Sequence[DTurn], tokens: int, forced: list[list[int]] | None):
    """``_probe`` with the vision graph run first for every turn and freed before the text graphs load: a 3B
    float32 bundle then holds its decoder and embedding graphs (13.6 GB), not all three at once."""
    import gc
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from edge_duet.manifest import Manifest
    from edge_duet.runtime.chat import ChatRenderer
    from edge_duet.runtime.engine import Engine
    from edge_duet.runtime.preprocess import preprocess_frame

    bundle = Path(bundle)
    m = Manifest.load(bundle)
    big = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file()) > 4 * 1024**3
    engine = Engine(bundle, m, providers="cpu", graphs=("vision",), low_memory=big)
    encoded = []
    for turn in turns:
        pre = [preprocess_frame(_load(f), m.preprocess, channels="rgb") for f in turn.frames]
        encoded.append(engine.encode_frames(np.concatenate([p for p, _ in pre]), [g for _, g in pre]) if pre else None)
    del engine
    gc.collect()
    engine = Engine(bundle, m, providers="cpu", graphs=("embed", "decoder"), low_memory=big)
    view = SimpleNamespace(engine=engine, manifest=m, system_prompt=m.prompt.system_prompt,
                           renderer=ChatRenderer(Tokenizer.from_file(str(bundle / m.tokenizer)), m.tokens,
                                                 m.vision.merge_size))
    return _probe(view, turns, tokens, forced, encoded)


def probe_agreement(bundle_a: str | Path, bundle_b: str | Path, seed: int = 0, tokens: int = 6,
                    isolate: bool = True) -> dict:
    """One generated turn through both bundles (B teacher-forced on A): logits cosine, max diff, argmax agreement.
    Each bundle runs in its own child process (``isolate``), graph group by graph group, so the peak is one
    bundle's decoder and embedding graphs, whatever the quantizer left in this process."""
    from edge_duet import isolate as iso
    from edge_duet.manifest import Manifest

    frames_per_turn = Manifest.load(bundle_a).prompt.frames_per_turn
    dialogue = generated_dialogues(1, 1, frames_per_turn, 1.0, 112, seed)[0]
    run = (lambda *a: iso.call(_staged_probe, *a, what="the probe turn")) if isolate else _staged_probe
    rows_a, toks_a = run(str(bundle_a), dialogue.turns, tokens, None)
    rows_b, _ = run(str(bundle_b), dialogue.turns, tokens, toks_a)
    m = probe_metrics(rows_a, rows_b, toks_a)
    return {k: round(v, 6) for k, v in m.items() if k != "per_position_cosine"}


# ----------------------------------------------------------------------------------------------- one bundle


def _rss_mib_now() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (resource.getpagesize() / 2**20)
    except OSError:
        return float("nan")


def run_bundle(bundle: str, dialogues: list[Dialogue], probe_turns: list[DTurn], probe_tokens: int,
               forced: list[list[int]] | None, options: CompareOptions) -> dict:
    """Everything measured on one bundle (runs in a child process when ``options.isolate``)."""
    from edge_duet.runtime.events import Reply, Silence, TurnStats
    from edge_duet.runtime.session import Session, SessionOptions

    t0 = time.perf_counter()
    session = Session(bundle, SessionOptions(max_new_tokens=options.max_new_tokens, providers=options.providers,
                                             threads=options.threads))
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mib_now()
    rows, tokens = _probe(session, probe_turns, probe_tokens, forced)
    runs = []
    for d in dialogues:
        session.reset(d.system)
        decisions: dict[int, dict] = {}
        stats = []

        def take(events, wall: list):
            for ev in events:
                if isinstance(ev, Silence):
                    decisions.setdefault(ev.turn, {"decision": "silence", "text": None, "t": ev.t})
                elif isinstance(ev, Reply):
                    decisions[ev.turn] = {"decision": "reply", "text": ev.text, "t": ev.t, "n_tokens": len(ev.token_ids)}
                elif isinstance(ev, TurnStats):
                    stats.append({"turn": ev.turn, "vision_s": ev.vision_s, "prefill_s": ev.prefill_s,
                                  "decode_s": ev.decode_s, "decoder_calls": ev.decoder_calls, "wall_s": wall[0]})

        for turn in d.turns:
            if turn.text:
                session.ask(turn.text, must_reply=turn.must_reply, t=turn.time_s)
            if turn.frames:
                session.add_frames([_load(f) for f in turn.frames], t=turn.time_s, channels="rgb")
            wall = [0.0]
            ts = time.perf_counter()
            events = list(session.step())
            wall[0] = time.perf_counter() - ts
            take(events, wall)
        take(list(session.finish()), [0.0])
        runs.append({"question_id": d.question_id, "turns": [decisions.get(k, {"decision": "none"})
                                                             for k in range(len(d.turns))],
                     "times": [t.time_s for t in d.turns], "user": [t.text for t in d.turns], "stats": stats})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"load_s": load_s, "rss_loaded_mib": rss_loaded, "peak_rss_mib": peak if options.isolate else None,
            "probe_rows": rows, "probe_tokens": tokens, "runs": runs}


def _run(bundle, dialogues, probe_turns, probe_tokens, forced, options: CompareOptions) -> dict:
    """``run_bundle`` here, or in a fresh interpreter so that its peak RSS is the bundle's own."""
    args = (str(bundle), dialogues, probe_turns, probe_tokens, forced, options)
    if not options.isolate:
        return run_bundle(*args)
    from edge_duet import isolate

    return isolate.call(run_bundle, *args, what=f"measuring {bundle}")


# ----------------------------------------------------------------------------------------------- report


@dataclass
class CompareReport:
    a: dict[str, Any]  # per-bundle summary
    b: dict[str, Any]
    probe: dict[str, Any]
    decisions: dict[str, Any]
    benchmark: dict[str, Any] | None = None
    per_turn: list[dict] = field(default_factory=list)  # one row per (dialogue, turn)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def bundle_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())


def _summary(bundle: Path, m: Manifest, res: dict) -> dict:
    walls = [s["wall_s"] for r in res["runs"] for s in r["stats"]]
    # per turn that decoded: decoder calls after the prefill over the decode time (a reply that decodes to
    # empty text is a Silence but still decoded); the median resists a descheduled outlier
    rates = [(s["decoder_calls"] - 1) / s["decode_s"] for r in res["runs"] for s in r["stats"]
             if s["decoder_calls"] >= 3 and s["decode_s"] > 0]
    return {
        "bundle": str(bundle), "variant": m.variant,
        "precision": {g: s.precision for g, s in m.graphs.items()},
        "size_mib": bundle_bytes(bundle) / 2**20, "load_s": res["load_s"], "peak_rss_mib": res["peak_rss_mib"],
        "rss_loaded_mib": res["rss_loaded_mib"], "turns": len(walls),
        "turn_ms_median": 1000 * float(np.median(walls)) if walls else None,
        "turn_ms_p90": 1000 * float(np.percentile(walls, 90)) if walls else None,
        "decode_tok_s": float(np.median(rates)) if rates else None,
        "replies": sum(t["decision"] == "reply" for r in res["runs"] for t in r["turns"]),
    }


def _check_compatible(ma: Manifest, mb: Manifest, a: Path, b: Path) -> None:
    if ma.text != mb.text or ma.tokens != mb.tokens or ma.files.get(ma.tokenizer) != mb.files.get(mb.tokenizer):
        raise BundleError(f"{a} and {b} are not variants of one model (text dims, special tokens or tokenizer "
                          "differ): compare a bundle with its own quantized copies")


def compare_bundles(bundle_a: str | Path, bundle_b: str | Path, benchmark: str | Path | None = None,
                    options: CompareOptions = CompareOptions(), log=print) -> CompareReport:
    a, b = Path(bundle_a), Path(bundle_b)
    ma, mb = Manifest.load(a), Manifest.load(b)
    _check_compatible(ma, mb, a, b)
    if options.probe_turns < 1 or options.probe_tokens < 1:
        raise UsageError("`CompareOptions.probe_turns` and `CompareOptions.probe_tokens` must be at least 1")
    fpt, interval = ma.prompt.frames_per_turn, ma.prompt.frame_interval_s
    gold = None
    if benchmark is not None:
        bench = Path(benchmark)
        dialogues = benchmark_dialogues(bench, options.dialogues, options.turns)
        if (bench / "gold.json").is_file():
            from edge_duet.eval.formats import load_gold

            ids = {d.question_id for d in dialogues}
            gold = [g for g in load_gold(bench / "gold.json") if g.question_id in ids]
    else:
        dialogues = generated_dialogues(options.dialogues or 3, options.turns or 10, fpt, interval,
                                        options.frame_size, options.seed)
    if not dialogues or not any(d.turns for d in dialogues):
        raise InputError("no dialogue turns to compare on")
    probe_turns = list(dialogues[0].turns[:options.probe_turns])
    log(f"[A] {a} ({ma.variant}) ...")
    ra = _run(a, dialogues, probe_turns, options.probe_tokens, None, options)
    log(f"[B] {b} ({mb.variant}) ...")
    rb = _run(b, dialogues, probe_turns, options.probe_tokens, ra["probe_tokens"], options)

    probe = probe_metrics(ra["probe_rows"], rb["probe_rows"], ra["probe_tokens"])
    per_turn, same, text_same, both_reply = [], 0, 0, 0
    confusion = {"reply/reply": 0, "reply/silence": 0, "silence/reply": 0, "silence/silence": 0}
    for da, db in zip(ra["runs"], rb["runs"]):
        for k, (ta, tb) in enumerate(zip(da["turns"], db["turns"])):
            key = f"{ta['decision']}/{tb['decision']}"
            confusion[key] = confusion.get(key, 0) + 1
            same += ta["decision"] == tb["decision"]
            if ta["decision"] == tb["decision"] == "reply":
                both_reply += 1
                text_same += ta["text"] == tb["text"]
            per_turn.append({"question_id": da["question_id"], "turn": k, "time_s": da["times"][k],
                             "a": ta["decision"], "b": tb["decision"], "a_text": ta.get("text"), "b_text": tb.get("text")})
    n = len(per_turn)
    decisions = {"turns": n, "agree": same, "agreement": same / n if n else None, "confusion_a_b": confusion,
                 "both_reply": both_reply, "reply_text_equal": text_same,
                 "reply_text_agreement": text_same / both_reply if both_reply else None}
    report = CompareReport(_summary(a, ma, ra), _summary(b, mb, rb),
                           {k: v for k, v in probe.items()}, decisions, per_turn=per_turn)
    if gold is not None:
        report.benchmark = _benchmark_scores(gold, ra["runs"], rb["runs"])
    for kind in ("reply", "silence"):
        if n and confusion.get(f"{kind}/{kind}") == n:
            report.notes.append(f"both bundles chose {kind} on every turn: decision agreement says little here; "
                                "it needs a model whose decisions vary from turn to turn (a trained one)")
    report.a["turn_ms"] = [s["wall_s"] * 1000 for r in ra["runs"] for s in r["stats"]]
    report.b["turn_ms"] = [s["wall_s"] * 1000 for r in rb["runs"] for s in r["stats"]]
    return report


def _predictions(runs: list[dict]):
    from edge_duet.eval.formats import Prediction, Reply

    return [Prediction(r["question_id"], tuple(sorted((Reply(t["t"], t["text"]) for t in r["turns"]
                                                       if t["decision"] == "reply" and t["text"]),
                                                      key=lambda x: x.time_s)),
                       tuple(sorted(set(r["times"])))) for r in runs]


def _benchmark_scores(gold, runs_a, runs_b) -> dict:
    from edge_duet.eval.evaluator import evaluate
    from edge_duet.eval.judges import OverlapJudge

    judge = OverlapJudge()
    ea, eb = evaluate(gold, _predictions(runs_a), judge), evaluate(gold, _predictions(runs_b), judge)
    out = {"judge": judge.id, "examples": len(gold)}
    for key, sa, sb in (("overall", ea.overall, eb.overall),):
        out[key] = {"pauc_a": sa.pauc, "pauc_b": sb.pauc,
                    "pauc_delta": None if sa.pauc is None or sb.pauc is None else sb.pauc - sa.pauc,
                    "duplicate_pct_a": sa.duplicate_pct, "duplicate_pct_b": sb.duplicate_pct,
                    "duplicate_pct_delta": sb.duplicate_pct - sa.duplicate_pct,
                    "spans": sa.n_spans}
    out["subsets"] = {s.name: {"pauc_a": s.pauc, "pauc_b": eb.subset(s.name).pauc} for s in ea.subsets}
    return out
