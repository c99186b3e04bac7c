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
                    decode_steps: int = 4, frame_sizes=((150, 200), (90, 120), (130, 100))) -> ValidationReport:
    import torch

    from edge_duet.runtime.engine import Engine, KVCache
    from edge_duet.runtime.preprocess import preprocess_frame
    from edge_duet.runtime.session import Chunk, Session, SessionOptions, assemble

    from .reference import TorchReference, cache_layers

    engine = Engine(bundle_dir, providers="cpu")
    session = Session(bundle_dir, SessionOptions(), engine=engine)  # for its renderer and tokenizer only
    m = engine.manifest
    merge = m.vision.merge_size
    ref = TorchReference(model, m.tokens.image_pad)
    rng = np.random.default_rng(seed)
    imgs = _frames(rng, frame_sizes)
    pre = [preprocess_frame(f, m.preprocess, channels="rgb") for f in imgs]
    vis = engine.encode_frames(np.concatenate([p for p, _ in pre]), [g for _, g in pre])
    frame_chunks, start = [], 0
    for p, (t, gh, gw) in pre:
        n = t * (gh // merge) * (gw // merge)
        frame_chunks.append(Chunk(embeds=vis[start:start + n], grid=(gh // merge, gw // merge)))
        start += n
    frames_ref = [(i, p, g) for i, (p, g) in enumerate(pre)]

    r = session.renderer
    report = ValidationReport()
    problems: list[str] = []

    def to_chunks(pieces, frames):
        it = iter(frames)
        return [Chunk(ids=tuple(p.ids)) if hasattr(p, "ids") else next(it) for p in pieces]

    def ids_of(chunks):
        return [i for c in chunks for i in (c.ids if c.embeds is None else [m.tokens.image_pad] * c.num_tokens)]

    # ---- cases 1 and 2: prefill from empty
    all_results = {}
    for name, n_frames, frames in (("one frame", 1, [0]), ("two frames, two sizes", 2, [1, 2])):
        chunks = (to_chunks(r.system(session.system_prompt), [])
                  + to_chunks(r.user([pre[i][1] for i in frames], "What is happening?"),
                              [frame_chunks[i] for i in frames])
                  + to_chunks(r.assistant_start(None), []))
        ids = ids_of(chunks)
        emb, pos, end = assemble(engine, chunks, 0)
        rows = list(range(max(0, len(ids) - 8), len(ids)))
        logits, cache = engine.decode(emb, pos, KVCache.empty(m), rows)
        out = ref.forward(ids, [frames_ref[i] for i in frames], rows=rows)
        ref_logits = out.logits.numpy()
        dl = float(np.abs(logits - ref_logits).max())
        dkv = max(float(np.abs(k - rk.numpy()).max()) for (k, _), (rk, _) in zip(cache.layers, cache_layers(out.cache)))
        dkv = max(dkv, max(float(np.abs(v - rv.numpy()).max())
                           for (_, v), (_, rv) in zip(cache.layers, cache_layers(out.cache))))
        _check(problems, name, dl, dkv, float(np.abs(ref_logits).max()), tol)
        report.cases.append(CaseResult(name, len(ids), dl, dkv))
        all_results[name] = (chunks, ids, cache, end)

    # ---- case 3: a reply, then a new turn on top of the cache, then greedy decoding
    chunks, ids, cache, pos = all_results["two frames, two sizes"]
    eos = list(m.tokens.eos_ids)
    gen, stop = ref.greedy(ids, [frames_ref[1], frames_ref[2]], 3, eos)
    reply = list(gen) + ([stop] if stop is not None else []) + ([m.tokens.im_end] if stop != m.tokens.im_end else [])
    reply += list(r.assistant_end()[0].ids[1:])
    turn2 = to_chunks(r.user([pre[0][1]], "And now?"), [frame_chunks[0]]) + to_chunks(r.assistant_start(None), [])
    # ORT: the reply tokens, then the new turn, on the existing cache
    emb, p, pos = assemble(engine, [Chunk(ids=tuple(reply))], pos)
    _, cache = engine.decode(emb, p, cache)
    emb, p, pos = assemble(engine, turn2, pos)
    s = emb.shape[0]
    rows_local = list(range(max(0, s - 8), s))
    logits, cache = engine.decode(emb, p, cache, rows_local)
    full_ids = ids + reply + ids_of(turn2)
    frames_all = [frames_ref[1], frames_ref[2], frames_ref[0]]
    rows = [len(ids) + len(reply) + i for i in rows_local]
    out = ref.forward(full_ids, frames_all, rows=rows)
    ref_logits = out.logits.numpy()
    dl = float(np.abs(logits - ref_logits).max())
    dkv = max(float(np.abs(a - b.numpy()).max()) for (k, v), (rk, rv) in zip(cache.layers, cache_layers(out.cache))
              for a, b in ((k, rk), (v, rv)))
    # greedy continuation both ways
    ref_gen, _ = ref.greedy(full_ids, frames_all, decode_steps, eos)
    ort_gen, tok = [], int(np.argmax(logits[-1]))
    while tok not in eos and len(ort_gen) < decode_steps:
        ort_gen.append(tok)
        emb, p, pos = assemble(engine, [Chunk(ids=(tok,))], pos)
        lg, cache = engine.decode(emb, p, cache)
        tok = int(np.argmax(lg[-1]))
    agree = sum(a == b for a, b in zip(ort_gen, ref_gen))
    _check(problems, "turn on a cache", dl, dkv, float(np.abs(ref_logits).max()), tol)
    if ort_gen != ref_gen:
        problems.append(f"turn on a cache: greedy tokens differ: onnx {ort_gen} vs torch {ref_gen}")
    report.cases.append(CaseResult("turn on a cache + decode", len(full_ids), dl, dkv,
                                   f"{agree}/{max(len(ref_gen), len(ort_gen))} tokens equal"))
    if problems:
        raise ValidationError(f"the exported graphs in {bundle_dir} disagree with PyTorch:", problems)
    return report


def _check(problems: list[str], name: str, dl: float, dkv: float, scale: float, tol: Tolerance) -> None:
    limit = tol.logits_atol + tol.logits_rtol * scale
    if not np.isfinite(dl) or dl > limit:
        problems.append(f"{name}: max abs logit diff {dl:.3g} > {limit:.3g}")
    if not np.isfinite(dkv) or dkv > tol.kv_atol + tol.logits_rtol * scale:
        problems.append(f"{name}: max abs KV diff {dkv:.3g} > {tol.kv_atol:.3g}")
