"""``edge-duet build-engines BUNDLE``: TensorRT engines for a bundle's plain-op graphs, listed in its manifest.

Design: the runtime keeps one code path, ONNX Runtime. Each engine is wrapped in a one-node ONNX model
(``com.microsoft::EPContext``, ``embed_mode=0``: the node points at the ``.plan`` file beside it) that ONNX
Runtime's TensorRT execution provider loads without instantiating the TensorRT builder - the "embedded engine"
route of ORT's docs, which also takes externally built engines. So the Session, its IO binding and its KV cache
handling are identical on CPU, CUDA and TensorRT; the engine only replaces the graph file the TensorRT provider
opens (``runtime/gpu.py: graph_path``). Building with the TensorRT Python API (``--builder tensorrt``) gives
us the optimisation profiles, precision flags and a timing cache; ``--builder ort`` instead lets ONNX Runtime's
TensorRT provider build and dump the same kind of context model (no ``tensorrt`` Python package needed).

    bundle/engines/decoder.fp16.plan        serialized engine (device- and TensorRT-version-specific)
    bundle/engines/decoder.fp16_ctx.onnx    EPContext wrapper: same input/output names as decoder.onnx
    bundle/engines/timing.cache             TensorRT timing cache (speeds up rebuilds on the same GPU)

Every engine is recorded in the manifest with the TensorRT version, the GPU and its compute capability, the
profiles, and a fingerprint of the graph it was built from. ``stale_reasons`` compares a record with what is
installed now; ``build-engines`` rebuilds stale engines, the runtime refuses them (never loads one silently).

Profiles. ONNX Runtime's TensorRT provider (up to at least 1.32) runs every engine on optimisation profile 0,
so an engine meant for ORT has one profile spanning decode (1 new token) and prefill (a whole turn, or a
re-prefill after eviction: up to the context budget); ``--profiles split`` adds a second, decode-only profile
for runtimes that select profiles (TensorRT directly, or an ORT release with multi-profile selection).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edge_duet.errors import BundleError, TensorRTMissing, UsageError
from edge_duet.manifest import GRAPH_NAMES as GRAPHS
from edge_duet.manifest import Manifest
from edge_duet.runtime.gpu import (
    RECORD_KEY, Profile, device_info, engine_records, graph_fingerprint, profiles_for, stale_reasons,
)

ENGINE_DIR = "engines"
# ops TensorRT cannot run: ONNX Runtime contrib ops and the integer-arithmetic ops of dynamic quantization
NOT_FOR_TENSORRT = {"MatMulInteger", "DynamicQuantizeLinear", "ConvInteger"}


@dataclass(frozen=True)
class EngineOptions:
    precision: str = "fp16"  # fp32 | fp16 | int8 (int8: only for graphs with Q/DQ nodes, explicit quantization)
    graphs: tuple[str, ...] = GRAPHS
    builder: str = "tensorrt"  # tensorrt (the TensorRT Python API) | ort (ORT's TensorRT provider dumps it)
    profiles: str = "single"  # single (ORT-compatible) | split (decode + prefill profiles)
    max_context_tokens: int | None = None  # default: the bundle's
    max_frames_per_call: int | None = None  # default: the bundle's frames_per_turn
    opt_prefill_tokens: int = 256
    max_logits: int = 64  # logits rows per decoder call (speculated-silence checks need a few)
    workspace_gib: float = 2.0
    optimization_level: int = 3
    rebuild: bool = False  # rebuild fresh engines too
    device_id: int = 0

    def validate(self) -> None:
        if self.precision not in ("fp32", "fp16", "int8"):
            raise UsageError(f"`EngineOptions.precision` must be fp32, fp16 or int8, got {self.precision!r}")
        if self.builder not in ("tensorrt", "ort"):
            raise UsageError(f"`EngineOptions.builder` must be tensorrt or ort, got {self.builder!r}")
        if self.profiles not in ("single", "split"):
            raise UsageError(f"`EngineOptions.profiles` must be single or split, got {self.profiles!r}")
        if self.builder == "ort" and self.profiles == "split":
            raise UsageError("`EngineOptions.builder` ort builds one profile per engine; use `EngineOptions.builder` "
                             "tensorrt for split profiles")
        unknown = set(self.graphs) - set(GRAPHS)
        if unknown:
            raise UsageError(f"unknown graph(s) {', '.join(sorted(unknown))}; choose from {', '.join(GRAPHS)}")


# ----------------------------------------------------------------------------------------------- checks


def with_engine_records(manifest: Manifest, records: dict[str, dict], provenance: dict | None = None) -> Manifest:
    info = {**manifest.export_info, RECORD_KEY: records}
    prov = manifest.provenance + ((provenance,) if provenance else ())
    return dataclasses.replace(manifest, export_info=info, provenance=prov)


def tensorrt_blockers(model) -> list[str]:
    """Ops of an ONNX model that TensorRT cannot run (contrib-domain ops, integer MatMuls)."""
    bad = {}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx") or n.op_type in NOT_FOR_TENSORRT:
            key = f"{n.domain + '::' if n.domain not in ('', 'ai.onnx') else ''}{n.op_type}"
            bad[key] = bad.get(key, 0) + 1
    return [f"{k} x{v}" for k, v in sorted(bad.items())]


def check_plain_ops(bundle_dir: Path, manifest: Manifest, graphs) -> None:
    import onnx

    problems = []
    for g in graphs:
        model = onnx.load(str(bundle_dir / manifest.graphs[g].path), load_external_data=False)
        blockers = tensorrt_blockers(model)
        if blockers:
            problems.append(f"{g} ({manifest.graphs[g].precision}): {', '.join(blockers)}")
    if problems:
        raise UsageError(
            "TensorRT cannot build these graphs (ONNX Runtime contrib / integer ops): " + "; ".join(problems)
            + ". Build engines from the fp32 or fp16 bundle (TensorRT applies fp16 itself with `EngineOptions.precision` "
            "fp16), or run this bundle with `providers` cuda (the CUDA provider runs MatMulNBits)."
        )


# ----------------------------------------------------------------------------------------------- building


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise TensorRTMissing() from exc
    return trt


def build_plan_tensorrt(onnx_path: Path, profiles: list[Profile], options: EngineOptions, timing_cache: Path,
                        log: Callable[[str], None]) -> tuple[bytes, list[tuple[str, str, str, tuple]]]:
    """Build a serialized engine with the TensorRT Python API. Returns the plan and its IO
    (name, "input"/"output", onnx dtype name, shape with -1 for dynamic dims)."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    if builder is None:
        raise BundleError("TensorRT could not create a builder: no usable CUDA GPU on this machine")
    major = int(trt.__version__.split(".")[0])
    flags = 0
    if major < 10:  # TensorRT 8.x needs explicit batch; 10.x has only explicit batch
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BundleError(f"TensorRT's ONNX parser rejected {onnx_path.name}: " + "; ".join(errors[:5]))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif options.precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)  # explicit quantization: the graph's Q/DQ nodes set the scales
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    inputs = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in profiles:
        p = builder.create_optimization_profile()
        for name in prof.min:
            if name in inputs:
                p.set_shape(name, prof.min[name], prof.opt[name], prof.max[name])
        config.add_optimization_profile(p)
    log(f"  building {onnx_path.name} ({options.precision}, {len(profiles)} profile(s)) ...")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError(f"TensorRT failed to build an engine for {onnx_path.name} (see the TensorRT log above)")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    plan = bytes(plan)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    names = {trt.DataType.FLOAT: "float32", trt.DataType.HALF: "float16", trt.DataType.INT32: "int32",
             trt.DataType.INT8: "int8", trt.DataType.BOOL: "bool", getattr(trt.DataType, "INT64", None): "int64"}
    io = []
    for i in range(engine.num_io_tensors):
        n = engine.get_tensor_name(i)
        mode = "input" if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT else "output"
        io.append((n, mode, names.get(engine.get_tensor_dtype(n), "float32"), tuple(engine.get_tensor_shape(n))))
    return plan, io


