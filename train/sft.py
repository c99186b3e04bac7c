"""Supervised multi-turn training of the demo model: a small, real ``Qwen2_5_VLForConditionalGeneration``.

The recipe that worked in TRAINING-NOTES.md: loss on every assistant turn (``NO REPLY`` included), the reply
decision token weighted x2, an auxiliary linear head on the last hidden state at every ``<|image_pad|>`` (what is
in that cell and what just happened there; used only in training, kept in ``training/aux_head.pt`` for
``--init-from`` and never exported), and a curriculum of short dialogues (6 turns) for the first third of the
budget, then full-length ones.

    make_checkpoint(random init, fitted tokenizer) -> from_pretrained -> train (steps or minutes) -> save_pretrained
                                                                            |-> eval_dialogues (greedy, every ~quarter)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_duet.eval import benchmark as bm
from edge_duet.export.checkpoint import CheckpointShape, ProactiveDefaults, make_checkpoint, shape_from_name
from edge_duet.export.tokenizer import DEMO_SYSTEM_PROMPT, build_tokenizer

from . import data as td

# ~2.5 M parameters: text 192 hidden x 4 layers, vision 128 hidden x 2 blocks. Frames are 112x112 (16 tokens).
DEMO_SHAPE = CheckpointShape(
    hidden_size=192, num_layers=4, num_attention_heads=6, num_kv_heads=2, intermediate_size=512, vocab_size=0,
    mrope_section=(4, 6, 6), max_position_embeddings=4096, vision_depth=2, vision_hidden_size=128,
    vision_num_heads=4, vision_intermediate_size=256, vision_window_size=112, fullatt_block_indexes=(1,),
    min_pixels=td.MODEL_SIDE ** 2, max_pixels=td.MODEL_SIDE ** 2,
)


@dataclass(frozen=True)
class TrainOptions:
    minutes: float = 45.0  # training-time budget, used when steps == 0
    steps: int = 0  # > 0: exactly this many steps (reproducible whatever the machine's load)
    seed: int = 0
    init_from: Path | None = None  # continue from this checkpoint (with its training/aux_head.pt) instead
    shape: str = "demo"  # "demo" or a name in export.checkpoint.SHAPES (for fast tests)
    batch_size: int = 4
    lr: float = 2e-3
    warmup_steps: int = 60
    decision_weight: float = 2.0
    aux_weight: float = 1.0
    short_fraction: float = 0.35  # share of the time budget on 6-turn dialogues
    short_duration_s: float = 12.0
    eval_every_fraction: float = 0.25  # 0 disables evaluation during training
    eval_dialogues: int = 8
    eval_seed: int = 999_999
    vocab_size: int = 512
    threads: int = 2
    progress: bool = True


@dataclass
class TrainResult:
    checkpoint: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)


class AuxHead:
    """Linear heads on hidden states at visual tokens: colour, shape, event of the token's cell."""

    def __init__(self, hidden: int):
        import torch

        self.linear = torch.nn.Linear(hidden, td.N_COLOUR + td.N_SHAPE + td.N_EVENT)

    def loss(self, h, cells):
        import torch.nn.functional as F

        z = self.linear(h)
        a, b = td.N_COLOUR, td.N_COLOUR + td.N_SHAPE
        # Events are rare (most cells: "none"): weight them up so the head cannot ignore them.
        ev_w = z.new_tensor([0.3] + [3.0] * (td.N_EVENT - 1))
        return (F.cross_entropy(z[:, :a], cells[:, 0]) + 1.5 * F.cross_entropy(z[:, a:b], cells[:, 1])
                + 1.5 * F.cross_entropy(z[:, b:], cells[:, 2], weight=ev_w))


def resolve_shape(name: str) -> CheckpointShape:
    side = td.MODEL_SIDE ** 2
    if name == "demo":
        return DEMO_SHAPE
    return replace(shape_from_name(name), min_pixels=side, max_pixels=side, vocab_size=0)


