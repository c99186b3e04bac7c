"""Validation after export: ONNX Runtime over the bundle vs transformers on the checkpoint.

Three cases, each driven the way the runtime drives the graphs (numpy preprocessing, index arrays, M-RoPE
positions, the KV cache carried between calls):

1. one frame and a question, prefilled from an empty cache;
2. two frames of different sizes;
3. a short reply (PyTorch's greedy choice, which ONNX must also choose), a second turn on top of the cache of
   case 2, then greedy decoding.

The two sides never hold the same weights at once, so a model whose float32 copy alone nearly fills the machine
(the 3B decoder: 12.4 GB) still validates: PyTorch runs first, graph by graph as export writes them (``TorchSide``:
the vision reference once the vision tower is exported, the full-recompute text reference once the decoder is),
its outputs are kept (kilobytes to megabytes), the model is freed, and then ONNX Runtime loads the vision graph
alone, frees it, and loads the embedding and decoder graphs. Every mismatch (max abs logit diff, KV diff, greedy
token disagreement) is collected, then one :class:`ValidationError` lists them all.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_duet.errors import ValidationError
from edge_duet.manifest import Manifest


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


# ----------------------------------------------------------------------------------------------- inputs


class Plan:
    """The inputs both sides see: frames preprocessed by the runtime's numpy code, dialogues rendered by the
    runtime's chat renderer. Built from the manifest and tokenizer alone, before any graph exists."""

    CASES = (("one frame", (0,)), ("two frames, two sizes", (1, 2)))
    REPLY_TOKENS = 3  # case 3: the reply generated before the second turn

    def __init__(self, manifest: Manifest, tokenizer_path: str | Path, seed: int = 0,
                 frame_sizes=((150, 200), (90, 120), (130, 100)), decode_steps: int = 4):
        from tokenizers import Tokenizer

        from edge_duet.runtime.chat import ChatRenderer
        from edge_duet.runtime.preprocess import preprocess_frame

        self.manifest = manifest
        self.decode_steps = decode_steps
        self.renderer = ChatRenderer(Tokenizer.from_file(str(tokenizer_path)), manifest.tokens,
                                     manifest.vision.merge_size)
        rng = np.random.default_rng(seed)
        self.pre = [preprocess_frame(f, manifest.preprocess, channels="rgb") for f in _frames(rng, frame_sizes)]
        self.eos = list(manifest.tokens.eos_ids)

    def first_turn(self, frames: Sequence[int]) -> list:
        r = self.renderer
        return (r.system(self.manifest.prompt.system_prompt)
                + r.user([self.pre[i][1] for i in frames], "What is happening?") + r.assistant_start(None))

    def second_turn(self) -> list:
        return self.renderer.user([self.pre[0][1]], "And now?") + self.renderer.assistant_start(None)

    def reply_tail(self, stop: int | None) -> list[int]:
        """What closes the generated reply of case 3: the stop token if there was one, ``<|im_end|>``, ``\\n``."""
        t = self.manifest.tokens
        tail = ([stop] if stop in self.eos else []) + ([t.im_end] if stop != t.im_end else [])
        return tail + list(self.renderer.assistant_end()[0].ids[1:])

    def ids_of(self, pieces) -> list[int]:
        return [i for p in pieces for i in (p.ids if hasattr(p, "ids") else [self.manifest.tokens.image_pad] * p.num_tokens)]


# ----------------------------------------------------------------------------------------------- PyTorch


@dataclass
class _TorchCase:
    name: str
    ids: list[int]
    frames: tuple[int, ...]
    rows: list[int]
    logits: np.ndarray
    kv: list[tuple[np.ndarray, np.ndarray]]
    reply: list[int] = field(default_factory=list)  # case 3: the generated reply (PyTorch's greedy)
    stop: int | None = None
    cont: list[int] | None = None  # case 3: greedy continuation after the second turn


