"""``edge-duet quantize``: a bundle becomes a new bundle whose graphs store their weights at lower precision.

A recipe gives each graph one precision (``vision=fp16,embed=int8,decoder=int4,lm_head=w8``; a bare name is a
preset, see ``recipes.PRESETS``). What each precision does to a graph (see docs/quantization.md for the measured effect):

    fp32       untouched
    fp16       weights and arithmetic in float16; graph inputs/outputs stay float32 (a Cast at each boundary),
               so the runtime and the KV cache it keeps are unchanged
    int8       dynamic quantization: int8 weights (per tensor, or per channel), activations quantized at run
               time (DynamicQuantizeLinear + MatMulInteger; the embedding table: int8 Gather + DequantizeLinear).
               Fast on CPUs with VNNI / ARM dot-product; a CPU recipe
    w8         weight-only int8, block-wise (MatMulNBits bits=8); activations stay float. A GPU recipe
    int4       weight-only int4, block-wise (MatMulNBits bits=4; the embedding table: GatherBlockQuantized)
    w8-fp16,   the graph goes to float16 first, then its weights to w8 / int4: float16 activations with
    int4-fp16  block-quantized weights, the usual GPU layout
    int4-qdq   int4 weights as standard ONNX (blocked DequantizeLinear -> MatMul, opset 21) instead of the
               MatMulNBits contrib op: what TensorRT 10 builds weight-only int4 engines from (vision/decoder only)

``lm_head`` (the decoder's vocabulary projection, found by its weight shape) defaults to the decoder's
precision; ``lm_head=fp32`` / ``fp16`` keeps it unquantized (in the decoder's float type), ``int8`` / ``w8`` /
``int4`` gives it its own quantizer. The embedding table is its own graph (``embed=``).

Every quantizer is checked for what it actually changed: the weight-carrying ops (MatMul / Gemm with a constant
weight, Gather from a constant table) whose weights are no longer float32 are counted per graph. A graph asked
to change that changed nothing is an error (ONNX Runtime's 4-bit quantizer skips ``Gemm``, which the exporters
emit for 2-D linear layers: every Gemm with a constant weight is rewritten to MatMul + Add first).

The new bundle is written to a temporary directory beside the target and renamed into place once every graph
loads in ONNX Runtime, like ``edge-duet export``. Its manifest records the recipe (``variant``), each graph's
precision and quantized-op count, file checksums, and a ``provenance`` entry (recipe, options, source bundle
and its checksums, what changed, logits agreement with the source on a probe turn).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edge_duet.bundle_io import staged_bundle
from edge_duet.errors import BundleError, UsageError, ValidationError
from edge_duet.manifest import EXTERNAL_DATA_OVER_BYTES as EXTERNAL_DATA_OVER
from edge_duet.manifest import GRAPH_NAMES as GRAPHS
from edge_duet.manifest import DECODER_FLAVOURS, MANIFEST_NAME, Manifest, sha256_file
from edge_duet.manifest import SMALL_FILE_BYTES as SMALL_FILE

from .graph_ops import find_lm_head, gemm_to_matmul, graph_bytes, name_nodes, weight_ops
from .lazy import load_lazy
from .recipes import Recipe, activation_type, is_qdq, weight_format

@dataclass(frozen=True)
class QuantOptions:
    block_size: int = 32  # MatMulNBits / GatherBlockQuantized block (16, 32, 64, 128, 256)
    accuracy_level: int = 4  # MatMulNBits compute type on CPU: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8
    symmetric: bool = True  # block quantization without zero points
    per_channel: bool = False  # int8: one scale per output channel instead of per tensor
    overwrite: bool = False
    check: bool = True  # run a probe turn through the source and the new bundle, record the logits agreement

    def validate(self) -> None:
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise UsageError(f"`QuantOptions.block_size` must be a power of two >= 16, got {self.block_size}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"`QuantOptions.accuracy_level` must be 0-4, got {self.accuracy_level}")


# ----------------------------------------------------------------------------------------------- reports


@dataclass
class GraphResult:
    name: str
    precision: str
    weight_ops: int  # ops carrying a constant weight (MatMul/Gemm weight, Gather table)
    quantized_ops: int  # of those, how many no longer store float32 weights
    left_fp32: list[str] = field(default_factory=list)  # weight ops still float32 (excluded or skipped)
    rewritten_gemm: int = 0
    size_bytes: int = 0
    source_size_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class QuantReport:
    bundle_dir: Path
    recipe: Recipe
    graphs: dict[str, GraphResult] = field(default_factory=dict)
    check: dict[str, float] | None = None

    def summary(self) -> str:
        lines = [f"bundle {self.bundle_dir} (recipe {self.recipe}):"]
        for g in self.graphs.values():
            left = f", fp32 left: {', '.join(g.left_fp32)}" if g.left_fp32 else ""
            lines.append(f"  {g.name:<8} {g.precision:<22} {g.quantized_ops:>4}/{g.weight_ops:<4} weight ops changed  "
                         f"{g.source_size_bytes / 2**20:8.2f} -> {g.size_bytes / 2**20:8.2f} MiB  {g.seconds:5.1f} s{left}")
        if self.check:
            lines.append(f"  probe turn vs source: logits cosine {self.check['logits_cosine']:.4f}, "
                         f"max |dlogit| {self.check['max_abs_diff']:.3g}, same argmax {self.check['argmax_agree']:.0%}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- quantizers


def _quiet():
    """ONNX Runtime's quantizers log every node at INFO on the root logger."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)

    return cm()