def init_checkpoint(out_dir: Path, opts: TrainOptions) -> Path:
    tok = build_tokenizer(td.corpus_lines(), opts.vocab_size)
    proactive = ProactiveDefaults(
        system_prompt=DEMO_SYSTEM_PROMPT, frame_interval_s=1.0, frames_per_turn=2, max_context_tokens=2048,
        extra={"trained_by": "edge-duet train-demo", "seed": opts.seed, "frame_side_px": td.MODEL_SIDE},
    )
    return make_checkpoint(out_dir, resolve_shape(opts.shape), seed=opts.seed, tokenizer=tok, proactive=proactive)


def positions(model, batch):
    """M-RoPE position ids (3, B, L) from the model's own get_rope_index."""
    pos, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"],
                                        attention_mask=batch["attention_mask"])
    return pos


def batch_loss(model, aux: AuxHead, batch, aux_weight: float):
    import torch.nn.functional as F

    out = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=positions(model, batch), pixel_values=batch["pixel_values"],
                      image_grid_thw=batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"],
                      use_cache=False)
    h = out.last_hidden_state  # (B, L, hidden)
    labels, weights = batch["labels"][:, 1:], batch["weights"][:, 1:]
    sel = labels != -100
    logits = model.lm_head(h[:, :-1][sel])  # only the labelled positions: (n, vocab)
    ce = F.cross_entropy(logits, labels[sel], reduction="none")
    w = weights[sel]
    text_loss = (ce * w).sum() / w.sum()
    vis = h[batch["mm_token_type_ids"].bool()]  # (B*F*16, hidden) in frame order
    aux_loss = aux.loss(vis, batch["cells"])
    return text_loss + aux_weight * aux_loss, text_loss.item(), aux_loss.item()


def make_batch(encoder: td.DialogueEncoder, rng: np.random.Generator, size: int, short: bool):
    items = []
    for _ in range(size):
        duration = 12.0 if short else float(bm.DURATIONS_S[int(rng.integers(len(bm.DURATIONS_S)))])
        ex = td.random_example(rng, duration, encoder.clock)
        items.append(encoder.encode(ex, td.random_system_prompt(rng), rng))
    return td.collate(items, encoder.pad_id, encoder.image_pad)


