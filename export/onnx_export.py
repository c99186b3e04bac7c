"""``edge-duet export``: a checkpoint directory becomes a validated ONNX bundle.

The bundle is written to a temporary directory beside the target and renamed into place only after it
validated, so a failed or interrupted export never leaves a half-written bundle that looks good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_duet import isolate
from edge_duet.bundle_io import staged_bundle
from edge_duet.errors import CheckpointError
from edge_duet.manifest import (
    EXTERNAL_DATA_OVER_BYTES as BIG_GRAPH, GRAPH_NAMES, SMALL_FILE_BYTES as SMALL_FILE, GraphSpec, Manifest,
    PreprocessSpec, TensorSpec, TextSpec, TokenSpec, VisionSpec, sha256_file,
)

from .checkpoint import CheckpointInfo, PartLoader, inspect_checkpoint


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18
    validate: bool = True
    overwrite: bool = False
    system_prompt: str | None = None
    max_context_tokens: int | None = None
    frame_interval_s: float | None = None
    frames_per_turn: int | None = None
    max_pixels: int | None = None  # per-frame pixel budget (None: MMDuet2's ~128 tokens for a settings-less checkpoint)
    name: str | None = None
    exporter: str = "auto"  # auto: TorchScript for small graphs, dynamo for graphs over ~1.5 GB; or "dynamo"
    quantize: str | None = None  # a quant recipe: the bundle written is the quantized one (see quant/quantize.py)
    isolate: bool | None = None  # each graph in a child process (None: when a graph's weights pass ~1.5 GB)
    memory_gb: float | None = None  # memory the export may use (None: what the machine has available now)
    fused_decoder: bool = True  # also write decoder_fused.onnx (ONNX Runtime's GQA over an in-place KV buffer)


@dataclass
class ExportReport:
    bundle_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_peak_gb: dict[str, float] = field(default_factory=dict)
    peak_rss_gb: float = 0.0
    validation: object | None = None
    quantization: object | None = None

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        return f"bundle {self.bundle_dir}: {stages}; peak memory {self.peak_rss_gb:.2f} GB (largest process)"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


def _rss_gb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 1024**3
    except OSError:
        return float("nan")


@contextlib.contextmanager
def _stage(report: ExportReport, name: str, log: Callable[[str], None]):
    log(f"[{name}] ...")
    t0 = time.perf_counter()
    yield
    report.stage_seconds[name] = time.perf_counter() - t0
    report.stage_peak_gb[name] = _peak_rss_gb()
    log(f"[{name}] done in {report.stage_seconds[name]:.1f} s (memory now {_rss_gb():.2f} GB, "
        f"peak so far {report.stage_peak_gb[name]:.2f} GB)")


def export_bundle(checkpoint_dir: str | Path, bundle_dir: str | Path, options: ExportOptions = ExportOptions(),
                  log: Callable[[str], None] = print) -> ExportReport:
    """Export, validate, and (with ``options.quantize``) quantize: the bundle at ``bundle_dir`` appears only
    when every step succeeded. With a recipe, the float32 bundle is a temporary directory removed at the end."""
    from edge_duet.bundle_io import prepare_target

    bundle_dir = Path(bundle_dir)
    info = inspect_checkpoint(checkpoint_dir)
    check_memory(info, options)
    if not options.quantize:
        return _export_fp32(info, bundle_dir, options, log)
    from edge_duet.quant.quantize import QuantOptions, Recipe, quantize_bundle

    recipe = Recipe.parse(options.quantize)  # a bad recipe fails before any work
    probe = prepare_target(bundle_dir, options.overwrite)  # the same checks quantize makes, before the long part
    shutil.rmtree(probe, ignore_errors=True)
    fp32_dir = bundle_dir.resolve().parent / f".{bundle_dir.name}.fp32-{os.getpid()}"
    try:
        report = _export_fp32(info, fp32_dir, dataclasses.replace(options, overwrite=True), log)
        with _stage(report, f"quantize {recipe}", log):
            report.quantization = quantize_bundle(fp32_dir, bundle_dir, recipe, QuantOptions(overwrite=options.overwrite),
                                                  log=log)
        log(report.quantization.summary())
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)
    report.bundle_dir = bundle_dir
    report.peak_rss_gb = max(_peak_rss_gb(), *report.stage_peak_gb.values())
    return report


def _export_fp32(info: CheckpointInfo, bundle_dir: Path, options: ExportOptions,
                 log: Callable[[str], None]) -> ExportReport:
    """Graph by graph: each part of the model is read in float32 only while its graph is exported (and its PyTorch
    reference computed), then released. A model whose graphs pass ~1.5 GB does each part in a child process, so
    every byte PyTorch and the exporter held goes back to the system before the next part; ONNX Runtime validates
    after PyTorch is gone."""
    from .validate import Plan, TorchSide, check_onnx

    report = ExportReport(bundle_dir=bundle_dir)
    with staged_bundle(bundle_dir, options.overwrite) as tmp:
        with _stage(report, "load", log):
            parts = PartLoader(info)  # the model with no weights yet: each part is read when its graph is made
        manifest = build_manifest(parts.model, info, options)
        shutil.copy(info.path / "tokenizer.json", tmp / "tokenizer.json")
        if (info.path / "chat_template.jinja").is_file():
            shutil.copy(info.path / "chat_template.jinja", tmp / "chat_template.jinja")
        in_children = (options.isolate if options.isolate is not None
                       else memory_plan(info).largest_graph_bytes > BIG_GRAPH)
        job = _PartJob(str(info.path), str(tmp), options.opset, options.exporter == "dynamo", manifest,
                       options.validate, stream=in_children)
        vision = None
        cases = None
        steps = (GRAPH_NAMES + (("decoder_fused",) if options.fused_decoder else ())
                 + (("reference",) if in_children and options.validate else ()))
        for part in steps:
            with _stage(report, part, log):
                if in_children:
                    spec, payload, child_peak = isolate.call(job.run, part, vision, what=f"exporting the {part} graph")
                    report.stage_peak_gb[f"{part} (child)"] = child_peak
                    log(f"[{part}] child process peak memory {child_peak:.2f} GB")
                else:
                    spec, payload, _ = job.run(part, vision, parts)
            if spec is not None:
                manifest.graphs[part] = spec
            if part == "vision":
                vision = payload
            elif payload is not None:
                cases = payload
        del parts
        _release_memory()
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.stat().st_size < SMALL_FILE}
        manifest = _replace(manifest, files=files)
        manifest.save(tmp)
        if options.validate:
            side = TorchSide(Plan(manifest, tmp / "tokenizer.json"), vision=vision, cases=cases)
            big = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file()) > 2 * BIG_GRAPH
            with _stage(report, "validate", log):
                report.validation = check_onnx(tmp, side, low_memory=big)
            log(report.validation.summary())
        report.peak_rss_gb = max(_peak_rss_gb(), *report.stage_peak_gb.values())  # this process or a child
        manifest = _replace(manifest, export_info={
            **manifest.export_info, "peak_rss_gb": round(report.peak_rss_gb, 2),
            "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()},
            "stage_peak_rss_gb": {k: round(v, 2) for k, v in report.stage_peak_gb.items()},
            "validated": bool(options.validate)})
        manifest.save(tmp)
    return report


@dataclass(frozen=True)
class _PartJob:
    """Export one part's graph and gather its PyTorch reference: in this process, or in a child (picklable)."""

    checkpoint: str
    out: str
    opset: int
    dynamo: bool
    manifest: Manifest
    validate: bool
    stream: bool = False  # the decoder's weights streamed into its graph; its reference is then its own part

    def run(self, part: str, vision: dict | None, parts: PartLoader | None = None):
        """(GraphSpec, reference payload, this process's peak RSS in GB). ``parts``: the loader to use (None: a
        fresh one, in a child process)."""
        import torch

        from .validate import Plan, TorchSide

        parts = parts or PartLoader(inspect_checkpoint(self.checkpoint))
        model, out = parts.model, Path(self.out)
        side = TorchSide(Plan(self.manifest, out / "tokenizer.json"), vision=dict(vision or {})) if self.validate else None
        payload = None
        with torch.no_grad(), _quiet_export():
            if part == "vision":
                parts.load("vision")
                spec = export_vision(model, out, self.opset, force_dynamo=self.dynamo)
                if side:
                    side.collect_vision(model)
                    payload = side.vision
                parts.release("vision")  # nothing later needs the vision tower
            elif part == "embed":
                parts.load("embed")
                spec = export_embed(model, out, self.opset, force_dynamo=self.dynamo)
            elif part == "decoder" and self.stream:  # weights read one at a time while they are written
                spec = export_decoder(model, out, self.opset, force_dynamo=True, weights=parts.read)
            elif part == "decoder_fused":  # the same weights as the plain decoder, written as fused ops
                from .fused import export_fused_decoder

                lm = parts.model.model.language_model
                if not self.stream and lm.embed_tokens.weight.is_meta:
                    parts.load("embed")  # the head's weight when tied
                if not self.stream and lm.norm.weight.is_meta:
                    parts.load("text")
                spec = export_fused_decoder(model, out, weights=parts.read if self.stream else None)
            elif part == "decoder" or part == "reference":
                if parts.model.model.language_model.embed_tokens.weight.is_meta:
                    parts.load("embed")  # the head's weight when tied, and the reference's embedding
                parts.load("text")
                spec = None
                if part == "decoder":
                    spec = export_decoder(model, out, self.opset, force_dynamo=self.dynamo)
                    _release_memory()
                if side and (part == "reference" or not self.stream):
                    side.collect_text(model)
                    payload = side.cases
            else:
                raise ValueError(f"unknown part {part!r}")
        _release_memory()
        return spec, payload, _peak_rss_gb()