@dataclass
class TorchSide:
    """PyTorch's outputs for the plan, gathered graph by graph while the weights of that graph are loaded."""

    plan: Plan
    vision: dict[int, np.ndarray] = field(default_factory=dict)  # frame index -> (tokens, hidden)
    cases: list[_TorchCase] = field(default_factory=list)

    def collect_vision(self, model) -> None:
        """Needs the vision tower's weights (float32)."""
        from .reference import TorchReference

        ref = TorchReference(model, self.plan.manifest.tokens.image_pad)
        for i, (patches, grid) in enumerate(self.plan.pre):
            self.vision[i] = ref.image_embeds(i, patches, grid).numpy().copy()

    def collect_text(self, model) -> None:
        """Needs the language model's weights (float32) and :meth:`collect_vision` done: the full recompute of
        every case, transformers' own positions (``get_rope_index``) and forward."""
        import torch

        from .reference import TorchReference, cache_layers

        plan = self.plan
        ref = TorchReference(model, plan.manifest.tokens.image_pad)
        for i, (patches, grid) in enumerate(plan.pre):  # the vision tower may be gone by now
            ref._vision_cache[i] = torch.from_numpy(self.vision[i])

        def frames_of(idx):
            return [(i, plan.pre[i][0], plan.pre[i][1]) for i in idx]

        def run(name, ids, idx, rows, **extra):
            out = ref.forward(ids, frames_of(idx), rows=rows)
            kv = [(k.numpy().copy(), v.numpy().copy()) for k, v in cache_layers(out.cache)]
            self.cases.append(_TorchCase(name, ids, tuple(idx), rows, out.logits.numpy().copy(), kv, **extra))

        for name, idx in plan.CASES:
            ids = plan.ids_of(plan.first_turn(idx))
            run(name, ids, idx, list(range(max(0, len(ids) - 8), len(ids))))
        ids = self.cases[-1].ids
        idx = plan.CASES[-1][1]
        reply, stop = ref.greedy(ids, frames_of(idx), plan.REPLY_TOKENS, plan.eos)
        turn2 = plan.ids_of(plan.second_turn())
        prefix = ids + reply + plan.reply_tail(stop)
        full = prefix + turn2
        rows = [len(prefix) + i for i in range(max(0, len(turn2) - 8), len(turn2))]
        full_idx = (*idx, 0)
        cont, _ = ref.greedy(full, frames_of(full_idx), plan.decode_steps, plan.eos)
        run("turn on a cache + decode", full, full_idx, rows, reply=reply, stop=stop, cont=cont)


# ----------------------------------------------------------------------------------------------- ONNX Runtime


def check_onnx(bundle_dir: str | Path, torch_side: TorchSide, tol: Tolerance = Tolerance(),
               low_memory: bool = False) -> ValidationReport:
    """Drive the bundle's graphs as the runtime does and compare with ``torch_side``. The vision graph is loaded
    alone and freed before the embedding and decoder graphs are."""
    from edge_duet.runtime.engine import Engine

    plan = torch_side.plan
    engine = Engine(bundle_dir, providers="cpu", low_memory=low_memory, graphs=("vision",))
    vis = engine.encode_frames(np.concatenate([p for p, _ in plan.pre]), [g for _, g in plan.pre])
    del engine
    gc.collect()
    report = ValidationReport()
    problems: list[str] = []
    for flavour in Manifest.load(bundle_dir).decoder_flavours:  # one at a time: a 3B decoder fills the memory
        engine = Engine(bundle_dir, providers="cpu", low_memory=low_memory, graphs=("embed", "decoder"),
                        decoder=flavour)
        _check_decoder(engine, torch_side, vis, tol, report, problems)
        del engine
        gc.collect()
    if problems:
        raise ValidationError(f"the exported graphs in {bundle_dir} disagree with PyTorch:", problems)
    return report