def train(out_dir: str | Path, opts: TrainOptions = TrainOptions(), log=print) -> TrainResult:
    """Create a random checkpoint in ``out_dir`` (or copy ``opts.init_from`` there), train it for ``opts.steps``
    steps or else ``opts.minutes`` of training time, save it back in place (also at every evaluation)."""
    import shutil

    import torch
    from tokenizers import Tokenizer

    from edge_duet.export.checkpoint import load_model

    torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    out = Path(out_dir)
    if opts.init_from is not None:
        if Path(opts.init_from).resolve() != out.resolve():
            shutil.copytree(opts.init_from, out, dirs_exist_ok=True)
    else:
        init_checkpoint(out, opts)
    model, _ = load_model(out)
    model.train()
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    encoder = td.DialogueEncoder(tok, decision_weight=opts.decision_weight)
    aux = AuxHead(model.config.text_config.hidden_size)
    aux_path = out / "training" / "aux_head.pt"
    if opts.init_from is not None and aux_path.is_file():
        aux.linear.load_state_dict(torch.load(aux_path))
    params = list(model.parameters()) + list(aux.linear.parameters())
    optim = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01, betas=(0.9, 0.98))
    rng = np.random.default_rng([opts.seed, 7_700_001])
    eval_set = eval_examples(opts.eval_seed, opts.eval_dialogues)
    short_fraction = 0.0 if opts.init_from is not None else opts.short_fraction
    budget = float(opts.steps) if opts.steps > 0 else opts.minutes * 60.0
    result = TrainResult(out, 0, 0.0)
    next_eval = opts.eval_every_fraction
    bar = None
    if opts.progress:
        from tqdm import tqdm

        unit = "step" if opts.steps > 0 else "s"
        bar = tqdm(total=int(budget), unit=unit, desc="train-demo", dynamic_ncols=True, mininterval=2.0)
    start = time.monotonic()
    eval_time = 0.0
    while True:
        elapsed = time.monotonic() - start - eval_time  # a time budget counts training, not evaluation
        frac = (result.steps if opts.steps > 0 else elapsed) / budget
        if frac >= 1.0:
            break
        if opts.eval_every_fraction > 0 and frac >= next_eval and opts.eval_dialogues:
            t0 = time.monotonic()
            result.evals.append({"step": result.steps, **evaluate(model, encoder, eval_set)})
            log(f"eval @ step {result.steps}: {json.dumps(result.evals[-1])}")
            save(model, aux, out)
            eval_time += time.monotonic() - t0
            next_eval += opts.eval_every_fraction
            model.train()
        warm = min(1.0, (result.steps + 1) / opts.warmup_steps)
        lr = opts.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in optim.param_groups:
            g["lr"] = lr
        batch = make_batch(encoder, rng, opts.batch_size, short=frac < short_fraction)
        loss, text_loss, aux_loss = batch_loss(model, aux, batch, opts.aux_weight)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        result.steps += 1
        result.losses.append(text_loss)
        if result.steps % 20 == 0:
            recent = float(np.mean(result.losses[-20:]))
            log(f"step {result.steps} t={elapsed:.0f}s lr={lr:.2e} text={recent:.4f} aux={aux_loss:.4f}")
        if bar is not None:
            bar.n = min(result.steps if opts.steps > 0 else int(elapsed), int(budget))
            bar.set_postfix(step=result.steps, loss=f"{text_loss:.3f}", aux=f"{aux_loss:.3f}", refresh=False)
            bar.refresh()
    if bar is not None:
        bar.close()
    result.seconds = time.monotonic() - start
    model.eval()
    if opts.eval_dialogues and opts.eval_every_fraction > 0:
        result.evals.append({"step": result.steps, **evaluate(model, encoder, eval_set)})
        log(f"final eval @ step {result.steps}: {json.dumps(result.evals[-1])}")
    save(model, aux, out)
    write_training_report(out, opts, result)
    return result


def save(model, aux: AuxHead, out: Path) -> None:
    """Weights in place (tokenizer, preprocessor and proactive.json files stay), the auxiliary head beside them
    (for ``--init-from``; export ignores ``training/``)."""
    import torch

    model.save_pretrained(out, safe_serialization=True)
    (out / "training").mkdir(exist_ok=True)
    torch.save(aux.linear.state_dict(), out / "training" / "aux_head.pt")