# ----------------------------------------------------------------------------------------------- memory


def _release_memory() -> None:
    """Collect, then hand freed heap back to the OS: glibc keeps freed medium-sized blocks (a layer's weights)
    in its arenas, which would otherwise still count against the next stage."""
    import ctypes

    import torch

    torch._dynamo.reset()  # the dynamo exporter's caches hold the traced module (and so its weights)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass(frozen=True)
class MemoryPlan:
    """What an export of a checkpoint needs, from its safetensors headers (no weights read)."""

    params: dict[str, int]  # vision / embed / lm_head / decoder (the layers) -> parameter count
    checkpoint_bytes: int
    tied: bool

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    @property
    def largest_graph_bytes(self) -> int:
        p = self.params
        return 4 * max(p["vision"], p["embed"], p["decoder"] + (p["embed"] if self.tied else p["lm_head"]))

    def need_gb(self, validate: bool) -> float:
        """Estimated peak of the largest step (each runs alone, in its own process; measured at 3B in docs/3b.md):
        the vision graph (its weights in float32), the embedding table (the TorchScript exporter holds ~4 copies),
        the decoder (streamed: about one weight at a time), and when validating the PyTorch reference (the language
        model in float32) and ONNX Runtime holding the decoder and embedding graphs. Plus a fixed 1.6 GB: libraries, the
        tracer and ONNX Runtime's arenas (measured 0.6 GB above the graph's bytes at 3B, up to 1.41 GB at the 0.5B
        `perf` shape on CI's machine, where 1.2 GB proved optimistic)."""
        p, f32, gb = self.params, 4, 1024**3
        head = p["embed"] if self.tied else p["lm_head"]
        steps = [p["vision"] * f32, 4 * p["embed"] * f32, 2 * max(p["embed"], head) * f32]
        if validate:
            steps += [(p["embed"] + p["lm_head"] + p["decoder"]) * f32, (p["decoder"] + p["embed"] + head) * f32]
        return max(steps) / gb * 1.05 + 1.6

