"""The peers of ``edge-duet bench``: onnxruntime-genai and llama.cpp on the same checkpoint and the same stream.

The peers live in their own Python environment (``--peer-python``, or ``EDGE_DUET_PEER_PYTHON``): onnxruntime-genai
brings its own onnxruntime, which must not replace the project's. Conversion runs here, in the bench's interpreter
(it has torch and transformers), with the peers' own converters: onnxruntime-genai's model builder (found in the
peers' environment) and llama.cpp's ``convert_hf_to_gguf.py`` (``--llama-cpp-src``, or ``EDGE_DUET_LLAMA_CPP_SRC``:
a llama.cpp source tree, e.g. llama-cpp-python's sdist's ``vendor/llama.cpp``; run by ``gguf_convert.py``). The converted models are kept in
the bench cache. Each peer's turns run in ``peer_worker.py`` under the peers' interpreter; this side renders the
turns (the same ids and resized frames edge-duet sees) and keeps the dialogue's closing ids.

A peer that cannot run this model here is reported as unavailable, with what failed: no interpreter, the package
not installed, the converter missing or failing on this checkpoint, or no multimodal path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_duet import isolate
from edge_duet.errors import PeerUnavailable

from .baseline import checkpoint_key
from .harness import Job
from .stream import BenchOptions, synthetic_frames

PEERS = ("onnxruntime-genai", "llama.cpp")
MODULES = {"onnxruntime-genai": "onnxruntime_genai", "llama.cpp": "llama_cpp"}
INSTALL = {"onnxruntime-genai": "pip install onnxruntime-genai", "llama.cpp": "pip install llama-cpp-python"}


@dataclass(frozen=True)
class PeerSetup:
    """Where the peers come from. ``python``: the peers' interpreter; ``llama_cpp_src``: a llama.cpp source tree
    (its GGUF converter); ``cache``: where converted models are kept."""

    python: str | None
    llama_cpp_src: str | None
    cache: str


def peer_jobs(names: list[str], setup: PeerSetup, checkpoint: str | None, bundle: str, opts: BenchOptions,
              system_prompt: str) -> list[Job]:
    return [Job(name, "peer", {"peer": name, "python": setup.python, "llama_cpp_src": setup.llama_cpp_src,
                               "cache": setup.cache, "checkpoint": checkpoint, "bundle": bundle,
                               "options": _plain(opts), "system_prompt": system_prompt}, bundle)
            for name in names]


def _plain(opts: BenchOptions) -> dict:
    return asdict(opts)


def start_peer(job: Job) -> "PeerJob":
    """The peer's job process, or :class:`PeerUnavailable` saying what is missing."""
    return PeerJob(job)


# ------------------------------------------------------------------------------------------- preparing


def _probe(python: str | None, peer: str) -> str:
    """The peer package's folder in the peers' interpreter; PeerUnavailable if there is none."""
    if not python:
        raise PeerUnavailable("no peer interpreter: pass --peer-python PATH (a venv holding "
                              f"{INSTALL[peer].split()[-1]}) or set EDGE_DUET_PEER_PYTHON")
    if not Path(python).is_file():
        raise PeerUnavailable(f"peer interpreter {python} not found")
    mod = MODULES[peer]
    code = f"import {mod}, os; print(os.path.dirname({mod}.__file__))"
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"peer interpreter {python} does not run: {exc}") from exc
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        raise PeerUnavailable(f"not installed: {python} cannot import {mod} ({last}); {INSTALL[peer]} there")
    return out.stdout.strip().splitlines()[-1]


def _convert(cmd: list[str], out: Path, what: str) -> None:
    """Run a converter once into ``out`` (kept when it succeeded); PeerUnavailable with its last lines if not."""
    if (out / ".done").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = (proc.stdout + proc.stderr).strip()
    (out / "convert.log").write_text(log + "\n")
    if proc.returncode != 0:
        tail = " | ".join(ln.strip() for ln in log.splitlines()[-3:])
        raise PeerUnavailable(f"cannot convert this model ({what}, exit {proc.returncode}): {tail}")
    (out / ".done").write_text("")


def prepare_ort_genai(checkpoint: str, package_dir: str, cache: Path, threads: int | None) -> Path:
    """onnxruntime-genai's model builder on the checkpoint (fp32, CPU): its text decoder and genai_config.json."""
    out = cache / "peers" / f"ort-genai-{checkpoint_key(checkpoint)}"
    builder = Path(package_dir) / "models" / "builder.py"
    if not builder.is_file():
        raise PeerUnavailable(f"cannot convert this model: onnxruntime-genai's model builder is not at {builder}")
    _convert([sys.executable, str(builder), "-m", checkpoint, "-o", str(out), "-p", "fp32", "-e", "cpu",
              "-c", str(out / "hf-cache")], out, "onnxruntime-genai model builder")
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    opts = cfg["model"]["decoder"].setdefault("session_options", {})
    opts["intra_op_num_threads"] = threads or os.cpu_count() or 1
    opts["inter_op_num_threads"] = 1
    cfg_path.write_text(json.dumps(cfg, indent=4))
    return out