def context_model(plan_name: str, io, spec, ep_sdk_version: str, hardware: str):
    """The EPContext wrapper ONNX Runtime's TensorRT provider loads: one node pointing at ``plan_name`` (a path
    relative to the wrapper's own directory), with the source graph's input/output names."""
    from onnx import TensorProto, helper

    dtypes = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int32": TensorProto.INT32,
              "int64": TensorProto.INT64, "int8": TensorProto.INT8, "bool": TensorProto.BOOL}
    symbolic = {t.name: t.shape for t in (*spec.inputs, *spec.outputs)}

    def value_info(name, dtype, shape):
        named = symbolic.get(name, ())
        dims = [d if d >= 0 else (named[i] if i < len(named) and isinstance(named[i], str) else f"{name}_{i}")
                for i, d in enumerate(shape)]
        return helper.make_tensor_value_info(name, dtypes[dtype], dims)

    ins = [value_info(n, d, s) for n, mode, d, s in io if mode == "input"]
    outs = [value_info(n, d, s) for n, mode, d, s in io if mode == "output"]
    node = helper.make_node("EPContext", [v.name for v in ins], [v.name for v in outs], name="EPContext",
                            domain="com.microsoft", embed_mode=0, ep_cache_context=plan_name, main_context=1,
                            ep_sdk_version=ep_sdk_version, hardware_architecture=hardware,
                            source="TensorrtExecutionProvider")
    graph = helper.make_graph([node], "tensorrt_engine", ins, outs)
    # IR 8 / opset 17: loadable by every onnxruntime-gpu a JetPack 5/6 wheel provides
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)])