def memory_plan(info: CheckpointInfo) -> MemoryPlan:
    params = {"vision": 0, "embed": 0, "lm_head": 0, "decoder": 0}
    total = 0
    for f in info.weight_files:
        for key, (numel, nbytes) in _safetensors_sizes(f).items():
            total += nbytes
            part = ("vision" if "visual" in key else "embed" if "embed_tokens" in key
                    else "lm_head" if "lm_head" in key else "decoder")
            params[part] += numel
    tied = bool(info.config.get("tie_word_embeddings", (info.config.get("text_config") or {}).get(
        "tie_word_embeddings", False)))
    return MemoryPlan(params=params, checkpoint_bytes=total, tied=tied or params["lm_head"] == 0)


def _safetensors_sizes(path: Path) -> dict[str, tuple[int, int]]:
    import json
    import math
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (math.prod(v["shape"]), v["data_offsets"][1] - v["data_offsets"][0])
            for k, v in header.items() if k != "__metadata__"}


def available_memory_gb() -> float:
    """MemAvailable, or the cgroup's limit minus its use where that is smaller."""
    avail = float("inf")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            avail = min(avail, (int(limit) - used) / 1024**3)
    except (OSError, ValueError):
        pass
    return avail


def check_memory(info: CheckpointInfo, options: ExportOptions) -> MemoryPlan:
    """Refuse, before any work, an export that cannot fit: say what it needs and what to try."""
    plan = memory_plan(info)
    have = options.memory_gb if options.memory_gb is not None else available_memory_gb()
    need = plan.need_gb(options.validate)
    if need <= have:
        return plan
    bparams = plan.total_params / 1e9
    lm_gb = (plan.params["decoder"] + plan.params["embed"] + plan.params["lm_head"]) * 4 / 1024**3
    hint = []
    if options.validate and plan.need_gb(False) <= have:
        hint.append(f"--no-validate (needs about {plan.need_gb(False):.1f} GB, but skips the check against PyTorch)")
    hint.append(f"a machine with at least {need:.0f} GB free; close other programs using memory")
    raise CheckpointError(
        f"exporting {info.path} ({bparams:.2f} B parameters) needs about {need:.1f} GB of memory: its language model "
        f"alone is {lm_gb:.1f} GB in float32, which the ONNX graphs are exported in; this machine has {have:.1f} GB "
        f"available. Try: {'; or '.join(hint)}. A quantized bundle (`ExportOptions.quantize` cpu or jetson) is small, but it is "
        "made from the float32 export, so it needs the same memory to make (see docs/3b.md)"
    )