def _to_fp16(model, keep_fp32: list[str]):
    from .lazy import to_fp16

    # keep_io_types: graph inputs/outputs stay float32, so the runtime, its KV cache and the manifest's
    # tensor specs are the same for every recipe. Weights still on disk are converted one at a time.
    return to_fp16(model, keep_fp32)


def _dynamic_int8(model, nodes_to_quantize: list[str] | None, nodes_to_exclude: list[str], per_channel: bool,
                  work: Path):
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .lazy import materialize

    materialize(model)
    src, dst = work / "in.onnx", work / "out.onnx"
    big = graph_bytes(model) > EXTERNAL_DATA_OVER
    _save_model(model, src, external=big)
    quantize_dynamic(src, dst, op_types_to_quantize=["MatMul", "Gather"], per_channel=per_channel,
                     weight_type=QuantType.QInt8, nodes_to_quantize=nodes_to_quantize,
                     nodes_to_exclude=nodes_to_exclude or None, use_external_data_format=big,
                     extra_options={"MatMulConstBOnly": True})
    out = onnx.load(str(dst))
    for p in work.iterdir():
        p.unlink()
    return out


def _block_quant(model, bits: int, options: QuantOptions, nodes_to_include: list[str] | None,
                 nodes_to_exclude: list[str], gather: bool, qdq: bool = False):
    import numpy as np
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from .lazy import materialize

    if gather:  # the Gather path reads its table whole; MatMul weights are read lazily, one at a time
        materialize(model)
    q = MatMulNBitsQuantizer(
        model, bits=bits, block_size=options.block_size, is_symmetric=options.symmetric,
        accuracy_level=options.accuracy_level, nodes_to_exclude=nodes_to_exclude, nodes_to_include=nodes_to_include,
        op_types_to_quantize=("MatMul", "Gather") if gather else ("MatMul",),
        quant_axes=(("MatMul", 0), ("Gather", 1)), quant_format=QuantFormat.QDQ if qdq else QuantFormat.QOperator,
    )
    with np.errstate(divide="ignore", invalid="ignore"):  # all-zero padding blocks: scale 0, handled by the quantizer
        q.process()
    return q.model.model


def quantize_graph(model, graph: str, precision: str, lm_head: str | None, options: QuantOptions,
                   work: Path, vocab_size: int = 0, hidden_size: int = 0):
    """Apply ``precision`` to one graph (a ModelProto); returns (new model, GraphResult without sizes)."""
    t0 = time.perf_counter()
    fmt, act = weight_format(precision), activation_type(precision)
    if is_qdq(precision) and graph == "embed":
        raise UsageError("embed=int4-qdq: ONNX Runtime's Q/DQ quantizer has no Gather; use embed=fp32 (TensorRT "
                         "then stores the table in fp16) or embed=int4 for the CUDA provider")
    if precision == "fp32":
        ops = weight_ops(model)
        return model, GraphResult(graph, precision, len(ops), 0, [w.node for w in ops if w.dtype == "fp32"])
    name_nodes(model)
    rewritten = gemm_to_matmul(model)
    before = weight_ops(model)
    head = find_lm_head(model, vocab_size, hidden_size) if graph == "decoder" and lm_head else None
    if graph == "decoder" and lm_head and head is None:
        raise BundleError(f"decoder graph: no weight op of shape ({hidden_size}, {vocab_size}) to take "
                          f"lm_head={lm_head}; leave lm_head out of the recipe")
    head_is_float = lm_head in ("fp32", "fp16")
    head_separate = head is not None and lm_head != fmt
    keep_head = [head] if head_separate else []
    with _quiet():
        if act == "fp16":
            model = _to_fp16(model, keep_fp32=[head] if head is not None and lm_head == "fp32" else [])
        if fmt == "int8":
            model = _dynamic_int8(model, None, keep_head, options.per_channel, work)
        elif fmt in ("w8", "int4"):
            if graph == "embed" and fmt == "w8":  # the 8-bit block quantizer has no Gather: int8 table + DQ
                model = _dynamic_int8(model, None, [], False, work)
            else:
                model = _block_quant(model, 8 if fmt == "w8" else 4, options, None, keep_head,
                                     gather=graph == "embed", qdq=is_qdq(precision))
        if head_separate and not head_is_float:
            if lm_head == "int8":
                model = _dynamic_int8(model, [head], [], options.per_channel, work)
            else:
                model = _block_quant(model, 8 if lm_head == "w8" else 4, options, [head], [], gather=False)
    after = weight_ops(model)
    left = [w.node for w in after if w.dtype == "fp32"]
    n_before = sum(w.dtype == "fp32" for w in before)
    label = f"{precision};lm_head={lm_head}" if head_separate else precision
    result = GraphResult(graph, label, len(before), n_before - len(left), left, rewritten,
                         seconds=time.perf_counter() - t0)
    return model, result


