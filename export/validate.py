"""Validation after export: ONNX Runtime over the bundle vs transformers on the checkpoint.

Three cases, each driven the way the runtime drives the graphs (numpy preprocessing, index arrays, M-RoPE
positions, the KV cache carried between calls):

1. one frame and a question, prefilled from an empty cache;
2. two frames of different sizes;
3. a second turn on top of the cache of case 2 plus a short reply, then greedy decoding.

Every mismatch (max abs logit diff, KV diff, greedy token disagreement) is collected, then one
:class:`ValidationError` lists them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_duet.errors import ValidationError


@dataclass(frozen=True)
class Tolerance:
    logits_atol: float = 1e-4
    logits_rtol: float = 1e-5  # of the largest |logit|: big random models have big logits
    kv_atol: float = 1e-4


@dataclass
class CaseResult:
    name: str
    tokens: int
    max_logit_diff: float
    max_kv_diff: float
    greedy_agree: str = "-"


@dataclass
class ValidationReport:
    cases: list[CaseResult] = field(default_factory=list)

    def summary(self) -> str:
        lines = ["validation (ONNX Runtime vs PyTorch):"]
        for c in self.cases:
            lines.append(f"  {c.name:<28} {c.tokens:>5} tokens  max|dlogit| {c.max_logit_diff:.2e}  "
                         f"max|dKV| {c.max_kv_diff:.2e}  greedy {c.greedy_agree}")
        return "\n".join(lines)


def _frames(rng: np.random.Generator, sizes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def validate_bundle(model, bundle_dir: str | Path, tol: Tolerance = Tolerance(), seed: int = 0,
                    decode_steps: int = 4, frame_sizes=((150, 200), (90, 120), (130, 100)),
                    low_memory: bool = False) -> ValidationReport:
    """Compare the bundle with PyTorch. ``model`` is the loaded model, or a function that loads it: with
    ``low_memory`` the ONNX side runs first and is freed before the model is loaded, so the two never share
    memory (a 3B model in fp32 and its ONNX copy do not fit 24 GB together)."""
    import gc

    if low_memory:  # a child process gives all of ONNX Runtime's memory back before PyTorch loads the model
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as pool:
            onnx_side = pool.apply(_run_onnx, (str(bundle_dir), seed, decode_steps, frame_sizes, True))
    else:
        onnx_side = _run_onnx(bundle_dir, seed, decode_steps, frame_sizes, low_memory)
    gc.collect()
    model = model() if callable(model) and not hasattr(model, "forward") else model
    return _compare_with_torch(model, onnx_side, bundle_dir, tol, decode_steps)


@dataclass
class _OnnxSide:
    cases: list  # (name, ids, frame indices, rows, logits, kv layers, ort greedy tokens or None)
    frames: list  # (index, patches, grid)
    image_pad: int
    eos: list


def _run_onnx(bundle_dir, seed, decode_steps, frame_sizes, low_memory) -> _OnnxSide:
    from edge_duet.runtime.engine import Engine, KVCache
    from edge_duet.runtime.preprocess import preprocess_frame
    from edge_duet.runtime.session import Chunk, Session, SessionOptions, assemble

    engine = Engine(bundle_dir, providers="cpu", low_memory=low_memory)
    session = Session(bundle_dir, SessionOptions(), engine=engine)  # for its renderer and system prompt
    m = engine.manifest
    merge = m.vision.merge_size
    rng = np.random.default_rng(seed)
    pre = [preprocess_frame(f, m.preprocess, channels="rgb") for f in _frames(rng, frame_sizes)]
    vis = engine.encode_frames(np.concatenate([p for p, _ in pre]), [g for _, g in pre])
    frame_chunks, start = [], 0
    for p, (t, gh, gw) in pre:
        n = t * (gh // merge) * (gw // merge)
        frame_chunks.append(Chunk(embeds=vis[start:start + n], grid=(gh // merge, gw // merge)))
        start += n
    r = session.renderer
    eos = list(m.tokens.eos_ids)

    def to_chunks(pieces, frames=()):
        it = iter(frames)
        return [Chunk(ids=tuple(p.ids)) if hasattr(p, "ids") else next(it) for p in pieces]

    def ids_of(chunks):
        return [i for c in chunks for i in (c.ids if c.embeds is None else [m.tokens.image_pad] * c.num_tokens)]

    def kv(cache):
        return [(k.copy(), v.copy()) for k, v in cache.layers]

    def greedy(logits, cache, pos, steps):
        out, tok = [], int(np.argmax(logits))
        while tok not in eos and len(out) < steps:
            out.append(tok)
            emb, p, pos = assemble(engine, [Chunk(ids=(tok,))], pos)
            lg, cache = engine.decode(emb, p, cache)
            tok = int(np.argmax(lg[-1]))
        return out, tok, cache, pos

    cases = []
    # cases 1 and 2: prefill from an empty cache
    state = None
    for name, frames in (("one frame", [0]), ("two frames, two sizes", [1, 2])):
        chunks = (to_chunks(r.system(session.system_prompt))
                  + to_chunks(r.user([pre[i][1] for i in frames], "What is happening?"), [frame_chunks[i] for i in frames])
                  + to_chunks(r.assistant_start(None)))
        ids = ids_of(chunks)
        emb, pos, end = assemble(engine, chunks, 0)
        rows = list(range(max(0, len(ids) - 8), len(ids)))
        logits, cache = engine.decode(emb, pos, KVCache.empty(m), rows)
        cases.append((name, ids, frames, rows, logits, kv(cache), None))
        state = (ids, cache, end, logits[-1])
    # case 3: a short reply (ONNX's own greedy choice), then a new turn on top of the cache, then greedy decoding
    ids, cache, pos, last = state
    gen, stop, cache, pos = greedy(last, cache, pos, 3)  # every token of gen is in the cache; stop is not
    reply = ([stop] if stop in eos else []) + ([m.tokens.im_end] if stop != m.tokens.im_end else [])
    reply += list(r.assistant_end()[0].ids[1:])
    emb, p, pos = assemble(engine, [Chunk(ids=tuple(reply))], pos)
    _, cache = engine.decode(emb, p, cache)
    turn2 = to_chunks(r.user([pre[0][1]], "And now?"), [frame_chunks[0]]) + to_chunks(r.assistant_start(None))
    emb, p, pos = assemble(engine, turn2, pos)
    s = emb.shape[0]
    rows_local = list(range(max(0, s - 8), s))
    logits, cache = engine.decode(emb, p, cache, rows_local)
    kv_after = kv(cache)
    cont, _, _, _ = greedy(logits[-1], cache, pos, decode_steps)
    prefix = ids + gen + reply
    full_ids = prefix + ids_of(turn2)
    rows = [len(prefix) + i for i in rows_local]
    cases.append(("turn on a cache + decode", full_ids, [1, 2, 0], rows, logits, kv_after, cont))
    frames_ref = [(i, p_, g) for i, (p_, g) in enumerate(pre)]
    return _OnnxSide(cases=cases, frames=frames_ref, image_pad=m.tokens.image_pad, eos=eos)


def _compare_with_torch(model, side: _OnnxSide, bundle_dir, tol: Tolerance, decode_steps: int) -> ValidationReport:
    from .reference import TorchReference, cache_layers

    ref = TorchReference(model, side.image_pad)
    report = ValidationReport()
    problems: list[str] = []
    for name, ids, frames, rows, logits, kv, cont in side.cases:
        fr = [side.frames[i] for i in frames]
        out = ref.forward(ids, fr, rows=rows)
        ref_logits = out.logits.numpy()
        dl = float(np.abs(logits - ref_logits).max())
        dkv = max(float(np.abs(a - b.numpy()).max())
                  for (k, v), (rk, rv) in zip(kv, cache_layers(out.cache)) for a, b in ((k, rk), (v, rv)))
        _check(problems, name, dl, dkv, float(np.abs(ref_logits).max()), tol)
        agree = "-"
        if cont is not None:
            ref_cont, _ = ref.greedy(ids, fr, decode_steps, side.eos)
            same = sum(a == b for a, b in zip(cont, ref_cont))
            agree = f"{same}/{max(len(cont), len(ref_cont))} tokens equal"
            if cont != ref_cont:
                problems.append(f"{name}: greedy tokens differ: onnx {cont} vs torch {ref_cont}")
        report.cases.append(CaseResult(name, len(ids), dl, dkv, agree))
    if problems:
        raise ValidationError(f"the exported graphs in {bundle_dir} disagree with PyTorch:", problems)
    return report


def _check(problems: list[str], name: str, dl: float, dkv: float, scale: float, tol: Tolerance) -> None:
    limit = tol.logits_atol + tol.logits_rtol * scale
    if not np.isfinite(dl) or dl > limit:
        problems.append(f"{name}: max abs logit diff {dl:.3g} > {limit:.3g}")
    if not np.isfinite(dkv) or dkv > tol.kv_atol + tol.logits_rtol * scale:
        problems.append(f"{name}: max abs KV diff {dkv:.3g} > {tol.kv_atol:.3g}")