def _replace(manifest: Manifest, **kw) -> Manifest:
    import dataclasses

    return dataclasses.replace(manifest, **kw)


@contextlib.contextmanager
def _quiet_export():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------------------------- manifest


def build_manifest(model, info: CheckpointInfo, options: ExportOptions) -> Manifest:
    import onnx
    import torch
    import transformers
    from tokenizers import Tokenizer

    import edge_duet

    tc = model.config.text_config
    vc = model.config.vision_config
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    text = TextSpec(
        hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers, num_attention_heads=tc.num_attention_heads,
        num_kv_heads=tc.num_key_value_heads, head_dim=head_dim, vocab_size=tc.vocab_size,
        mrope_section=tuple(tc.rope_parameters["mrope_section"]), rope_theta=float(tc.rope_parameters["rope_theta"]),
        max_position_embeddings=tc.max_position_embeddings,
    )
    vision = VisionSpec(
        depth=vc.depth, hidden_size=vc.hidden_size, num_heads=vc.num_heads, out_hidden_size=vc.out_hidden_size,
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, fullatt_block_indexes=tuple(vc.fullatt_block_indexes), in_channels=vc.in_channels,
    )
    preprocess = PreprocessSpec.from_preprocessor_config(info.preprocessor, vc.patch_size, vc.spatial_merge_size,
                                                         vc.temporal_patch_size)
    tok = Tokenizer.from_file(str(info.path / "tokenizer.json"))

    tokens = TokenSpec.from_tokenizer(tok.token_to_id, lambda t: CheckpointError(
        f"tokenizer.json of {info.path} lacks the special token {t}"))
    prompt, max_pixels, sources = info.proactive.resolve(preprocess.max_pixels, {
        "system_prompt": options.system_prompt, "frame_interval_s": options.frame_interval_s,
        "frames_per_turn": options.frames_per_turn, "max_context_tokens": options.max_context_tokens,
        "max_pixels": options.max_pixels})
    stock_max_pixels = preprocess.max_pixels
    if max_pixels < preprocess.min_pixels:
        raise CheckpointError(f"a per-frame budget of {max_pixels} pixels is below the checkpoint's minimum "
                              f"({preprocess.min_pixels}); pass a larger `max_pixels`")
    preprocess = dataclasses.replace(preprocess, max_pixels=max_pixels)
    return Manifest(
        name=options.name or info.path.name, text=text, vision=vision, preprocess=preprocess, tokens=tokens,
        prompt=prompt, graphs={}, protocol_sources=sources, family=info.family,
        export_info={
            "checkpoint_max_pixels": stock_max_pixels,
            "checkpoint": str(info.path), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "edge_duet": edge_duet.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "opset": options.opset,
        },
    )


