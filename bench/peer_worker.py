"""A peer runtime's job process for ``edge-duet bench``, run by the peers' own interpreter (a separate venv, so
that onnxruntime-genai's own onnxruntime never replaces the project's): ``PEER_PYTHON bench/peer_worker.py``.

It imports the standard library, numpy, the peer's package and ``stream.py`` from this folder (numpy only: the
bench script), nothing else of edge-duet: the peers' venv does not have it. The parent (``peers.py``) renders
each turn into pieces (text ids, or a frame already resized to the model's pixel budget) and this process feeds
them the way the peer is used: KV cache kept across turns, a generate loop after each turn (one call per token, so
a silent turn costs one call per token of ``NO REPLY<|im_end|>``, as in the transformers loops).

Wire: :mod:`edge_duet.isolate`'s (8-byte big-endian length, then a pickle) over stdin/stdout. First message: the
config dict; then ``("turn", (pieces, reply))`` until ``None`` (answered with the peak RSS in bytes).
"""

from __future__ import annotations

import ctypes
import os
import pickle
import struct
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream import Script  # noqa: E402  (numpy only; this file runs outside the edge_duet package)


def _send(out, obj) -> None:
    data = pickle.dumps(obj, protocol=4)
    out.write(struct.pack(">Q", len(data)) + data)
    out.flush()


def _receive(inp):
    head = inp.read(8)
    if len(head) < 8:
        raise EOFError
    return pickle.loads(inp.read(struct.unpack(">Q", head)[0]))


def _peak_rss_bytes() -> int | None:
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.exists() else []
    hwm = [ln.split()[1] for ln in lines if ln.startswith("VmHWM:")]
    return int(hwm[0]) * 1024 if hwm else None


class OrtGenaiPeer:
    """onnxruntime-genai over the text decoder its model builder made from the checkpoint (GroupQueryAttention
    with a KV buffer shared between past and present, MRotaryEmbedding). No vision: its Qwen2.5-VL pipeline needs
    a vision graph taking (pixel_values, image_grid_thw) that the builder does not make, so a frame enters as its
    ``<|image_pad|>`` ids (the decoder's work per token is the same) and vision time is not counted."""

    def __init__(self, cfg: dict):
        import onnxruntime_genai as og

        config = og.Config(cfg["model_dir"])
        config.clear_providers()
        self.model = og.Model(config)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=cfg["max_length"], do_sample=False)
        self.generator = og.Generator(self.model, params)
        self.info = {"peer": "onnxruntime-genai", "version": og.__version__, "vision": "not run (see notes)"}
        self.tokens = 0

    def feed(self, pieces) -> tuple[np.ndarray, float, int]:
        ids = []
        for kind, value in pieces:
            ids += list(value) if kind == "text" else [value["pad_id"]] * value["num_tokens"]
        self.generator.append_tokens(ids)
        self.tokens += len(ids)
        return self.generator.get_logits()[0, -1].astype(np.float32), 0.0, len(ids)

    def step(self, token: int) -> np.ndarray:
        self.generator.append_tokens([token])
        self.tokens += 1
        return self.generator.get_logits()[0, -1].astype(np.float32)


