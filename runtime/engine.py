"""ONNX Runtime sessions over a bundle's three graphs, and the KV caches of the two decoder flavours.

The engine is stateless apart from the loaded graphs: the caller (``Context``) owns the cache and positions.
A bundle's decoder comes in up to two flavours (``Manifest.decoder_flavours``):

- ``plain``: plain ONNX ops (every provider, TensorRT). Takes the past keys/values as inputs and returns the grown
  cache as new outputs (``KVCache``: numpy arrays, re-fed on every call).
- ``fused``: ``com.microsoft.GroupQueryAttention`` over per-layer buffers allocated once at the context budget and
  bound as both past and present (``FusedKVCache``); keys and values are written in place, M-RoPE is applied
  before the op, and the cache never crosses between numpy and ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_duet.errors import BundleError, ProviderError, UsageError
from edge_duet.graph_io import kv_names
from edge_duet.manifest import DECODER_FLAVOURS, GRAPH_NAMES, Manifest

from .vision_index import Grid, vision_inputs

PROVIDER_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


def resolve_providers(requested: Sequence[str] | str | None) -> list[str]:
    """Map user names (cpu, cuda, tensorrt) to ONNX Runtime providers; ``None`` picks the best available.

    ONNX Runtime silently falls back to CPU when a provider cannot start, so a requested provider that is not
    compiled into the installed onnxruntime is refused here, and one that fails to start is caught after the
    session is created (``check_providers``).
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        for name in ("CUDAExecutionProvider", "CPUExecutionProvider"):
            if name in available and (name != "CUDAExecutionProvider" or _cuda_device_present()):
                return [name] + (["CPUExecutionProvider"] if name != "CPUExecutionProvider" else [])
        return ["CPUExecutionProvider"]
    names = [requested] if isinstance(requested, str) else list(requested)
    out = []
    by_ort_name = {v.lower(): k for k, v in PROVIDER_NAMES.items()}  # CUDAExecutionProvider is taken as cuda
    for n in names:
        key = n.strip().lower()
        key = by_ort_name.get(key, key)
        if key not in PROVIDER_NAMES:
            raise ProviderError(f"unknown provider {n!r}; choose from {', '.join(PROVIDER_NAMES)}")
        prov = PROVIDER_NAMES[key]
        if prov not in available:
            hint = "pip install onnxruntime-gpu (and CUDA/cuDNN/TensorRT libraries)" if key != "cpu" else ""
            raise ProviderError(
                f"provider {key} ({prov}) is not available in this onnxruntime (it has {', '.join(available)}). {hint}"
            )
        out.append(prov)
    if "CPUExecutionProvider" not in out:
        out.append("CPUExecutionProvider")  # for the few ops a GPU provider does not take
    return out


def _cuda_device_present() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvhost-ctrl").exists()  # desktop GPU / Jetson


def check_providers(session, requested: list[str], graph: str) -> None:
    got = session.get_providers()
    if requested[0] != got[0]:
        raise ProviderError(
            f"{graph}: asked for {requested[0]} but ONNX Runtime started {got[0]} "
            "(usually missing CUDA/cuDNN/TensorRT libraries for this onnxruntime-gpu build; "
            "run with ORT log level 0 to see why), or set `providers` to cpu"
        )


@dataclass
class KVCache:
    """Per layer (key, value), each (1, kv_heads, length, head_dim) float32."""

    layers: list[tuple[np.ndarray, np.ndarray]]

    @classmethod
    def empty(cls, manifest: Manifest) -> "KVCache":
        t = manifest.text
        z = np.zeros((1, t.num_kv_heads, 0, t.head_dim), dtype=np.float32)
        return cls([(z, z) for _ in range(t.num_layers)])

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[2])

    def truncate(self, length: int) -> "KVCache":
        return KVCache([(k[:, :, :length], v[:, :, :length]) for k, v in self.layers])

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)

    def host_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        return [(np.array(k), np.array(v)) for k, v in self.layers]


@dataclass(frozen=True)
class FusedKVCache:
    """The fused decoder's cache: per layer (key, value) OrtValues of (1, kv_heads, capacity, head_dim) float32,
    allocated once, of which the first ``length`` positions are valid.

    The decoder writes new keys and values in place (the same buffer is bound as its past and present), so a
    call returns the same buffers with a longer ``length``, and ``truncate`` (roll-back, eviction) only makes
    the length shorter. Only the newest value is meaningful: an older one shares the buffers.
    """

    buffers: tuple[tuple[object, object], ...]
    length: int = 0

    @classmethod
    def allocate(cls, manifest: Manifest, capacity: int, device: str = "cpu", device_id: int = 0) -> "FusedKVCache":
        import onnxruntime as ort

        t = manifest.text
        shape = [1, t.num_kv_heads, int(capacity), t.head_dim]

        def buf():
            return ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, device, device_id)

        return cls(tuple((buf(), buf()) for _ in range(t.num_layers)))

    @property
    def capacity(self) -> int:
        return int(self.buffers[0][0].shape()[2])

    def truncate(self, length: int) -> "FusedKVCache":
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {length}")
        return dataclasses.replace(self, length=int(length))

    def grown(self, new_tokens: int) -> "FusedKVCache":
        return dataclasses.replace(self, length=self.length + int(new_tokens))

    @property
    def nbytes(self) -> int:
        """The allocated buffers (fixed: the cache never grows past them)."""
        return sum(4 * int(np.prod(k.shape())) * 2 for k, _ in self.buffers)

    def host_layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        n = self.length
        return [(k.numpy()[:, :, :n].copy(), v.numpy()[:, :, :n].copy()) for k, v in self.buffers]