# ----------------------------------------------------------------------------------------------- graphs


# BIG_GRAPH (edge_duet.manifest.EXTERNAL_DATA_OVER_BYTES): graphs whose weights pass it take the memory-frugal exporter


def _torch_export(graph, args, path: Path, input_names, output_names, dynamic_axes: dict, arg_groups=None,
                  opset: int = 18, force_dynamo: bool = False, weights=None) -> tuple[str, ...]:
    """Export ``graph`` to ``path``; returns the external-data files written beside it.

    Small graphs go through the TorchScript exporter (fast, one self-contained file). Graphs over ~1.5 GB go
    through the dynamo exporter, whose ONNX model references the torch weights instead of copying them and
    streams them into one ``<name>.data`` file: the TorchScript route would hold a second copy of every weight
    in memory, which does not fit a 24 GB machine for the 3B decoder. (Batch is then fixed to 1, which is all
    the runtime uses.) ``arg_groups`` tells how ``args`` map to the forward's parameters when it takes
    ``*varargs`` (their count as one tuple entry for dynamo).

    ``weights`` streams the weights: ``graph``'s parameters are on the meta device (no memory), it is traced
    on meta inputs, and each initializer is read by ``weights(parameter)`` (a float32 numpy array) only while it
    is written to ``<name>.data``, so exporting the 3B decoder holds one weight at a time instead of 12.4 GB.
    Such a graph is saved without onnxscript's optimizer, which reads every weight (ONNX Runtime optimizes the
    graph when it loads it).
    """
    import torch

    if weights is not None:
        return _streamed_export(graph, args, path, input_names, output_names, dynamic_axes, arg_groups, opset,
                                weights)
    big = force_dynamo or _param_bytes(graph) > BIG_GRAPH
    if not big:
        torch.onnx.export(graph, args, str(path), input_names=input_names, output_names=output_names,
                          opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes)
        return ()
    from torch.export import Dim

    def spec(name):
        return {ax: Dim.DYNAMIC for ax, label in dynamic_axes.get(name, {}).items() if label != "batch"}

    specs = [spec(n) for n in input_names]
    if arg_groups:  # e.g. (4, None): four named parameters, then the rest as one *varargs tuple
        fixed = arg_groups[0]
        specs = specs[:fixed] + [tuple(specs[fixed:])]
    torch.onnx.export(graph, args, str(path), input_names=input_names, output_names=output_names,
                      opset_version=opset, dynamo=True, dynamic_shapes=tuple(specs), external_data=True,
                      optimize=True, verbose=False)
    return tuple(sorted(p.name for p in path.parent.glob(path.name + ".data")))


def _dynamic_specs(input_names, dynamic_axes, arg_groups):
    from torch.export import Dim

    def spec(name):
        return {ax: Dim.DYNAMIC for ax, label in dynamic_axes.get(name, {}).items() if label != "batch"}

    specs = [spec(n) for n in input_names]
    if arg_groups:
        fixed = arg_groups[0]
        specs = specs[:fixed] + [tuple(specs[fixed:])]
    return tuple(specs)