class LlamaCppPeer:
    """llama.cpp through llama-cpp-python: the GGUF its converter made from the checkpoint, frames through mtmd
    (the multimodal projector GGUF, Qwen2.5-VL's vision tower and merger) into the same context, M-RoPE positions
    advanced by mtmd (``n_past`` in, ``new_n_past`` out)."""

    def __init__(self, cfg: dict):
        import llama_cpp
        from llama_cpp import mtmd_cpp

        self.lc, self.mtmd = llama_cpp, mtmd_cpp
        # mtmd and clip log every image at INFO to stderr; the bench's own report says what they would
        self._quiet = llama_cpp.llama_log_callback(lambda level, text, user: None)
        mtmd_cpp.mtmd_helper_log_set(self._quiet, None)
        threads = cfg["threads"]
        self.llm = llama_cpp.Llama(model_path=cfg["gguf"], n_ctx=cfg["max_length"], n_batch=2048, n_ubatch=512,
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = threads
        self.ctx = mtmd_cpp.mtmd_init_from_file(cfg["mmproj"].encode(), self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"mtmd could not load the projector {cfg['mmproj']}")
        if not mtmd_cpp.mtmd_support_vision(self.ctx):
            raise RuntimeError(f"{cfg['mmproj']} has no vision support")
        self.marker = mtmd_cpp.mtmd_default_marker()
        self._no_callback = ctypes.cast(None, mtmd_cpp.mtmd_helper_post_decode_callback)  # NULL: none
        self.n_vocab = self.llm.n_vocab()
        self.info = {"peer": "llama.cpp", "version": llama_cpp.__version__, "vision": "mtmd"}

    def _logits(self) -> np.ndarray:
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).copy()

    def _image(self, value: dict) -> tuple[float, int]:
        """Encode one frame with mtmd and decode its embeddings at the current position."""
        m = self.mtmd
        h, w = value["shape"][:2]
        data = (ctypes.c_uint8 * len(value["rgb"])).from_buffer_copy(value["rgb"])
        bitmap = m.mtmd_bitmap_init(w, h, data)
        chunks = m.mtmd_input_chunks_init()
        text = m.mtmd_input_text()
        text.text = self.marker
        text.text_len = len(self.marker)
        text.add_special = False
        text.parse_special = True
        try:
            arr = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if m.mtmd_tokenize(self.ctx, chunks, ctypes.byref(text), arr, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed on a frame")
            vision_s, n_tokens = 0.0, 0
            for i in range(m.mtmd_input_chunks_size(chunks)):
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue  # <|vision_start|>/<|vision_end|>: the parent's pieces carry them
                t0 = time.perf_counter()
                if m.mtmd_encode_chunk(self.ctx, chunk) != 0:
                    raise RuntimeError("mtmd_encode_chunk failed")
                vision_s += time.perf_counter() - t0
                embd = m.mtmd_get_output_embd(self.ctx)
                new_n_past = self.lc.llama_pos(0)
                if m.mtmd_helper_decode_image_chunk(self.ctx, self.llm._ctx.ctx, chunk, embd, self.llm.n_tokens, 0,
                                                    self.llm.n_batch, ctypes.byref(new_n_past), self._no_callback,
                                                    None) != 0:
                    raise RuntimeError("mtmd_helper_decode_image_chunk failed")
                n_tokens += m.mtmd_input_chunk_get_n_tokens(chunk)
                self.llm.n_tokens = new_n_past.value
            return vision_s, n_tokens
        finally:
            m.mtmd_input_chunks_free(chunks)
            m.mtmd_bitmap_free(bitmap)

    def feed(self, pieces) -> tuple[np.ndarray, float, int]:
        vision_s, n = 0.0, 0
        for kind, value in pieces:
            if kind == "text":
                self.llm.eval(list(value))
                n += len(value)
            else:
                v, k = self._image(value)
                vision_s += v
                n += k
        if pieces[-1][0] != "text":
            raise RuntimeError("a turn must end with text ids (the assistant header)")
        return self._logits(), vision_s, n

    def step(self, token: int) -> np.ndarray:
        self.llm.eval([token])
        return self._logits()


PEERS = {"onnxruntime-genai": OrtGenaiPeer, "llama.cpp": LlamaCppPeer}


class Runner:
    def __init__(self, cfg: dict):
        t0 = time.perf_counter()
        self.peer = PEERS[cfg["peer"]](cfg)
        self.script = Script(*cfg["script"])
        self.reply_tokens = cfg["reply_tokens"]
        self.context = 0
        self.info = {**self.peer.info, "load_s": time.perf_counter() - t0}

    def turn(self, pieces, reply: bool) -> dict:
        s = self.script
        t0 = time.perf_counter()
        logits, vision_s, n = self.peer.feed(pieces)
        t1 = time.perf_counter()
        top = int(np.argmax(logits))
        generated: list[int] = []
        while True:
            token = s.pick(logits, len(generated), reply)
            generated.append(token)
            if token in s.eos or len(generated) >= self.reply_tokens:
                break
            logits = self.peer.step(token)
        t2 = time.perf_counter()
        before = self.context
        self.context += n + len(generated) - 1  # the last generated token is fed with the next turn
        rec = {"total_s": t2 - t0, "vision_s": vision_s, "prefill_s": t1 - t0 - vision_s, "decode_s": t2 - t1,
               "calls": len(generated), "prefill_tokens": n, "cache_before": before, "cache_after": self.context,
               "top": top, "generated": generated}
        if reply:
            rec["ttft_s"] = t1 - t0
            rec["decode_tokens"] = len(generated) - 1
        return rec


def main() -> None:
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # the libraries' prints go to stderr; stdout carries only the protocol
    runner = None
    while True:
        try:
            msg = _receive(inp)
        except EOFError:
            return
        if msg is None:
            _send(out, (True, _peak_rss_bytes()))
            return
        try:
            if runner is None:
                runner = Runner(msg)
                answer = (True, runner.info)
            else:
                method, args = msg
                answer = (True, getattr(runner, method)(*args))
        except BaseException as exc:  # noqa: BLE001 - the parent reports it under the job's name
            _send(out, (False, RuntimeError(f"{type(exc).__name__}: {exc}")))
            return
        _send(out, answer)


if __name__ == "__main__":
    main()
