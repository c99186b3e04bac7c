"""A random-weight checkpoint nudged to say ``NO`` often, and ``NO`` → `` REPLY`` → ``<|im_end|>`` often but not
always, so the runtime's speculated silence is confirmed on most turns and rolled back on some.

Only the untied lm_head rows of those three tokens change: each gets a direction along which the final hidden
states of the relevant positions lie, scaled (by bisection) until the token is the argmax at about the wanted
share of sample positions. Hidden states do not depend on lm_head, so the calibration is exact for the samples.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from edge_duet.export.checkpoint import load_model, make_checkpoint
from edge_duet.protocol import DEMO_SYSTEM_PROMPT
from edge_duet.export.reference import TorchReference
from edge_duet.manifest import PreprocessSpec, TokenSpec
from edge_duet.protocol import ProactiveDefaults
from edge_duet.runtime.chat import ChatRenderer, render_ids
from edge_duet.runtime.preprocess import preprocess_frame


def token_spec(tok: Tokenizer) -> TokenSpec:
    g = tok.token_to_id
    return TokenSpec(im_start=g("<|im_start|>"), im_end=g("<|im_end|>"), vision_start=g("<|vision_start|>"),
                     vision_end=g("<|vision_end|>"), image_pad=g("<|image_pad|>"), video_pad=g("<|video_pad|>"),
                     endoftext=g("<|endoftext|>"), eos_ids=(g("<|im_end|>"), g("<|endoftext|>")))


def preprocess_spec(ckpt: Path) -> PreprocessSpec:
    import json

    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    return PreprocessSpec(min_pixels=pre["min_pixels"], max_pixels=pre["max_pixels"], patch_size=14, merge_size=2,
                          temporal_patch_size=2, image_mean=tuple(pre["image_mean"]), image_std=tuple(pre["image_std"]))


def random_frames(rng: np.random.Generator, n: int, sizes=((56, 84), (84, 56), (70, 70), (112, 84))) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        h, w = sizes[int(rng.integers(len(sizes)))]
        out.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    return out


def dialogue_script(seed: int, turns: int) -> list[tuple[list[np.ndarray], str | None, bool, float]]:
    """A dialogue to play turn by turn: (2 frames of several sizes, question or None, must_reply, time) per turn;
    questions in some turns, must-reply in a few."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(turns):
        q = None
        if k % 5 == 2:
            q = "What is in the picture?" if k % 10 == 2 else "Tell me when it changes."
        out.append((random_frames(rng, 2), q, q is not None and k % 3 == 0, 2.0 * (k + 1)))
    return out


def make_chatty_checkpoint(out: Path, shape: str = "tiny-mha", seed: int = 0, p_no: float = 0.65,
                           p_reply: float = 0.75, p_end: float = 0.75, samples: int = 5, turns: int = 12) -> Path:
    # calibrated for the prompt it carries (the short demo prompt: a calibration holds for one prompt only)
    ckpt = make_checkpoint(out, shape, seed=seed, init_std=0.1, proactive=ProactiveDefaults(system_prompt=DEMO_SYSTEM_PROMPT))
    model, _ = load_model(ckpt)
    if model.config.tie_word_embeddings:
        raise ValueError("calibration needs an untied lm_head")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    spec = token_spec(tok)
    r = ChatRenderer(tok, spec)
    pre = preprocess_spec(ckpt)
    no = r.text_ids("NO REPLY")
    assert len(no) == 2, no
    ref = TorchReference(model, spec.image_pad)
    rng = np.random.default_rng(seed)
    h_end, h_no, h_reply = [], [], []
    key = 0
    for _ in range(samples):
        ids = render_ids(r.system(DEMO_SYSTEM_PROMPT))  # the prompt its proactive.json gives the bundle
        frames = []
        for k in range(turns):
            fr = [preprocess_frame(f, pre, channels="rgb") for f in random_frames(rng, 2)]
            for p, g in fr:
                frames.append((key, p, g))
                key += 1
            ids += render_ids(r.user([g for _, g in fr], "What is it?" if rng.random() < 0.2 else None))
            ids += render_ids(r.assistant_start())
            n = len(ids)
            hid = ref.forward(ids + no, frames, rows=[n - 1, n, n + 1]).hidden
            h_end.append(hid[0])
            h_no.append(hid[1])
            h_reply.append(hid[2])
            # histories like the runtime's: mostly silence, sometimes a (random) reply
            said = no if rng.random() < 0.7 else [int(i) for i in rng.integers(0, spec.endoftext, 4)]
            ids += said + [spec.im_end] + list(r.assistant_end()[0].ids[1:])
    weight = model.lm_head.weight.data
    for row, hs, share in ((no[0], h_end, p_no), (no[1], h_no, p_reply), (spec.im_end, h_reply, p_end)):
        _tune(weight, row, torch.stack(hs), share)
    model.save_pretrained(ckpt, safe_serialization=True)
    return ckpt


def _tune(weight: torch.Tensor, row: int, hs: torch.Tensor, share: float) -> None:
    u = hs.mean(0)
    u = u / u.norm()
    base = weight[row].clone()
    lo, hi = -50.0, 50.0
    for _ in range(40):
        mid = (lo + hi) / 2
        weight[row] = base + mid * u
        frac = float(((hs @ weight.T).argmax(-1) == row).float().mean())
        lo, hi = (mid, hi) if frac < share else (lo, mid)
    weight[row] = base + hi * u