def _streamed_export(graph, args, path: Path, input_names, output_names, dynamic_axes, arg_groups, opset,
                     weights) -> tuple[str, ...]:
    import numpy as np
    import onnx_ir as ir
    import torch

    buffers = {name: b.detach().cpu().numpy().copy() for name, b in graph.named_buffers()}  # computed, not weights
    params = dict(graph.named_parameters(remove_duplicate=False))
    graph.to("meta")
    meta_args = tuple(a.to("meta") for a in args)
    program = torch.onnx.export(graph, meta_args, None, input_names=input_names, output_names=output_names,
                                opset_version=opset, dynamo=True, optimize=False, verbose=False,
                                dynamic_shapes=_dynamic_specs(input_names, dynamic_axes, arg_groups))

    transposed = _fold_weight_transposes(program.model.graph, set(params))

    def reader(param, transpose):
        def read():
            w = weights(param)
            return ir.Tensor(np.ascontiguousarray(w.T if transpose else w, dtype=np.float32))
        return read

    for name, value in program.model.graph.initializers.items():
        if name in buffers:
            value.const_value = ir.Tensor(buffers[name], name=name)
        elif name in params:
            value.const_value = ir.LazyTensor(reader(params[name], name in transposed), dtype=ir.DataType.FLOAT,
                                              shape=ir.Shape(list(value.shape)), name=name)
        else:
            raise RuntimeError(f"exported graph has an initializer {name!r} that is no parameter or buffer of it")
    program.save(str(path), external_data=True)
    return tuple(sorted(p.name for p in path.parent.glob(path.name + ".data")))


def _fold_weight_transposes(graph, weights: set[str]) -> set[str]:
    """``MatMul(x, Transpose(W))`` -> ``MatMul(x, W')`` with W' = W transposed, stored: what onnxscript's constant
    folding does to every linear layer, done here without reading W (the streamed export reads it transposed when
    it writes it). Quantizers need it: they take MatMuls whose B is an initializer. Returns the weights it turned."""
    out = set()
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx") or not node.inputs:
            continue
        w = node.inputs[0]
        if w is None or w.name not in weights or w.name not in graph.initializers or len(w.uses()) != 1:
            continue
        perm = node.attributes.get("perm")
        if w.shape is None or len(w.shape) != 2 or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        w.shape = type(w.shape)([w.shape[1], w.shape[0]])
        node.outputs[0].replace_all_uses_with(w)
        graph.remove(node, safe=True)
        out.add(w.name)
    return out


def _param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


def _spec(names_shapes, dtype) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(n, dtype if isinstance(dtype, str) else dtype[n], tuple(s)) for n, s in names_shapes)


def export_vision(model, out: Path, opset: int, force_dynamo: bool = False) -> GraphSpec:
    import numpy as np
    import torch

    from edge_duet.runtime.vision_index import vision_inputs

    from .graphs import VisionGraph

    vc = model.config.vision_config
    graph = VisionGraph(model.model.visual).eval()
    ps, tps = vc.patch_size, vc.temporal_patch_size
    dim = vc.in_channels * tps * ps * ps
    grids = [(1, 8, 12), (1, 4, 4)]  # two frames of different sizes: exercises every dynamic axis
    n = sum(t * h * w for t, h, w in grids)
    spec = _vision_spec(model)
    feeds = vision_inputs(np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32), grids, spec)
    names = ["pixel_values", "rotary_pos_ids", "full_segment_ids", "window_segment_ids", "reverse_index"]
    path = out / "vision.onnx"
    ext = _torch_export(
        graph, tuple(torch.from_numpy(feeds[k]) for k in names), path, names, ["image_embeds"],
        {"pixel_values": {0: "num_patches"}, "rotary_pos_ids": {0: "num_patches"},
         "full_segment_ids": {0: "num_patches"}, "window_segment_ids": {0: "num_patches"},
         "reverse_index": {0: "num_tokens"}, "image_embeds": {0: "num_tokens"}}, opset=opset, force_dynamo=force_dynamo)
    return GraphSpec(
        path=path.name, external_data=ext,
        inputs=(TensorSpec("pixel_values", "float32", ("num_patches", dim)),
                TensorSpec("rotary_pos_ids", "int64", ("num_patches", 2)),
                TensorSpec("full_segment_ids", "int64", ("num_patches",)),
                TensorSpec("window_segment_ids", "int64", ("num_patches",)),
                TensorSpec("reverse_index", "int64", ("num_tokens",))),
        outputs=(TensorSpec("image_embeds", "float32", ("num_tokens", vc.out_hidden_size)),),
    )


