"""``edge-duet bench`` as one library call: :func:`run` takes a :class:`BenchRequest` (what the command line says)
and returns the report. It resolves the target (a bundle, a checkpoint exported into the cache, or a named
random-weight shape), makes the quantized variants, builds the jobs (edge-duet per bundle x decoder flavour x
provider x token drop, the transformers loops, the peers) and runs them side by side (``harness.run_bench``)."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from edge_duet.errors import UsageError

from .harness import Job, run_bench
from .peers import PEERS
from .report import speedups
from .stream import BenchOptions

BASELINES = {"demo": True, "kv": False}  # name -> DemoLoop(rerender=...)


@dataclass(frozen=True)
class BenchRequest:
    """One ``edge-duet bench`` run. ``target``: a bundle or a checkpoint directory, or None with ``shape``."""

    cache_dir: Path
    target: Optional[Path] = None
    shape: Optional[str] = None
    checkpoint: Optional[Path] = None  # the transformers loops' and peers' checkpoint when target is a bundle
    variants: tuple[Path, ...] = ()
    quantize: tuple[str, ...] = ()  # recipes of `edge-duet quantize`, each a variant made into the cache
    providers: Optional[tuple[str, ...]] = None  # None: every provider this machine can start
    decoders: tuple[str, ...] = ("auto",)
    baseline: Optional[str] = None  # demo, kv, both, none; None: demo when the export extra is installed
    peers: tuple[str, ...] = ()
    peer_python: Optional[str] = None
    llama_cpp_src: Optional[str] = None
    turns: int = 200
    report_turns: tuple[int, ...] = (1, 10, 50, 200)
    frame_size: tuple[int, int] = (640, 480)
    reply_tokens: int = 32
    token_drop: float = 0.5
    drop_runs: bool = True
    max_context_tokens: Optional[int] = None
    threads: Optional[int] = None
    sequential: bool = False
    validate: bool = True
    window: int = 2


def run(req: BenchRequest, log: Callable[[str], None] = print) -> dict:
    """The whole report (JSON-ready), with the ratios between jobs under ``speedups``."""
    from edge_duet.manifest import Manifest

    if req.turns < max(req.report_turns):
        raise UsageError(f"`BenchRequest.turns` ({req.turns}) ends before the last of `BenchRequest.report_turns` "
                         f"({max(req.report_turns)})")
    has_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    baseline = req.baseline
    wanted = {"demo": ["demo"], "kv": ["kv"], "both": ["demo", "kv"], "none": [], None: ["demo"]}.get(baseline)
    if wanted is None:
        raise UsageError(f"`BenchRequest.baseline` must be demo, kv, both or none (got {baseline!r})")
    unknown = [p for p in req.peers if p not in PEERS]
    if unknown:
        raise UsageError(f"`BenchRequest.peers`: unknown peer {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    cache, n_turns = Path(req.cache_dir), req.turns

    ckpt, bundle = _resolve_target(req.target, req.shape, req.checkpoint, cache, req.validate, log)
    manifest = Manifest.load(bundle)
    variant = list(req.variants) + [_quantized(bundle, recipe, cache, log) for recipe in req.quantize]
    opts = BenchOptions(
        turns=n_turns, report_turns=req.report_turns, frame_size=req.frame_size, frames_per_turn=manifest.prompt.frames_per_turn,
        frame_interval_s=manifest.prompt.frame_interval_s, reply_turns=default_reply_turns(n_turns),
        reply_tokens=req.reply_tokens, max_context_tokens=req.max_context_tokens, threads=req.threads,
        window=req.window)
    provs = list(req.providers) if req.providers else usable_providers()
    drops = [None, req.token_drop] if req.drop_runs else [None]
    jobs = _edge_jobs([bundle, *variant], provs, drops, opts, list(req.decoders) or ["auto"])
    if wanted and not has_torch:
        if baseline is not None:
            raise UsageError('the transformers baseline needs the export extra: pip install "edge-duet[export]"')
        log('warning: transformers baseline skipped: it needs the export extra (pip install "edge-duet[export]")')
    elif wanted and ckpt is None:
        msg = (f"no checkpoint for the transformers baseline: {bundle} does not name an existing one; "
               "give `BenchRequest.checkpoint`")
        if baseline is not None:
            raise UsageError(msg)
        log(f"warning: baseline skipped: {msg}")
    else:
        jobs += [Job(f"transformers {kind}", "transformers",
                     {"checkpoint": str(ckpt), "options": asdict(opts), "rerender": BASELINES[kind],
                      "system_prompt": manifest.prompt.system_prompt, "no_reply_text": manifest.prompt.no_reply_text},
                     str(bundle)) for kind in wanted]
    if req.peers:
        from .peers import PeerSetup, peer_jobs

        jobs += peer_jobs(list(req.peers), PeerSetup(req.peer_python, req.llama_cpp_src, str(cache)),
                          str(ckpt) if ckpt else None, str(bundle), opts, manifest.prompt.system_prompt)
    target_info = {"name": req.shape or Path(req.target).name, "shape": req.shape, "bundle": str(bundle),
                   "checkpoint": str(ckpt) if ckpt else None, "variants": [str(v) for v in variant]}
    report = run_bench(jobs, opts, target_info, lockstep=not req.sequential, log=log)
    report["speedups"] = speedups(report["summaries"], report["jobs"])
    return report


def _edge_jobs(bundles: list[Path], providers: list[str], drops: list, opts, decoders=("auto",)) -> list:
    """One job per bundle x decoder flavour x provider x token-drop setting, named
    "edge VARIANT [FLAVOUR] [PROVIDER] [drop]" (a bundle without the flavour asked for fails in its job)."""
    from edge_duet.manifest import Manifest

    labels = [Manifest.load(b).variant for b in bundles]
    labels = [lab if labels.count(lab) == 1 or i == 0 else Path(b).name
              for i, (b, lab) in enumerate(zip(bundles, labels))]
    return [Job(" ".join(x for x in ("edge", lab, dec if len(decoders) > 1 else "",
                                     prov if len(providers) > 1 else "", "drop" if drop else "") if x),
                "edge",
                {"bundle": str(b), "options": asdict(opts), "provider": prov, "token_drop": drop, "decoder": dec},
                str(b), lab, prov, drop)
            for b, lab in zip(bundles, labels) for dec in decoders for prov in providers for drop in drops]


def default_reply_turns(turns: int) -> tuple[int, ...]:
    """Replies at turn 2 (decode speed on a short context) and 20, 60, 100, ... (away from the report turns
    1, 10, 50, 200); short runs reply at turn 2 and mid-run."""
    if turns >= 40:
        return (2, *range(20, turns + 1, 40))
    return tuple(sorted({2, turns // 2 + 1}))


def usable_providers() -> list[str]:
    """Short names (cpu, cuda, tensorrt) of the providers this onnxruntime has and this machine can start."""
    import onnxruntime as ort

    from edge_duet.runtime.engine import PROVIDER_NAMES, _cuda_device_present

    have = ort.get_available_providers()
    return [k for k, v in PROVIDER_NAMES.items() if v in have and (k == "cpu" or _cuda_device_present())]


def _quantized(bundle: Path, recipe: str, cache: Path, log: Callable[[str], None]) -> Path:
    """``bundle`` quantized with ``recipe`` by `edge-duet quantize`, made once into the cache."""
    import hashlib

    try:
        from edge_duet.quant.quantize import QuantOptions, quantize_bundle
    except ImportError as exc:
        raise UsageError(f"`BenchRequest.quantize` needs `edge-duet quantize`, which this install lacks ({exc}); "
                         "make the variant yourself and pass it in `BenchRequest.variants`") from exc
    key = hashlib.sha1((Path(bundle) / "manifest.json").read_bytes()).hexdigest()[:8]
    out = cache / "variants" / f"{Path(bundle).name}-{key}-{recipe.replace('=', '_').replace(',', '+')}"
    if not (out / "manifest.json").is_file():
        log(f"quantizing {bundle} with recipe {recipe} into {out} ...")
        quantize_bundle(bundle, out, recipe, QuantOptions(overwrite=True), log=log)
    return out


def _resolve_target(target: Optional[Path], shape: Optional[str], checkpoint: Optional[Path], cache: Path,
                    validate: bool, log: Callable[[str], None]) -> tuple[Optional[Path], Path]:
    """(checkpoint or None, bundle) for a bundle, a checkpoint, or a named shape."""
    from edge_duet.errors import require
    from edge_duet.manifest import Manifest

    if (target is None) == (shape is None):
        raise UsageError("give a bundle or checkpoint directory, or `BenchRequest.shape` (not both); e.g. "
                         "`edge-duet bench --shape bench` or `edge-duet bench ./bundle`")
    if shape is not None:
        require("torch", "export", "`BenchRequest.shape` (making and exporting a random checkpoint)")
        from .baseline import prepare_shape, shape_names

        if shape not in shape_names():
            raise UsageError(f"unknown shape {shape!r}; choose one of: {', '.join(shape_names())}")
        return prepare_shape(shape, cache, validate=validate, log=log)
    if (target / "manifest.json").is_file():
        if checkpoint is None:
            named = Manifest.load(target).export_info.get("checkpoint")
            checkpoint = Path(named) if named and (Path(named) / "config.json").is_file() else None
        return checkpoint, target
    if (target / "config.json").is_file():
        require("torch", "export", "Benchmarking a checkpoint (it is exported first)")
        from .baseline import prepare_checkpoint

        return target, prepare_checkpoint(target, cache, validate=validate, log=log)
    raise UsageError(f"{target} is neither a bundle (manifest.json) nor a checkpoint (config.json)")