def check_io(sess, spec, path: Path) -> None:
    """The graph ONNX Runtime loaded must have the inputs and outputs its manifest entry declares (the names the
    runtime feeds): a graph swapped in from another export, or a hand-edited manifest, fails here and not mid-turn."""
    declared = ({t.name for t in spec.inputs}, {t.name for t in spec.outputs})
    actual = ({i.name for i in sess.get_inputs()}, {o.name for o in sess.get_outputs()})
    wrong = [f"{kind} {sorted(a - d)[:4]} not declared, {sorted(d - a)[:4]} missing"
             for kind, d, a in zip(("inputs", "outputs"), declared, actual) if d != a]
    if wrong:
        raise BundleError(f"{path} does not match its manifest entry ({'; '.join(wrong)}): the graph and manifest.json "
                          "come from different exports. Re-export the bundle.")


class Engine:
    """Runs ``vision.onnx``, ``embed.onnx`` and ``decoder.onnx`` of one bundle (``graphs``: a subset, for tools
    that must not hold every graph in memory at once, such as export validation at 3B)."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest | None = None,
                 providers: Sequence[str] | str | None = None, threads: int | None = None,
                 low_memory: bool = False, graphs: Sequence[str] = GRAPH_NAMES, decoder: str = "auto"):
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or Manifest.load(self.bundle_dir)
        self.manifest.check_files(self.bundle_dir)
        self.providers = resolve_providers(providers)
        self.flavour = pick_decoder(self.manifest, decoder, self.providers[0])
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if low_memory:  # no pre-packed weight copies, no arena: slower, but a 3B fp32 graph fits in RAM once
            opts.add_session_config_entry("session.disable_prepacking", "1")
            opts.enable_cpu_mem_arena = False
        self.session_options = opts
        self.sessions = {}
        for name in graphs:
            path, providers = self._session_source(self.graph_key(name))
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
                raise BundleError(
                    f"cannot load {path} with {self.providers[0]}: {exc}. The file is corrupt or from an incompatible "
                    "exporter; re-export the bundle with `edge-duet export CHECKPOINT BUNDLE --overwrite`."
                ) from exc
            check_providers(sess, self.providers, name)
            check_io(sess, self.manifest.graphs[self.graph_key(name)], path)
            self.sessions[name] = sess
        n_layers = self.manifest.text.num_layers
        past = kv_names(n_layers, "past")
        self._past_names = list(zip(past[0::2], past[1::2]))  # per layer (key, value)
        self._present_names = kv_names(n_layers, "present")
        self.decoder_calls = 0

    device = "cpu"  # where the fused decoder's KV buffers live (the GPU engine overrides it)
    device_id = 0

    def graph_key(self, role: str) -> str:
        """The manifest's name for the graph that plays ``role`` (vision, embed, decoder) in this engine."""
        return DECODER_FLAVOURS[self.flavour] if role == "decoder" else role

    def _session_source(self, graph: str) -> tuple[Path, list]:
        """The model file and provider list ONNX Runtime opens for ``graph`` (the GPU engine overrides this to
        use TensorRT engines and provider options)."""
        return self.bundle_dir / self.manifest.graphs[graph].path, self.providers

    # ------------------------------------------------------------------ graphs
    def encode_frames(self, patches: np.ndarray, grids: Sequence[Grid]) -> np.ndarray:
        """(N, C*T*P*P) patches of one or more frames -> (M, hidden) merged visual embeddings, frames in order."""
        feeds = vision_inputs(patches, grids, self.manifest.vision)
        return self.sessions["vision"].run(None, feeds)[0]

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        """token ids -> (len, hidden)."""
        arr = np.asarray(ids, dtype=np.int64)[None]
        return self.sessions["embed"].run(None, {"input_ids": arr})[0][0]

    def empty_cache(self, capacity: int):
        """An empty cache for this engine's decoder: ``KVCache`` (plain), or ``FusedKVCache`` buffers of
        ``capacity`` tokens allocated now, once (fused)."""
        if self.flavour == "fused":
            return FusedKVCache.allocate(self.manifest, capacity, self.device, self.device_id)
        return KVCache.empty(self.manifest)

    def decode(self, embeds: np.ndarray, positions: np.ndarray, cache, logits_index: Sequence[int] | None = None):
        """Run the decoder on new tokens on top of ``cache`` (from :meth:`empty_cache` or an earlier call).

        embeds (S, hidden); positions (3, S); returns logits (n, vocab) for ``logits_index`` (default: the last
        token) and the grown cache (length + S).
        """
        if self.flavour == "fused":
            return self._decode_fused(embeds, positions, cache, logits_index)
        s = embeds.shape[0]
        idx = np.asarray([s - 1] if logits_index is None else logits_index, dtype=np.int64)
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds[None], dtype=np.float32),
            "position_ids": np.ascontiguousarray(positions[:, None, :], dtype=np.int64),
            "attention_mask": np.ones((1, cache.length + s), dtype=np.int64),
            "logits_index": idx,
        }
        for (kname, vname), (k, v) in zip(self._past_names, cache.layers):
            feeds[kname] = np.ascontiguousarray(k)  # a rolled-back cache is a strided view
            feeds[vname] = np.ascontiguousarray(v)
        out = self.sessions["decoder"].run(None, feeds)
        self.decoder_calls += 1
        logits = out[0][0]
        pres = out[1:]
        return logits, KVCache([(pres[2 * i], pres[2 * i + 1]) for i in range(len(pres) // 2)])

    def _decode_fused(self, embeds: np.ndarray, positions: np.ndarray, cache: FusedKVCache,
                      logits_index: Sequence[int] | None):
        """The fused decoder: each layer's buffer is bound as both its past and its present (IO binding), so the
        cache never leaves ONNX Runtime's memory; only the new tokens' inputs and the logits cross. The graph's
        GroupQueryAttention reads positions [0, length + S) and writes the S new ones at [length, length + S)."""
        s = embeds.shape[0]
        total = cache.length + s
        if total > cache.capacity:
            raise ValueError(f"the KV buffer holds {cache.capacity} tokens; {total} were asked for")
        idx = np.asarray([s - 1] if logits_index is None else logits_index, dtype=np.int64)
        b = self.sessions["decoder"].io_binding()
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds[None], dtype=np.float32))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(positions[:, None, :], dtype=np.int64))
        b.bind_cpu_input("logits_index", idx)
        b.bind_cpu_input("seqlens_k", np.asarray([total - 1], dtype=np.int32))  # GQA's convention: valid length - 1
        b.bind_cpu_input("total_sequence_length", np.asarray(total, dtype=np.int32))
        b.bind_output("logits", "cpu")  # outputs come back in binding order: logits first
        for (kname, vname), (k, v) in zip(self._past_names, cache.buffers):
            b.bind_ortvalue_input(kname, k)
            b.bind_ortvalue_input(vname, v)
        for name, buf in zip(self._present_names, (x for kv in cache.buffers for x in kv)):
            b.bind_ortvalue_output(name, buf)
        self.sessions["decoder"].run_with_iobinding(b)
        self.decoder_calls += 1
        return b.get_outputs()[0].numpy()[0], cache.grown(s)


