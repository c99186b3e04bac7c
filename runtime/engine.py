"""ONNX Runtime sessions over a bundle's three graphs, and the KV cache they share.

The engine is stateless apart from the loaded graphs: the caller (``Session``) owns the cache and positions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from edge_duet.errors import BundleError, ProviderError
from edge_duet.manifest import GRAPH_NAMES, Manifest

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
            "run with ORT log level 0 to see why), or pass --providers cpu"
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


class Engine:
    """Runs ``vision.onnx``, ``embed.onnx`` and ``decoder.onnx`` of one bundle (``graphs``: a subset, for tools
    that must not hold every graph in memory at once, such as export validation at 3B)."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest | None = None,
                 providers: Sequence[str] | str | None = None, threads: int | None = None,
                 low_memory: bool = False, graphs: Sequence[str] = GRAPH_NAMES):
        import onnxruntime as ort

        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest or Manifest.load(self.bundle_dir)
        self.manifest.check_files(self.bundle_dir)
        self.providers = resolve_providers(providers)
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
            path, providers = self._session_source(name)
            try:
                sess = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
            except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
                raise BundleError(
                    f"cannot load {path} with {self.providers[0]}: {exc}. The file is corrupt or from an incompatible "
                    "exporter; re-export the bundle with `edge-duet export CHECKPOINT BUNDLE --overwrite`."
                ) from exc
            check_providers(sess, self.providers, name)
            self.sessions[name] = sess
        n_layers = self.manifest.text.num_layers
        self._past_names = [(f"past.{i}.key", f"past.{i}.value") for i in range(n_layers)]
        self._present_names = [n for i in range(n_layers) for n in (f"present.{i}.key", f"present.{i}.value")]
        self.decoder_calls = 0

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

    def decode(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache,
               logits_index: Sequence[int] | None = None) -> tuple[np.ndarray, KVCache]:
        """Run the decoder on new tokens on top of ``cache``.

        embeds (S, hidden); positions (3, S); returns logits (n, vocab) for ``logits_index`` (default: the last
        token) and the grown cache (length + S).
        """
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


def open_engine(bundle_dir: str | Path, providers: Sequence[str] | str | None = None,
                threads: int | None = None) -> Engine:
    """The engine for ``providers``: on a GPU provider the KV cache stays on the device between calls
    (``runtime/gpu.py``'s IO-bound engine); on the CPU the plain one."""
    resolved = resolve_providers(providers)
    if resolved[0] in (PROVIDER_NAMES["cuda"], PROVIDER_NAMES["tensorrt"]):
        from .gpu import BoundEngine

        return BoundEngine(bundle_dir, providers=providers, threads=threads)
    return Engine(bundle_dir, providers=providers, threads=threads)