def prepare_llama_cpp(checkpoint: str, src: str | None, cache: Path) -> tuple[Path, Path]:
    """llama.cpp's converter on the checkpoint: the text model and the multimodal projector, both f32 GGUF."""
    if not src:
        raise PeerUnavailable("cannot convert this model: no GGUF converter; pass --llama-cpp-src DIR (a llama.cpp "
                              "source tree with convert_hf_to_gguf.py) or set EDGE_DUET_LLAMA_CPP_SRC")
    script = Path(src) / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise PeerUnavailable(f"cannot convert this model: {script} not found")
    out = cache / "peers" / f"gguf-{checkpoint_key(checkpoint)}"
    text, mmproj = out / "model-f32.gguf", out / "mmproj-f32.gguf"
    convert = [sys.executable, "-m", "edge_duet.bench.gguf_convert", str(src), checkpoint, "--outtype", "f32"]
    _convert([*convert, "--outfile", str(text)], out / "text", "convert_hf_to_gguf.py")
    _convert([*convert, "--mmproj", "--outfile", str(mmproj)], out / "mmproj",
             "convert_hf_to_gguf.py --mmproj: no multimodal path without it")
    return text, mmproj


# ------------------------------------------------------------------------------------------- the job


class PeerJob:
    """The parent's side of one peer job, with :class:`edge_duet.isolate.Worker`'s interface (``info``,
    ``call("turn", n)``, ``close()``, ``kill()``): renders each turn and sends it to the peer's process."""

    def __init__(self, job: Job):
        from tokenizers import Tokenizer

        from edge_duet.manifest import Manifest
        from edge_duet.runtime.chat import ChatRenderer
        from edge_duet.runtime.preprocess import resize_frame

        a = job.args
        peer = a["peer"]
        package_dir = _probe(a["python"], peer)
        if not a["checkpoint"]:
            raise PeerUnavailable("cannot convert this model: no checkpoint (pass --checkpoint for a bundle)")
        self.opts = BenchOptions.from_dict(a["options"])
        cache = Path(a["cache"])
        manifest = Manifest.load(a["bundle"])
        self.manifest = manifest
        tokenizer = Tokenizer.from_file(str(Path(a["bundle"]) / manifest.tokenizer))
        self.renderer = ChatRenderer(tokenizer, manifest.tokens, manifest.vision.merge_size)
        # The KV buffers of genai and llama.cpp are allocated up front: the whole stream's tokens, with room.
        frame = resize_frame(synthetic_frames(1, self.opts)[0], manifest.preprocess, channels="rgb")
        per_frame = frame.width * frame.height // (manifest.preprocess.patch_size * manifest.vision.merge_size) ** 2
        max_length = self.opts.turns * (self.opts.frames_per_turn * (per_frame + 2) + 48 + self.opts.reply_tokens)
        max_length += 1024
        cfg = {"peer": peer, "threads": self.opts.threads or os.cpu_count() or 1, "max_length": max_length,
               "reply_tokens": self.opts.reply_tokens,
               "script": (tuple(self.renderer.text_ids(manifest.prompt.no_reply_text)), manifest.tokens.im_end,
                          tuple(manifest.tokens.eos_ids), tokenizer.get_vocab_size(with_added_tokens=True))}
        if peer == "onnxruntime-genai":
            cfg["model_dir"] = str(prepare_ort_genai(a["checkpoint"], package_dir, cache, self.opts.threads))
        else:
            text, mmproj = prepare_llama_cpp(a["checkpoint"], a["llama_cpp_src"], cache)
            cfg.update(gguf=str(text), mmproj=str(mmproj))
        script = Path(__file__).with_name("peer_worker.py")
        env = {**os.environ, **{v: str(cfg["threads"]) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}
        env.pop("PYTHONPATH", None)
        try:
            self.worker = isolate.Worker(None, cfg, what=f"job {job.name!r}", argv=[a["python"], str(script)],
                                         env=env)
        except Exception as exc:  # noqa: BLE001 - the peer's own error, with its name
            raise PeerUnavailable(f"{peer} cannot run this model: {exc}") from exc
        self.info = self.worker.info
        self.pending = list(self.renderer.system(a["system_prompt"]))

    def call(self, method: str, n: int) -> dict:
        """``turn(n)``: the turn rendered as edge-duet renders it, fed to the peer, the closing ids kept."""
        from edge_duet.runtime.chat import ImagePiece, TextPiece
        from edge_duet.runtime.preprocess import resize_frame

        o = self.opts
        frames = synthetic_frames(n, o)  # made before the clock starts, as for the other jobs
        t0 = time.perf_counter()
        images = [resize_frame(f, self.manifest.preprocess, channels="rgb") for f in frames]
        p = self.manifest.preprocess.patch_size
        grids = [(1, im.height // p, im.width // p) for im in images]
        pieces = self.pending + self.renderer.user(grids, o.question if n == 1 else None) + \
            self.renderer.assistant_start()
        wire, k = [], 0
        for piece in pieces:
            if isinstance(piece, ImagePiece):
                im = images[k]
                k += 1
                wire.append(("image", {"rgb": im.tobytes(), "shape": (im.height, im.width, 3),
                                       "num_tokens": piece.num_tokens, "pad_id": piece.pad_id}))
            elif wire and wire[-1][0] == "text":
                wire[-1] = ("text", wire[-1][1] + tuple(piece.ids))
            else:
                wire.append(("text", tuple(piece.ids)))
        render_s = time.perf_counter() - t0
        reply = n in o.reply_turns
        rec = self.worker.call(method, wire, reply)
        generated = rec.pop("generated")
        last = generated[-1]
        closing = ([last] if last not in self.manifest.tokens.eos_ids else []) + [self.manifest.tokens.im_end]
        self.pending = [TextPiece(tuple(closing) + self.renderer.assistant_end()[0].ids[1:])]
        rec.update(turn=n, kind="reply" if reply else "silent", render_s=render_s,
                   total_s=rec["total_s"] + render_s)
        if reply:
            rec["ttft_s"] += render_s
        return rec

    def close(self) -> int | None:
        return self.worker.close()

    def kill(self) -> None:
        self.worker.kill()
