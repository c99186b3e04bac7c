"""``edge-duet export``: a checkpoint directory becomes a validated ONNX bundle.

The bundle is written to a temporary directory beside the target and renamed into place only after it
validated, so a failed or interrupted export never leaves a half-written bundle that looks good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
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
    EXTERNAL_DATA_OVER_BYTES as BIG_GRAPH, GRAPH_NAMES, SMALL_FILE_BYTES as SMALL_FILE, Manifest, PreprocessSpec,
    TextSpec, TokenSpec, VisionSpec, sha256_file,
)

from .checkpoint import CheckpointInfo, PartLoader, inspect_checkpoint
from .memory import check_memory, memory_plan, release_memory
from .writers import export_decoder, export_embed, export_vision


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
    check_memory(info, options.validate, options.memory_gb)
    if not options.quantize:
        return _export_fp32(info, bundle_dir, options, log)
    from edge_duet.quant.quantize import QuantOptions, quantize_bundle
    from edge_duet.quant.recipes import Recipe

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
        release_memory()
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
                    release_memory()
                if side and (part == "reference" or not self.stream):
                    side.collect_text(model)
                    payload = side.cases
            else:
                raise ValueError(f"unknown part {part!r}")
        release_memory()
        return spec, payload, _peak_rss_gb()


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