FUSED = DECODER_FLAVOURS["fused"]


def _role(graph: str) -> str:
    """The recipe part a graph takes its precision from (the fused decoder: the decoder's)."""
    return "decoder" if graph == FUSED else graph


def _fused_left_out(recipe: Recipe) -> str | None:
    """Why the fused decoder cannot take the decoder's precision (None: it can). Its ops take weight-only int4/w8
    (MatMulNBits) and dynamic int8; a float16 or Q/DQ decoder is for GPU providers, which run the plain decoder,
    so the bundle then has only the plain flavour."""
    precision = recipe.graph_precision("decoder")
    if activation_type(precision) == "fp16" or is_qdq(precision) or recipe.head == "fp16":
        return (f"decoder={precision} (lm_head={recipe.head}) is for GPU providers, which run the plain decoder; "
                "this bundle has only the plain flavour")
    return None


def check_changed(results: dict[str, GraphResult], recipe: Recipe) -> None:
    """One error naming every graph that was asked to change and did not (or only partly, unasked)."""
    problems = []
    for name, r in results.items():
        if r.precision == "fp32":
            continue
        if r.quantized_ops == 0:
            problems.append(f"{name}: asked for {r.precision}, but none of its {r.weight_ops} weight ops changed "
                            "(no eligible MatMul/Gemm/Gather with a constant weight, or the quantizer skipped them)")
            continue
        expected_left = 1 if _role(name) == "decoder" and recipe.lm_head == "fp32" else 0
        if len(r.left_fp32) > expected_left:
            problems.append(f"{name}: asked for {r.precision}, but {len(r.left_fp32)} weight ops kept float32 "
                            f"weights: {', '.join(r.left_fp32[:8])}")
    if problems:
        raise ValidationError("the quantizers did not do what the recipe asked:", problems)


# ----------------------------------------------------------------------------------------------- bundles


def _save_model(model, path: Path, external: bool | None = None) -> tuple[str, ...]:
    """Save a graph; over ~1.5 GB of weights, into ``<name>.data`` beside it. Returns the external files."""
    import onnx

    from .lazy import materialize

    materialize(model)  # weights a lazy step left on disk (in the source bundle) come along
    external = graph_bytes(model) > EXTERNAL_DATA_OVER if external is None else external
    if not external:
        onnx.save_model(model, str(path))
        return ()
    data = path.name + ".data"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                    size_threshold=1024)
    return (data,)


