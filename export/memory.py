"""What an export needs in memory, worked out from the checkpoint's safetensors headers before any weight is read,
and the helpers that keep the export within it (measured at 3B: docs/3b.md)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path

from edge_duet.errors import CheckpointError

from .checkpoint import CheckpointInfo


def release_memory() -> None:
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


def check_memory(info: CheckpointInfo, validate: bool, memory_gb: float | None = None) -> MemoryPlan:
    """Refuse, before any work, an export that cannot fit: say what it needs and what to try. ``memory_gb``: the
    memory to plan for (None: what this machine has available now)."""
    plan = memory_plan(info)
    have = memory_gb if memory_gb is not None else available_memory_gb()
    need = plan.need_gb(validate)
    if need <= have:
        return plan
    bparams = plan.total_params / 1e9
    lm_gb = (plan.params["decoder"] + plan.params["embed"] + plan.params["lm_head"]) * 4 / 1024**3
    hint = []
    if validate and plan.need_gb(False) <= have:
        hint.append(f"--no-validate (needs about {plan.need_gb(False):.1f} GB, but skips the check against PyTorch)")
    hint.append(f"a machine with at least {need:.0f} GB free; close other programs using memory")
    raise CheckpointError(
        f"exporting {info.path} ({bparams:.2f} B parameters) needs about {need:.1f} GB of memory: its language model "
        f"alone is {lm_gb:.1f} GB in float32, which the ONNX graphs are exported in; this machine has {have:.1f} GB "
        f"available. Try: {'; or '.join(hint)}. A quantized bundle (`ExportOptions.quantize` cpu or jetson) is small, but it is "
        "made from the float32 export, so it needs the same memory to make (see docs/3b.md)"
    )
