"""``edge-duet export``: a checkpoint directory becomes a validated ONNX bundle.

The bundle is written to a temporary directory beside the target and renamed into place only after it
validated, so a failed or interrupted export never leaves a half-written bundle that looks good.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import resource
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edge_duet.bundle_io import staged_bundle
from edge_duet.errors import CheckpointError
from edge_duet.manifest import (
    GraphSpec, Manifest, PreprocessSpec, TensorSpec, TextSpec, TokenSpec, VisionSpec, sha256_file,
)

from .checkpoint import CheckpointInfo, load_model

TWO_GB = 2 * 1024**3
SMALL_FILE = 64 * 1024**2  # files below this get a checksum in the manifest


@dataclass(frozen=True)
class ExportOptions:
    opset: int = 18
    validate: bool = True
    overwrite: bool = False
    system_prompt: str | None = None
    max_context_tokens: int | None = None
    frame_interval_s: float | None = None
    frames_per_turn: int | None = None
    name: str | None = None
    exporter: str = "auto"  # auto: TorchScript for small graphs, dynamo for graphs over ~1.5 GB; or "dynamo"


@dataclass
class ExportReport:
    bundle_dir: Path
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_rss_gb: float = 0.0
    validation: object | None = None

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.stage_seconds.items())
        return f"bundle {self.bundle_dir}: {stages}; peak memory {self.peak_rss_gb:.2f} GB"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # ru_maxrss is KiB on Linux


@contextlib.contextmanager
def _stage(report: ExportReport, name: str, log: Callable[[str], None]):
    log(f"[{name}] ...")
    t0 = time.perf_counter()
    yield
    report.stage_seconds[name] = time.perf_counter() - t0
    log(f"[{name}] done in {report.stage_seconds[name]:.1f} s (peak memory {_peak_rss_gb():.2f} GB)")


def export_bundle(checkpoint_dir: str | Path, bundle_dir: str | Path, options: ExportOptions = ExportOptions(),
                  log: Callable[[str], None] = print) -> ExportReport:
    import torch

    bundle_dir = Path(bundle_dir)
    report = ExportReport(bundle_dir=bundle_dir)
    with staged_bundle(bundle_dir, options.overwrite) as tmp:
        with _stage(report, "load", log):
            model, info = load_model(checkpoint_dir)
        manifest = build_manifest(model, info, options)
        with torch.no_grad(), _quiet_export():
            dyn = options.exporter == "dynamo"
            with _stage(report, "vision", log):
                manifest.graphs["vision"] = export_vision(model, tmp, options.opset, force_dynamo=dyn)
            with _stage(report, "embed", log):
                manifest.graphs["embed"] = export_embed(model, tmp, options.opset, force_dynamo=dyn)
            with _stage(report, "decoder", log):
                manifest.graphs["decoder"] = export_decoder(model, tmp, options.opset, force_dynamo=dyn)
        big = _param_bytes(model) > 2 * BIG_GRAPH
        shutil.copy(info.path / "tokenizer.json", tmp / "tokenizer.json")
        if (info.path / "chat_template.jinja").is_file():
            shutil.copy(info.path / "chat_template.jinja", tmp / "chat_template.jinja")
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.stat().st_size < SMALL_FILE}
        manifest = _replace(manifest, files=files)
        manifest.save(tmp)
        if options.validate:
            from .validate import validate_bundle

            with _stage(report, "validate", log):
                if big:  # free the model while ONNX Runtime holds the graphs; reload it for the reference
                    del model
                    report.validation = validate_bundle(lambda: load_model(checkpoint_dir)[0], tmp, low_memory=True)
                else:
                    report.validation = validate_bundle(model, tmp)
            log(report.validation.summary())
        report.peak_rss_gb = _peak_rss_gb()
        manifest = _replace(manifest, export_info={**manifest.export_info, "peak_rss_gb": round(report.peak_rss_gb, 2),
                                                   "stage_seconds": {k: round(v, 2) for k, v in report.stage_seconds.items()},
                                                   "validated": bool(options.validate)})
        manifest.save(tmp)
    return report


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
    prompt = info.proactive.prompt(system_prompt=options.system_prompt, frame_interval_s=options.frame_interval_s,
                                   frames_per_turn=options.frames_per_turn,
                                   max_context_tokens=options.max_context_tokens)
    return Manifest(
        name=options.name or info.path.name, text=text, vision=vision, preprocess=preprocess, tokens=tokens,
        prompt=prompt, graphs={},
        export_info={
            "checkpoint": str(info.path), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "edge_duet": edge_duet.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__, "opset": options.opset,
        },
    )


# ----------------------------------------------------------------------------------------------- graphs


BIG_GRAPH = 1536 * 1024**2  # graphs whose weights pass this take the memory-frugal exporter


def _torch_export(graph, args, path: Path, input_names, output_names, dynamic_axes: dict, arg_groups=None,
                  opset: int = 18, force_dynamo: bool = False) -> tuple[str, ...]:
    """Export ``graph`` to ``path``; returns the external-data files written beside it.

    Small graphs go through the TorchScript exporter (fast, one self-contained file). Graphs over ~1.5 GB go
    through the dynamo exporter, whose ONNX model references the torch weights instead of copying them and
    streams them into one ``<name>.data`` file: the TorchScript route would hold a second copy of every weight
    in memory, which does not fit a 24 GB machine for the 3B decoder. (Batch is then fixed to 1, which is all
    the runtime uses.) ``arg_groups`` tells how ``args`` map to the forward's parameters when it takes
    ``*varargs`` (their count as one tuple entry for dynamo).
    """
    import torch

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


def export_decoder(model, out: Path, opset: int, force_dynamo: bool = False) -> GraphSpec:
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
        ["logits", *present_names], dyn, arg_groups=(4, None), opset=opset, force_dynamo=force_dynamo)
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