def _vision_spec(model) -> VisionSpec:
    vc = model.config.vision_config
    return VisionSpec(
        depth=vc.depth, hidden_size=vc.hidden_size, num_heads=vc.num_heads, out_hidden_size=vc.out_hidden_size,
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        window_size=vc.window_size, fullatt_block_indexes=tuple(vc.fullatt_block_indexes), in_channels=vc.in_channels,
    )


def export_embed(model, out: Path, opset: int, force_dynamo: bool = False) -> GraphSpec:
    import torch

    from .graphs import EmbedGraph

    emb = model.model.language_model.embed_tokens
    graph = EmbedGraph(emb).eval()
    path = out / "embed.onnx"
    ext = _torch_export(
        graph, (torch.zeros(1, 3, dtype=torch.long),), path, ["input_ids"], ["inputs_embeds"],
        {"input_ids": {0: "batch", 1: "seq"}, "inputs_embeds": {0: "batch", 1: "seq"}}, opset=opset,
        force_dynamo=force_dynamo)
    return GraphSpec(
        path=path.name, external_data=ext,
        inputs=(TensorSpec("input_ids", "int64", ("batch", "seq")),),
        outputs=(TensorSpec("inputs_embeds", "float32", ("batch", "seq", emb.embedding_dim)),),
    )


def export_decoder(model, out: Path, opset: int, force_dynamo: bool = False, weights=None) -> GraphSpec:
    import torch

    from .graphs import DecoderGraph

    tc = model.config.text_config
    graph = DecoderGraph(model).eval()
    n_layers, kvh, hd = tc.num_hidden_layers, tc.num_key_value_heads, graph.head_dim
    s, p = 5, 3
    past_names = [f"past.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    args = (
        torch.randn(1, s, tc.hidden_size),
        torch.arange(p, p + s).view(1, 1, s).expand(3, 1, s).contiguous(),
        torch.ones(1, p + s, dtype=torch.long),
        torch.tensor([s - 2, s - 1]),
        *[torch.randn(1, kvh, p, hd) for _ in past_names],
    )
    dyn = {"inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": {1: "batch", 2: "seq"},
           "attention_mask": {0: "batch", 1: "total"}, "logits_index": {0: "num_logits"},
           "logits": {0: "batch", 1: "num_logits"}}
    dyn.update({n: {0: "batch", 2: "past"} for n in past_names})
    dyn.update({n: {0: "batch", 2: "total"} for n in present_names})
    path = out / "decoder.onnx"
    ext = _torch_export(
        graph, args, path, ["inputs_embeds", "position_ids", "attention_mask", "logits_index", *past_names],
        ["logits", *present_names], dyn, arg_groups=(4, None), opset=opset, force_dynamo=force_dynamo,
        weights=weights)
    kv_shape = ("batch", kvh, "past", hd)
    return GraphSpec(
        path=path.name, external_data=ext,
        inputs=(TensorSpec("inputs_embeds", "float32", ("batch", "seq", tc.hidden_size)),
                TensorSpec("position_ids", "int64", (3, "batch", "seq")),
                TensorSpec("attention_mask", "int64", ("batch", "total")),
                TensorSpec("logits_index", "int64", ("num_logits",)),
                *[TensorSpec(n, "float32", kv_shape) for n in past_names]),
        outputs=(TensorSpec("logits", "float32", ("batch", "num_logits", tc.vocab_size)),
                 *[TensorSpec(n, "float32", ("batch", kvh, "total", hd)) for n in present_names]),
    )
