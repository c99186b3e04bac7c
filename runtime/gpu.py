"""GPU execution: provider options, TensorRT engine records, and an engine that keeps the KV cache on the device.

``Engine`` (engine.py) feeds numpy arrays: on a GPU every decoder call would copy the whole KV cache to the device
and the grown cache back (for the 3B at 4k tokens: 2 x 300 MB per call). ``BoundEngine`` binds inputs and outputs
with ONNX Runtime's IO binding instead::

    turn N:   past K/V (OrtValues on the device) ──┐
              new embeds, positions, mask (host) ──┴─> decoder ─> present K/V (stay on the device)
                                                                └> logits (copied to the host: (n, vocab))

so only the new tokens' inputs and the logits cross the bus. The cache it returns (``DeviceKVCache``) has the
interface Session uses (``length``, ``truncate``, ``nbytes``); a roll-back (``truncate``) runs a small Slice graph
on the device. With ``providers="cpu"`` the same code runs on the host, which is how it is tested without a GPU.

TensorRT: the TensorRT provider opens a bundle's EPContext model (``engines/<graph>.<precision>_ctx.onnx``,
written by ``edge-duet build-engines``) when the manifest lists a fresh engine for that graph; a listed engine
that is stale (other graph, TensorRT or GPU) is refused. Without a listed engine the provider builds its own
from the graph, with explicit profiles and an engine cache under ``engines/ort-cache`` (slow the first time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_duet.errors import BundleError
from edge_duet.graph_io import concrete_shapes
from edge_duet.manifest import GRAPH_NAMES as GRAPHS
from edge_duet.manifest import Manifest, sha256_file

from .engine import Engine, KVCache, resolve_providers
from .kv_slice import kv_slice_model

RECORD_KEY = "tensorrt_engines"  # Manifest.export_info key until the manifest has an ``engines`` field
CUDA, TRT, CPU = "CUDAExecutionProvider", "TensorrtExecutionProvider", "CPUExecutionProvider"


def cuda_available() -> bool:
    """The installed onnxruntime has the CUDA provider and a CUDA device is present."""
    import onnxruntime as ort

    return CUDA in ort.get_available_providers() and device_info()[1] != "?"


def device_info(device_id: int = 0) -> tuple[str, str]:
    """(GPU name, compute capability "major.minor") from the CUDA driver; ("?", "?") without one."""
    import ctypes

    cuda = None
    for lib in ("libcuda.so.1", "libcuda.so"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    if cuda is None or cuda.cuInit(0) != 0:
        return "?", "?"
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuDeviceGet(ctypes.byref(dev), device_id) != 0:
        return "?", "?"
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    cuda.cuDeviceGetName(name, 256, dev)
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


# ----------------------------------------------------------------------------------------------- engine records


def graph_fingerprint(bundle_dir: Path, manifest: Manifest, graph: str) -> str:
    """sha256 of the graph's .onnx file plus the sizes of its external data: cheap (a big graph's .onnx holds
    only its structure) and changes whenever the graph is re-exported or re-quantized."""
    spec = manifest.graphs[graph]
    digest = sha256_file(bundle_dir / spec.path)
    sizes = ",".join(f"{d}:{(bundle_dir / d).stat().st_size}" for d in spec.external_data if (bundle_dir / d).exists())
    return f"{digest};{sizes}" if sizes else digest


def engine_records(manifest: Manifest) -> dict[str, dict]:
    return dict(manifest.export_info.get(RECORD_KEY, {}))


def installed_tensorrt() -> str | None:
    try:
        import tensorrt  # noqa: PLC0415 - optional, only to compare versions
    except ImportError:
        return None
    return tensorrt.__version__


def stale_reasons(record: dict, bundle_dir: Path, manifest: Manifest, tensorrt_version: str | None = None,
                  compute_capability: str | None = None) -> list[str]:
    """Why an engine record cannot be used now (empty: usable). Unknown current values are not compared."""
    reasons = []
    graph = record.get("graph")
    if graph not in manifest.graphs:
        return [f"its graph {graph!r} is not in the bundle"]
    for key in ("plan", "context_model"):
        if not (bundle_dir / str(record.get(key, ""))).is_file():
            reasons.append(f"{record.get(key)} is missing")
    plan = bundle_dir / str(record.get("plan", ""))
    if plan.is_file() and plan.stat().st_size != record.get("plan_bytes"):
        reasons.append(f"{record['plan']} changed size since it was built")
    if record.get("source") != graph_fingerprint(bundle_dir, manifest, graph):
        reasons.append(f"{manifest.graphs[graph].path} changed since the engine was built")
    built_with = record.get("tensorrt")
    if tensorrt_version and built_with not in (None, "via onnxruntime") and built_with != tensorrt_version:
        reasons.append(f"built with TensorRT {built_with}, this machine has {tensorrt_version}")
    if compute_capability and compute_capability != "?" and record.get("compute_capability") != compute_capability:
        reasons.append(f"built for compute capability {record.get('compute_capability')} "
                       f"({record.get('device')}), this GPU is {compute_capability}")
    return reasons


# ----------------------------------------------------------------------------------------------- profiles


Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    name: str
    min: dict[str, Shape]
    opt: dict[str, Shape]
    max: dict[str, Shape]

    def ort_options(self) -> dict[str, str]:
        """``trt_profile_{min,opt,max}_shapes`` strings for ONNX Runtime's TensorRT provider."""
        def fmt(shapes):
            return ",".join(f"{k}:{'x'.join(str(d) for d in v)}" for k, v in shapes.items())

        return {"trt_profile_min_shapes": fmt(self.min), "trt_profile_opt_shapes": fmt(self.opt),
                "trt_profile_max_shapes": fmt(self.max)}


