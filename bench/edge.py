"""The edge-duet job of ``edge-duet bench``: a :class:`Session` over a bundle, its decoder's logits following the
bench script (``stream.Script``), driven turn by turn from the bench's job process."""

from __future__ import annotations

import time

import numpy as np

from edge_duet.runtime.engine import Engine
from edge_duet.runtime.events import Evicted, TurnStats
from edge_duet.runtime.session import Session, SessionOptions

from .stream import BenchOptions, Script, synthetic_frames


class ScriptedEngine(Engine):
    """An :class:`Engine` whose decoder logits follow the bench script. Rows are told apart by the logits index
    the session asks for: a row before the last new token verifies a speculated ``NO REPLY`` (confirm it), a
    one-token call continues a reply, the last row of a prefill is the turn's decision. Only the live
    context's calls are scripted: the session's re-anchoring prefills a second context through the same engine
    (``live()`` returns the cache of the context whose logits decide the turn)."""

    script: Script | None = None
    live = None  # () -> the live context's cache; set once the session exists
    reply = False
    steps = 0  # one-token calls: decoded reply tokens
    top = -1  # the model's own choice at the last decision, before the script acted

    def decode(self, embeds, positions, cache, logits_index=None):
        live = self.live is None or cache is self.live()
        logits, cache = super().decode(embeds, positions, cache, logits_index)
        if self.script is None or not live:
            return logits, cache
        s = embeds.shape[0]
        index = [s - 1] if logits_index is None else list(logits_index)
        spec = self.script.silence
        for row, i in zip(logits, index):
            if i < s - 1:
                if i + 1 < len(spec):
                    self.script.force(row, spec[i + 1])
            elif s == 1:
                self.script.ban(row, first=False)
                self.steps += 1
            else:
                self.top = int(np.argmax(row))
                if self.reply:
                    self.script.ban(row, first=True)
                else:
                    self.script.force(row, spec[0])
        return logits, cache


class EdgeRunner:
    """One edge-duet job: a :class:`Session` over ``bundle`` driven turn by turn in the job's process."""

    def __init__(self, bundle: str, options: dict, provider: str = "cpu", token_drop: float | None = None,
                 decoder: str = "auto"):
        self.opts = BenchOptions.from_dict(options)
        t0 = time.perf_counter()
        engine = ScriptedEngine(bundle, providers=provider, threads=self.opts.threads, decoder=decoder)
        self.session = Session(bundle, SessionOptions(
            max_new_tokens=self.opts.reply_tokens, max_context_tokens=self.opts.max_context_tokens,
            token_drop_threshold=token_drop, providers=provider, threads=self.opts.threads, decoder=decoder),
            engine=engine)
        m = self.session.manifest
        engine.script = Script(tuple(self.session.renderer.text_ids(m.prompt.no_reply_text)), m.tokens.im_end,
                               tuple(m.tokens.eos_ids), self.session.tokenizer.get_vocab_size(with_added_tokens=True))
        engine.live = lambda: self.session.context.cache
        self.engine = engine
        self.info = {"load_s": time.perf_counter() - t0, "providers": engine.sessions["decoder"].get_providers(),
                     "decoder": engine.flavour,
                     "max_context_tokens": self.session.max_context_tokens}

    def turn(self, n: int) -> dict:
        s, o = self.session, self.opts
        reply = n in o.reply_turns
        self.engine.reply = reply
        frames = synthetic_frames(n, o)
        p_before, pending, steps = s.cache.length, s.context_tokens - s.cache.length, self.engine.steps
        t0 = time.perf_counter()
        if n == 1:
            s.ask(o.question)
        s.add_frames(frames, t=n * o.frames_per_turn * o.frame_interval_s, channels="rgb")
        t1 = time.perf_counter()
        evict_s, st = 0.0, None
        for ev in s.step():
            if isinstance(ev, Evicted):
                evict_s += ev.reprefill_s
            elif isinstance(ev, TurnStats):
                st = ev
        total = time.perf_counter() - t0
        rec = {"turn": n, "kind": "reply" if reply else "silent", "total_s": total, "render_s": t1 - t0,
               "vision_s": st.vision_s, "prefill_s": st.prefill_s, "decode_s": st.decode_s, "evict_s": evict_s,
               "calls": st.decoder_calls, "prefill_tokens": pending + st.new_tokens, "cache_before": p_before,
               "cache_after": s.cache.length, "kept": st.visual_tokens_kept, "dropped": st.visual_tokens_dropped,
               "top": self.engine.top,
               # the rest of the step: the re-anchoring of the kept window, spread over the turns before an
               # eviction (no stall when it comes), and the bookkeeping
               "other_s": max(total - (t1 - t0) - st.vision_s - st.prefill_s - st.decode_s - evict_s, 0.0)}
        if reply:
            rec["ttft_s"] = (t1 - t0) + evict_s + st.vision_s + st.prefill_s
            rec["decode_tokens"] = self.engine.steps - steps
        return rec