def build_via_ort(onnx_path: Path, ctx_path: Path, profiles: list[Profile], options: EngineOptions) -> None:
    """Let ONNX Runtime's TensorRT provider build the engine and dump an EPContext model (``ctx_path``)."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        raise BundleError("this onnxruntime has no TensorRT provider: install onnxruntime-gpu built with TensorRT "
                          "(on Jetson: the Jetson Zoo wheel for your JetPack)")
    if len(profiles) != 1:
        raise UsageError("`EngineOptions.builder` ort takes exactly one profile per engine")
    trt_opts = {
        "device_id": options.device_id, "trt_fp16_enable": options.precision == "fp16",
        "trt_int8_enable": options.precision == "int8", "trt_max_workspace_size": int(options.workspace_gib * 2**30),
        "trt_builder_optimization_level": options.optimization_level,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": str(ctx_path.parent),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(ctx_path.parent),
        "trt_dump_ep_context_model": True, "trt_ep_context_file_path": str(ctx_path),
        "trt_ep_context_embed_mode": 0, **profiles[0].ort_options(),
    }
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=[("TensorrtExecutionProvider", trt_opts)])
    if sess.get_providers()[0] != "TensorrtExecutionProvider":
        raise BundleError("ONNX Runtime did not start its TensorRT provider (missing TensorRT libraries?)")
    if not ctx_path.is_file():
        raise BundleError(f"ONNX Runtime built the engine but wrote no context model at {ctx_path}; the whole graph "
                          "must be TensorRT-eligible for an EPContext model")


@dataclass
class EngineReport:
    built: dict[str, dict]
    kept: list[str]

    def summary(self) -> str:
        lines = [f"  {g:<8} {r['precision']:<5} {r['plan_bytes'] / 2**20:9.1f} MiB  {r['build_s']:6.1f} s  "
                 f"TensorRT {r['tensorrt']} on {r['device']} (sm {r['compute_capability']})"
                 for g, r in self.built.items()]
        lines += [f"  {g:<8} up to date (kept; --rebuild to build it again)" for g in self.kept]
        return "\n".join(lines)


def build_engines(bundle: str | Path, options: EngineOptions = EngineOptions(),
                  log: Callable[[str], None] = print) -> EngineReport:
    """Build (or rebuild when stale) TensorRT engines for ``options.graphs`` and list them in the manifest."""
    import onnxruntime as ort

    import edge_duet

    options.validate()
    from edge_duet.errors import require

    require("onnx", "quant", "edge-duet build-engines")
    bundle = Path(bundle)
    manifest = Manifest.load(bundle)
    manifest.check_files(bundle)
    check_plain_ops(bundle, manifest, options.graphs)
    trt = _tensorrt() if options.builder == "tensorrt" else None
    trt_version = trt.__version__ if trt else None
    device, cc = device_info(options.device_id)
    out_dir = bundle / ENGINE_DIR
    out_dir.mkdir(exist_ok=True)
    records = engine_records(manifest)
    report = EngineReport({}, [])
    for g in options.graphs:
        old = records.get(g)
        if (old and not options.rebuild and old.get("precision") == options.precision
                and not stale_reasons(old, bundle, manifest, trt_version, cc if cc != "?" else None)):
            report.kept.append(g)
            continue
        spec = manifest.graphs[g]
        profs = profiles_for(manifest, g, options.max_context_tokens, options.max_frames_per_call,
                             options.opt_prefill_tokens, options.max_logits, split=options.profiles == "split")
        stem = f"{g}.{options.precision}"
        plan_path, ctx_path = out_dir / f"{stem}.plan", out_dir / f"{stem}_ctx.onnx"
        t0 = time.perf_counter()
        if options.builder == "tensorrt":
            plan, io = build_plan_tensorrt(bundle / spec.path, profs, options, out_dir / "timing.cache", log)
            tmp = plan_path.with_suffix(".plan.tmp")
            tmp.write_bytes(plan)
            os.replace(tmp, plan_path)
            import onnx

            onnx.save(context_model(plan_path.name, io, spec, trt_version, cc.replace(".", "")), str(ctx_path))
        else:
            build_via_ort(bundle / spec.path, ctx_path, profs, options)
            plan_path = _ort_plan_path(ctx_path)
        records[g] = {
            "graph": g, "precision": options.precision, "builder": options.builder,
            "plan": f"{ENGINE_DIR}/{plan_path.name}", "context_model": f"{ENGINE_DIR}/{ctx_path.name}",
            "plan_bytes": plan_path.stat().st_size, "tensorrt": trt_version or "via onnxruntime",
            "onnxruntime": ort.__version__, "device": device, "compute_capability": cc,
            "profiles": [dataclasses.asdict(p) for p in profs],
            "source": graph_fingerprint(bundle, manifest, g), "build_s": round(time.perf_counter() - t0, 1),
            "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        report.built[g] = records[g]
    if report.built:
        entry = {"step": "build-engines", "graphs": sorted(report.built), "precision": options.precision,
                 "builder": options.builder, "tools": {"edge_duet": edge_duet.__version__, "tensorrt": trt_version}}
        new = with_engine_records(manifest, records, entry)
        tmp = bundle / "manifest.json.tmp"
        tmp.write_text(__import__("json").dumps(new.to_json(), indent=2) + "\n")
        os.replace(tmp, bundle / "manifest.json")
    return report


def _ort_plan_path(ctx_path: Path) -> Path:
    """The engine file ONNX Runtime's dumped context model points at (its ep_cache_context attribute)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(ctx_path))
    for node in model.graph.node:
        if node.op_type == "EPContext":
            for a in node.attribute:
                if a.name == "ep_cache_context":
                    rel = helper.get_attribute_value(a).decode()
                    return (ctx_path.parent / rel).resolve()
    raise BundleError(f"{ctx_path} has no EPContext node: the graph was not fully TensorRT-eligible")