def _check_decoder(engine, torch_side: TorchSide, vis: np.ndarray, tol: Tolerance, report: ValidationReport,
                   problems: list[str]) -> None:
    """The three cases through one decoder flavour (``engine.flavour``), driven by a :class:`Context`."""
    from edge_duet.runtime.context import Chunk, Context, frames_to_chunks

    plan = torch_side.plan
    frame_chunks = frames_to_chunks(vis, [g for _, g in plan.pre], plan.manifest.vision.merge_size)
    tag = "" if engine.flavour == "plain" else f" [{engine.flavour}]"

    def to_chunks(pieces, frames=()):
        it = iter(frames)
        return [Chunk(ids=tuple(p.ids)) if hasattr(p, "ids") else next(it) for p in pieces]

    by_name = {c.name: c for c in torch_side.cases}
    capacity = max(len(c.ids) for c in torch_side.cases) + plan.decode_steps + 8
    ctx = Context(engine, capacity)
    for name, frames in plan.CASES:
        ref = by_name[name]
        ctx.reset()
        logits = ctx.prefill(to_chunks(plan.first_turn(frames), [frame_chunks[i] for i in frames]), ref.rows)
        report.cases.append(_compare(problems, ref, logits, ctx, tol, tag))
    # case 3, on the context of case 2: PyTorch's reply, teacher-forced (ONNX's own greedy choice must be the
    # same), then a new turn
    ref = by_name["turn on a cache + decode"]
    last = logits[-1]
    chosen = []
    for tok in ref.reply:
        chosen.append(int(np.argmax(last)))
        last = ctx.decode(tok)
    chosen.append(int(np.argmax(last)))
    expected = ref.reply + ([ref.stop] if ref.stop is not None else [])
    if chosen[:len(expected)] != expected:
        problems.append(f"{ref.name}{tag}: the reply's greedy tokens differ: onnx {chosen} vs torch {expected}")
    ctx.prefill([Chunk(ids=tuple(plan.reply_tail(ref.stop)))])
    turn2 = to_chunks(plan.second_turn(), [frame_chunks[0]])
    s = sum(c.num_tokens for c in turn2)
    logits = ctx.prefill(turn2, list(range(max(0, s - 8), s)))
    result = _compare(problems, ref, logits, ctx, tol, tag)
    cont, tok = [], int(np.argmax(logits[-1]))
    while tok not in plan.eos and len(cont) < plan.decode_steps:
        cont.append(tok)
        tok = int(np.argmax(ctx.decode(tok)))
    same = sum(a == b for a, b in zip(cont, ref.cont))
    result.greedy_agree = f"{same}/{max(len(cont), len(ref.cont))} tokens equal"
    if cont != ref.cont:
        problems.append(f"{ref.name}{tag}: greedy tokens differ: onnx {cont} vs torch {ref.cont}")
    report.cases.append(result)


def _compare(problems: list[str], ref: _TorchCase, logits: np.ndarray, ctx, tol: Tolerance,
             tag: str = "") -> CaseResult:
    name = ref.name + tag
    dl = float(np.abs(logits - ref.logits).max())
    dkv = max(float(np.abs(a - b).max()) for (k, v), (rk, rv) in zip(ctx.host_layers(), ref.kv)
              for a, b in ((k, rk), (v, rv)))
    scale = float(np.abs(ref.logits).max())
    limit = tol.logits_atol + tol.logits_rtol * scale
    if not np.isfinite(dl) or dl > limit:
        problems.append(f"{name}: max abs logit diff {dl:.3g} > {limit:.3g}")
    if not np.isfinite(dkv) or dkv > tol.kv_atol + tol.logits_rtol * scale:
        problems.append(f"{name}: max abs KV diff {dkv:.3g} > {tol.kv_atol:.3g}")
    return CaseResult(name, len(ref.ids), dl, dkv)


# ----------------------------------------------------------------------------------------------- one call


def validate_bundle(model, bundle_dir: str | Path, tol: Tolerance = Tolerance(), seed: int = 0,
                    decode_steps: int = 4, frame_sizes=((150, 200), (90, 120), (130, 100)),
                    low_memory: bool = False) -> ValidationReport:
    """Compare a finished bundle with a loaded float32 model (tests, re-validation). ``export`` itself gathers
    the PyTorch side graph by graph while it exports (see the module docstring)."""
    bundle_dir = Path(bundle_dir)
    manifest = Manifest.load(bundle_dir)
    side = TorchSide(Plan(manifest, bundle_dir / manifest.tokenizer, seed, frame_sizes, decode_steps))
    side.collect_vision(model)
    side.collect_text(model)
    return check_onnx(bundle_dir, side, tol, low_memory)