def write_training_report(out: Path, opts: TrainOptions, result: TrainResult) -> None:
    """``training/log.json`` and ``training/loss.png`` beside the weights (export ignores them)."""
    d = out / "training"
    d.mkdir(exist_ok=True)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()}
    (d / "log.json").write_text(json.dumps({"options": options, "steps": result.steps,
                                            "seconds": round(result.seconds, 1), "losses": result.losses,
                                            "evals": result.evals}, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(1, len(result.losses) + 1)
    ax.plot(x, result.losses, lw=0.5, alpha=0.4, label="text loss (per step)")
    k = max(1, len(result.losses) // 50)
    if len(result.losses) >= k:
        smooth = np.convolve(result.losses, np.ones(k) / k, mode="valid")
        ax.plot(x[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("assistant-token cross-entropy")
    budget = f"{opts.steps} steps" if opts.steps else f"{opts.minutes:g} min"
    ax.set_title(f"edge-duet train-demo (seed {opts.seed}, {budget}, {result.steps} steps)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(d / "loss.png", dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- evaluation


def eval_examples(seed: int, n: int) -> list[bm.Example]:
    return bm.sample_examples(seed, n)


def greedy_dialogue(model, encoder: td.DialogueEncoder, example: bm.Example, max_new_tokens: int = 24) -> list[str]:
    """Free-running greedy replies, one per turn, for a generated example."""
    turns = bm.turns(example, encoder.clock)
    times = [t for turn in turns for t in turn.frame_times]
    specs = [(len(t.frame_times), t.text, t.must_reply) for t in turns]
    return greedy_turns(model, encoder, encoder.frames(example, times), specs, max_new_tokens)


def greedy_turns(model, encoder: td.DialogueEncoder, frames_rgb: list, specs: list[tuple[int, str | None, bool]],
                 max_new_tokens: int = 24, system_prompt: str = DEMO_SYSTEM_PROMPT) -> list[str]:
    """Greedy replies by full recompute (no cache), the model's own replies kept in the history.

    frames_rgb: every frame of the stream (HxWx3 uint8 RGB); specs: per turn (number of frames, question text or
    None, must_reply). Returns one reply per turn (``NO REPLY`` included; must-reply turns without the prefill).
    """
    import torch

    proc = encoder.processor(images=frames_rgb, return_tensors="pt")
    grid = proc["image_grid_thw"]
    with torch.no_grad():
        feats = model.model.get_image_features(proc["pixel_values"], grid, return_dict=True).pooler_output
        feats = torch.cat(feats)  # (F*16, hidden)
        ids = encoder.ids(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")
        pad = "<|vision_start|>" + "<|image_pad|>" * encoder.tokens_per_frame + "<|vision_end|>"
        replies, n_frames = [], 0
        for count, text, must in specs:
            n_frames += count
            ids += encoder.ids("<|im_start|>user\n" + pad * count + (text or "") + "<|im_end|>\n")
            ids += encoder.ids("<|im_start|>assistant\n" + (bm.MUST_REPLY_PREFIX if must else ""))
            gen: list[int] = []
            for _ in range(max_new_tokens):
                x = torch.tensor([ids + gen])
                mm = (x == encoder.image_pad).int()
                emb = model.get_input_embeddings()(x)
                emb[mm.bool()] = feats[: int(mm.sum())]
                pos, _ = model.model.get_rope_index(x, mm, image_grid_thw=grid[:n_frames])
                h = model.model.language_model(inputs_embeds=emb, position_ids=pos).last_hidden_state
                nxt = int(model.lm_head(h[0, -1]).argmax())
                gen.append(nxt)
                if nxt == encoder.im_end:
                    break
            if gen[-1] != encoder.im_end:
                gen.append(encoder.im_end)
            replies.append(encoder.tok.decode(gen[:-1]).strip())
            ids += gen + encoder.ids("\n")
    return replies


def evaluate(model, encoder: td.DialogueEncoder, examples: list[bm.Example]) -> dict:
    """Per-turn decision precision/recall (exact turn) and exact-text accuracy of the replies at due turns."""
    model.eval()
    tp = fp = fn = exact = words = 0
    for ex in examples:
        gold = bm.turns(ex, encoder.clock)
        pred = greedy_dialogue(model, encoder, ex)
        for g, p in zip(gold, pred):
            said = p != bm.NO_REPLY
            if g.must_reply:
                continue  # the prefill forces a reply: not a decision
            due = g.reply != bm.NO_REPLY
            tp += said and due
            fp += said and not due
            fn += due and not said
            if due and said:
                exact += p == g.reply
                gw, pw = set(g.reply.lower().strip(".").split()), set(p.lower().strip(".").split())
                words += len(gw & pw) / max(1, len(gw))
    return {"precision": round(tp / max(1, tp + fp), 3), "recall": round(tp / max(1, tp + fn), 3),
            "exact": round(exact / max(1, tp), 3), "word_recall": round(words / max(1, tp), 3),
            "replies": tp + fp, "due": tp + fn}