def _dir_bytes(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def quantize_bundle(source: str | Path, out: str | Path, recipe: Recipe | str,
                    options: QuantOptions = QuantOptions(), log: Callable[[str], None] = print) -> QuantReport:
    """Write a quantized copy of bundle ``source`` to ``out`` (atomic: a temp dir renamed into place)."""
    from edge_duet.errors import require

    onnx = require("onnx", "quant", "edge-duet quantize")
    require("onnx_ir", "quant", "edge-duet quantize (ONNX Runtime's block quantizer)")
    import onnxruntime as ort

    import edge_duet

    source, out = Path(source), Path(out)
    recipe = Recipe.parse(recipe) if isinstance(recipe, str) else recipe
    recipe.check()
    options.validate()
    manifest = Manifest.load(source)
    manifest.check_files(source)
    if source.resolve() == out.resolve():
        raise UsageError("the output bundle must be a new directory, not the source bundle")
    for g in GRAPHS:
        src_p = manifest.graphs[g].precision
        if src_p != "fp32" and src_p != recipe.precision_label(g):
            raise UsageError(f"{source} has {g} at {src_p}: quantize from the fp32 bundle (the one `edge-duet "
                             "export` wrote), not from an already quantized one")
    report = QuantReport(out, recipe)
    with staged_bundle(out, options.overwrite) as tmp:
        work = tmp / ".work"
        work.mkdir()
        graph_files = {p for g in manifest.graphs.values() for p in (g.path, *g.external_data)}
        for p in sorted(source.iterdir()):
            if p.is_file() and p.name not in graph_files and p.name != MANIFEST_NAME:
                shutil.copy2(p, tmp / p.name)
        graphs = dict(manifest.graphs)
        for name in (*GRAPHS, *([FUSED] if FUSED in manifest.graphs else [])):
            role = _role(name)  # the fused decoder takes the decoder's precision
            if name == FUSED and (why := _fused_left_out(recipe)):
                del graphs[FUSED]
                log(f"[{FUSED}] left out: {why}")
                continue
            spec = manifest.graphs[name]
            precision = recipe.graph_precision(role)
            src_path = source / spec.path
            src_bytes = _dir_bytes([src_path, *(source / d for d in spec.external_data)])
            if precision == "fp32" or spec.precision == recipe.precision_label(role):
                for rel in (spec.path, *spec.external_data):
                    shutil.copy2(source / rel, tmp / rel)
                ops = weight_ops(onnx.load(str(src_path), load_external_data=False))
                report.graphs[name] = GraphResult(name, spec.precision, len(ops), spec.quantized_ops,
                                                  size_bytes=src_bytes, source_size_bytes=src_bytes)
                continue
            log(f"[{name}] {precision} ...")
            model = load_lazy(src_path)  # weights stay on disk until a quantizer reads them, one at a time
            model, result = quantize_graph(model, role, precision, recipe.lm_head if role == "decoder" else None,
                                           options, work, manifest.text.vocab_size, manifest.text.hidden_size)
            ext = _save_model(model, tmp / spec.path)
            del model
            result.name = name
            result.size_bytes = _dir_bytes([tmp / spec.path, *(tmp / d for d in ext)])
            result.source_size_bytes = src_bytes
            report.graphs[name] = result
            graphs[name] = dataclasses.replace(spec, external_data=ext, precision=recipe.precision_label(role),
                                               quantized_ops=result.quantized_ops)
            log(f"[{name}] {result.quantized_ops}/{result.weight_ops} weight ops changed in {result.seconds:.1f} s")
        check_changed(report.graphs, recipe)
        shutil.rmtree(work)
        for name in (*GRAPHS, *([FUSED] if FUSED in graphs else [])):  # every graph must load before publishing
            try:
                ort.InferenceSession(str(tmp / graphs[name].path), providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises untyped errors
                raise ValidationError(f"the {recipe.graph_precision(_role(name))} {name} graph does not load in ONNX "
                                      f"Runtime {ort.__version__}: {exc}") from exc
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())
                 if p.is_file() and p.stat().st_size < SMALL_FILE and p.name != MANIFEST_NAME}
        entry = {
            "step": "quantize",
            "recipe": str(recipe),
            "recipe_parts": {**{g: recipe.graph_precision(g) for g in GRAPHS}, "lm_head": recipe.head},
            "options": {k: v for k, v in dataclasses.asdict(options).items() if k not in ("overwrite", "check")},
            "source": {"bundle": str(source.resolve()), "name": manifest.name, "variant": manifest.variant,
                       "files": {manifest.graphs[g].path: manifest.files.get(manifest.graphs[g].path) for g in GRAPHS}},
            "graphs": {k: v.to_dict() for k, v in report.graphs.items()},
            "tools": {"edge_duet": edge_duet.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        new = dataclasses.replace(manifest, graphs=graphs, variant=str(recipe), files=files,
                                  provenance=(*manifest.provenance, entry))
        new.save(tmp)
        if options.check:
            from .compare import probe_agreement

            report.check = probe_agreement(source, tmp)
            entry["check"] = report.check
            new = dataclasses.replace(new, provenance=(*manifest.provenance, entry))
            new.save(tmp)
    return report


def estimate_weight_bytes(params: int, precision: str, block_size: int = 32, symmetric: bool = True) -> float:
    """Bytes on disk of ``params`` weights at ``precision`` (block scales included; per-tensor int8 scales and
    graph overhead ignored). Scales take the activation type: float32 unless the precision ends in -fp16."""
    fmt, act = weight_format(precision), activation_type(precision)
    scale = 2 if act == "fp16" else 4
    if fmt == "fp32":
        return params * 4.0
    if fmt == "fp16":
        return params * 2.0
    if fmt == "int8":
        return params * 1.0
    bits = 8 if fmt == "w8" else 4
    zp = 0 if symmetric else bits / 8
    return params * (bits / 8 + (scale + zp) / block_size)
