"""What bounds each number of ``edge-duet bench``: copy bandwidth and matmul speed probed in the bench's own run,
weights read per decode step, and the FLOPs of vision and prefill as the exported graphs execute them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np




def measure_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> dict:
    """Copy bandwidth of a large float32 array (read + write bytes / s, STREAM's convention), best of
    ``repeats``, with 1 and ``threads`` threads (numpy releases the GIL while copying)."""
    src = np.ones(mib << 18, np.float32)
    dst = np.empty_like(src)
    out = {}
    for k in sorted({1, max(threads, 1)}):
        cuts = np.linspace(0, src.size, k + 1).astype(int)
        best = float("inf")
        for _ in range(repeats):
            ts = [threading.Thread(target=np.copyto, args=(dst[a:b], src[a:b])) for a, b in zip(cuts, cuts[1:])]
            t0 = time.perf_counter()
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            best = min(best, time.perf_counter() - t0)
        out[f"copy_gbs_{k}t"] = 2 * src.nbytes / best / 1e9
    return {**out, "bandwidth_gbs": max(out.values())}


def measure_matmul(threads: int, n: int = 2048) -> float:
    """float32 GEMM GFLOP/s through numpy's BLAS on ``threads`` threads (a fresh process: BLAS reads its thread
    count at start), best of 3: the practical compute peak for prefill."""
    code = (f"import numpy as np, time\na = np.ones(({n}, {n}), np.float32)\nb = []\n"
            "for _ in range(3):\n    t = time.perf_counter(); a @ a; b.append(time.perf_counter() - t)\n"
            f"print(2 * {n}**3 / min(b) / 1e9)")
    env = {**os.environ, **{v: str(threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}}
    return float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                check=True).stdout)


def graph_weights(bundle: str | Path, graph: str = "decoder") -> dict:
    """A graph's weights: ``bytes`` by element type (all read once per decode step) and ``elements``. Needs the
    ``onnx`` package; without it the file size stands in (``{"file": bytes}``, float32 elements assumed)."""
    from edge_duet.manifest import Manifest

    bundle = Path(bundle)
    spec = Manifest.load(bundle).graphs[graph]
    try:
        import onnx
        from onnx import helper
    except ImportError:
        size = sum((bundle / p).stat().st_size for p in (spec.path, *spec.external_data))
        return {"bytes": {"file": size}, "elements": size // 4}
    by_type: dict[str, int] = {}
    elements = 0
    for init in onnx.load(str(bundle / spec.path), load_external_data=False).graph.initializer:
        dtype, n = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)), int(np.prod(init.dims))
        by_type[dtype.name] = by_type.get(dtype.name, 0) + n * dtype.itemsize
        elements += n
    return {"bytes": by_type, "elements": elements}


def prefill_flops(text, s: int, p: int, decoder_params: int, n_logits: int = 1) -> float:
    """FLOPs the exported decoder executes for ``s`` new tokens on a ``p``-token cache: 2 per weight per token
    in the layers (norms and biases are a rounding error), the attention it computes in full (s x (p+s) scores
    and weighted sum: masked, not skipped), and the lm_head for ``n_logits`` rows."""
    head = text.vocab_size * text.hidden_size
    attn = text.num_layers * 4 * s * (p + s) * text.num_attention_heads * text.head_dim
    return 2 * s * (decoder_params - head) + attn + 2 * n_logits * head


def vision_flops(vision, vision_params: int, patches: int) -> float:
    """FLOPs of the vision graph on ``patches`` patches: 2 per weight per patch (the merger's weights per merged
    token), and per block a full patches x patches attention (the frames of a turn share one masked matrix)."""
    m, e = vision.merge_size**2, vision.hidden_size
    merger = (m * e) ** 2 + m * e * vision.out_hidden_size
    return 2 * patches * (vision_params - merger) + 2 * (patches // m) * merger + vision.depth * 4 * patches**2 * e


def machine_info(threads: int) -> dict:
    import platform

    import onnxruntime

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__,
            "load_average_end": os.getloadavg()}