def pick_decoder(manifest: Manifest, requested: str, provider: str) -> str:
    """The decoder flavour to run: ``auto`` takes the fused one when the bundle has it and the provider is the
    CPU (where it was measured faster; TensorRT cannot run its contrib ops), else the plain one."""
    have = manifest.decoder_flavours
    if requested == "auto":
        return "fused" if "fused" in have and provider == PROVIDER_NAMES["cpu"] else "plain"
    if requested not in DECODER_FLAVOURS:
        raise UsageError(f"unknown decoder flavour {requested!r}; choose from auto, {', '.join(DECODER_FLAVOURS)}")
    if requested not in have:
        raise BundleError(f"this bundle has no {requested} decoder (it has: {', '.join(have)}); re-export it with "
                          "`edge-duet export CHECKPOINT BUNDLE --overwrite` to add one, or set `decoder` to plain")
    if requested == "fused" and provider == PROVIDER_NAMES["tensorrt"]:
        raise ProviderError("the fused decoder uses ONNX Runtime contrib ops, which TensorRT cannot run; "
                            "set `decoder` to plain with `providers` tensorrt")
    return requested


def open_engine(bundle_dir: str | Path, providers: Sequence[str] | str | None = None,
                threads: int | None = None, decoder: str = "auto") -> Engine:
    """The engine for ``providers``: on a GPU provider the KV cache stays on the device between calls
    (``runtime/gpu.py``'s IO-bound engine); on the CPU the plain one."""
    resolved = resolve_providers(providers)
    if resolved[0] in (PROVIDER_NAMES["cuda"], PROVIDER_NAMES["tensorrt"]):
        from .gpu import BoundEngine

        return BoundEngine(bundle_dir, providers=providers, threads=threads, decoder=decoder)
    return Engine(bundle_dir, providers=providers, threads=threads, decoder=decoder)