def profiles_for(manifest: Manifest, graph: str, max_context_tokens: int | None = None,
                 max_frames_per_call: int | None = None, opt_prefill_tokens: int = 256, max_logits: int = 64,
                 split: bool = False) -> list[Profile]:
    """TensorRT optimisation profiles (min/opt/max shape per input) for one graph, from the bundle's model dims
    and prompt defaults. The decoder gets one profile spanning decode (1 token) and prefill (up to the context
    budget: a re-prefill after eviction is one call); ``split`` adds a decode-only second profile."""
    v, pre, prompt = manifest.vision, manifest.preprocess, manifest.prompt
    ctx = max_context_tokens or prompt.max_context_tokens
    if graph not in GRAPHS:
        raise BundleError(f"unknown graph {graph!r}")
    inputs = manifest.graphs[graph].inputs  # the names and shapes the graph declares (edge_duet.graph_io)
    if graph == "vision":
        unit = v.merge_size**2
        lo = max(unit, (pre.min_pixels // pre.patch_size**2) // unit * unit)
        frames = max_frames_per_call or prompt.frames_per_turn
        hi = frames * (pre.max_pixels // pre.patch_size**2) // unit * unit
        opt = min(hi, max(lo, frames * 256))  # 224x224 frames: 16x16 patches each

        def shapes(n):
            return concrete_shapes(inputs, {"num_patches": n, "num_tokens": n // unit})

        return [Profile("frames", shapes(lo), shapes(opt), shapes(hi))]
    if graph == "embed":
        def tokens(n):
            return concrete_shapes(inputs, {"batch": 1, "seq": n})

        return [Profile("tokens", tokens(1), tokens(min(32, ctx)), tokens(ctx))]

    def dec(seq, past, total, n):
        return concrete_shapes(inputs, {"batch": 1, "seq": seq, "past": past, "total": total, "num_logits": n})

    # Each input's box is checked on its own; the runtime keeps past + seq <= ctx (Session evicts before that).
    opt_seq = min(opt_prefill_tokens, ctx)
    opt_past = max(0, min(ctx // 2, ctx - opt_seq))
    one = Profile("decode+prefill", dec(1, 0, 1, 1), dec(opt_seq, opt_past, opt_past + opt_seq, 1),
                  dec(ctx, ctx - 1, ctx, max_logits))
    if not split:
        return [one]
    decode = Profile("decode", dec(1, 0, 1, 1), dec(1, ctx // 2, ctx // 2 + 1, 1),
                     dec(1, ctx - 1, ctx, max_logits))
    return [one, decode]


# ----------------------------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class GpuOptions:
    device_id: int = 0
    trt_fp16: bool = True  # let TensorRT pick fp16 kernels (graphs and IO stay float32)
    use_engines: bool = True  # TensorRT provider: open build-engines' context models when listed and fresh
    gpu_mem_limit_gib: float | None = None  # CUDA provider arena cap (e.g. on an 8 GB Jetson)


def session_config(bundle_dir: Path, manifest: Manifest, graph: str, providers: Sequence[str],
                   options: GpuOptions = GpuOptions()) -> tuple[Path, list]:
    """The file to open and the ``providers`` argument (names with option dicts) for one graph's session."""
    path = bundle_dir / manifest.graphs[graph].path
    out: list = []
    for prov in providers:
        if prov == CUDA:
            opts = {"device_id": options.device_id, "arena_extend_strategy": "kSameAsRequested",
                    "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": True}
            if options.gpu_mem_limit_gib:
                opts["gpu_mem_limit"] = int(options.gpu_mem_limit_gib * 2**30)
            out.append((CUDA, opts))
        elif prov == TRT:
            record = engine_records(manifest).get(graph) if options.use_engines else None
            cache = bundle_dir / "engines" / "ort-cache"
            opts = {"device_id": options.device_id, "trt_fp16_enable": options.trt_fp16,
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
            if record is not None:
                reasons = stale_reasons(record, bundle_dir, manifest, installed_tensorrt(),
                                        device_info(options.device_id)[1])
                if reasons:
                    raise BundleError(
                        f"the TensorRT engine for {graph} in {bundle_dir} is stale: {'; '.join(reasons)}. "
                        f"Rebuild it with `edge-duet build-engines {bundle_dir}` (or set `providers` to cuda)."
                    )
                path = bundle_dir / record["context_model"]
                opts = {"device_id": options.device_id, "trt_ep_context_embed_mode": 0}
            else:
                cache.mkdir(parents=True, exist_ok=True)
                opts.update(_default_profile(manifest, graph))
            out.append((TRT, opts))
        else:
            out.append(prov)
    return path, out


def _default_profile(manifest: Manifest, graph: str) -> dict[str, str]:
    """Explicit profile shapes so ORT builds one engine up front instead of rebuilding as shapes grow."""
    return profiles_for(manifest, graph)[0].ort_options()


# ----------------------------------------------------------------------------------------------- IO binding


@dataclass
class DeviceKVCache:
    """Per layer (key, value) OrtValues on the engine's device, each (1, kv_heads, length, head_dim) float32."""

    layers: list[tuple[object, object]]
    engine: "BoundEngine"

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape()[2])

    @property
    def nbytes(self) -> int:
        return sum(4 * int(np.prod(k.shape())) + 4 * int(np.prod(v.shape())) for k, v in self.layers)

    def truncate(self, length: int) -> "DeviceKVCache | KVCache":
        """The first ``length`` positions, sliced on the device; an empty cache needs no graph run (a reset, an
        eviction): the host's empty cache, which the next decode uploads."""
        if length == 0:
            return KVCache.empty(self.engine.manifest)
        return self.engine.slice_cache(self, length)

    def to_host(self) -> KVCache:
        return KVCache([(k.numpy(), v.numpy()) for k, v in self.layers])


class BoundEngine(Engine):
    """An :class:`Engine` whose decoder keeps the KV cache on the device of its first provider (IO binding).

    providers: "cuda", "tensorrt" (or a list) for a GPU; "cpu" runs the same binding code on the host.
    Used by Session exactly like Engine: ``Session(bundle, options, engine=BoundEngine(bundle, providers=...))``.
    """

    def __init__(self, bundle_dir: str | Path, manifest: Manifest | None = None,
                 providers: Sequence[str] | str | None = "cuda", threads: int | None = None,
                 gpu: GpuOptions = GpuOptions(), decoder: str = "auto"):
        self.gpu = gpu
        self.device = "cuda" if resolve_providers(providers)[0] in (CUDA, TRT) else "cpu"
        self.device_id = gpu.device_id
        super().__init__(bundle_dir, manifest, providers=providers, threads=threads, decoder=decoder)
        self._slicer = None
        self._slicer_opts = self.session_options

    def _session_source(self, graph: str) -> tuple[Path, list]:
        return session_config(self.bundle_dir, self.manifest, graph, self.providers, self.gpu)

    def _on_device(self, cache) -> DeviceKVCache:
        if isinstance(cache, DeviceKVCache):
            return cache
        import onnxruntime as ort

        def up(a):
            return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.float32), self.device,
                                                    self.gpu.device_id)

        return DeviceKVCache([(up(k), up(v)) for k, v in cache.layers], self)

    def decode(self, embeds: np.ndarray, positions: np.ndarray, cache, logits_index: Sequence[int] | None = None):
        """As :meth:`Engine.decode`, but ``cache`` may live on the device and the returned cache does."""
        if self.flavour == "fused":  # its buffers already live on the device, bound in place
            return super().decode(embeds, positions, cache, logits_index)
        past = self._on_device(cache)
        s = embeds.shape[0]
        idx = np.asarray([s - 1] if logits_index is None else logits_index, dtype=np.int64)
        sess = self.sessions["decoder"]
        b = sess.io_binding()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], dtype=np.float32))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, None, :], dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, past.length + s), dtype=np.int64))
        b.bind_cpu_input("logits_index", idx)
        for (kname, vname), (k, v) in zip(self._past_names, past.layers):
            b.bind_ortvalue_input(kname, k)
            b.bind_ortvalue_input(vname, v)
        b.bind_output("logits", "cpu")
        for name in self._present_names:
            b.bind_output(name, self.device, self.gpu.device_id)
        sess.run_with_iobinding(b)
        outs = b.get_outputs()
        self.decoder_calls += 1
        logits = outs[0].numpy()[0]
        pres = outs[1:]
        return logits, DeviceKVCache([(pres[2 * i], pres[2 * i + 1]) for i in range(len(pres) // 2)], self)

    def slice_cache(self, cache: DeviceKVCache, length: int) -> DeviceKVCache:
        """The first ``length`` positions of every layer, computed on the device (one small graph run)."""
        if self._slicer is None:
            import onnxruntime as ort

            provs = [(CUDA, {"device_id": self.gpu.device_id}), CPU] if self.device == "cuda" else [CPU]
            self._slicer = ort.InferenceSession(kv_slice_model(2 * len(cache.layers)),
                                                sess_options=self._slicer_opts, providers=provs)
        b = self._slicer.io_binding()
        flat = [x for kv in cache.layers for x in kv]
        for i, x in enumerate(flat):
            b.bind_ortvalue_input(f"kv{i}", x)
        b.bind_cpu_input("length", np.asarray([length], dtype=np.int64))
        for i in range(len(flat)):
            b.bind_output(f"out{i}", self.device, self.gpu.device_id)
        self._slicer.run_with_iobinding(b)
        outs = b.get_outputs()
        return DeviceKVCache([(outs[2 * i], outs[2 * i + 1]) for i in range(len(outs) // 2)], self)
