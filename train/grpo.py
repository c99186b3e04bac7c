"""Multi-turn GRPO on top of an SFT checkpoint, as MMDuet2 trains (../shared/RL-NOTES.md), sized for a CPU.

One step::

    example (a generated video + dialogue; seed, step -> always the same one)
      │ frames -> vision features (once, no grad)
      ├─ rollout 1 ─┐  turn by turn: append the user turn (its frames, its text), sample the assistant turn with the
      ├─ rollout 2  │  KV cache (temperature 1.2, top-k 10, <= max_new_tokens), keep it, go on to the next turn
      ├─ ...        │
      └─ rollout G ─┘
    rewards r_i = eval.reward.trajectory_reward(whole dialogue)          one scalar per trajectory
    advantages A_i = (r_i - mean r) / (std r + 1e-6)                      group-normalised (verl's GRPO)
    loss = - Σ_tokens A_i log π(token) / #tokens   (+ kl_coef * k3(π, π_SFT), off by default as in the paper)

Only the sampled assistant tokens (``<|im_end|>`` included) carry loss: system and user turns, the must-reply
prefill and ``assistant\\n`` headers are masked. Log-probabilities are taken at the sampling temperature (as verl
does). One policy update per batch of rollouts (verl with ppo_epochs = 1 and one mini-batch): the PPO ratio is then
exactly 1 and its clipping never binds, so the gradient is that of -A·log π written here directly.

Why not TRL's GRPOTrainer: its multi-turn path (``rollout_func`` / environments) generates with vLLM or
``generate()`` on text conversations extended by tool results; here every user turn brings new frames that must be
spliced into the sequence as visual tokens with 3-D M-RoPE positions, and the trajectory reward needs the time of
every turn. That is ~100 lines on top of the model's own ``get_rope_index`` and a KV cache, against a heavy
dependency whose rollout loop would still have to be rewritten. For a real 3B checkpoint on GPUs, use verl with
eval/reward.py (docs/TRAINING.md).

Differences from the paper, all from the CPU scale: a rollout is the whole (16-24 s) dialogue rather than a 20-60 s
span of a longer video with ground-truth replies before it; the judge is the offline strict judge.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from edge_duet.errors import CheckpointError, UsageError
from edge_duet.eval import benchmark as bm
from edge_duet.eval.reward import RewardBreakdown, RewardWeights, SpanGold, trajectory_reward
from edge_duet.export.tokenizer import DEMO_SYSTEM_PROMPT

from . import data as td

STATE_FILE = "rl_state.pt"


@dataclass(frozen=True)
class RLOptions:
    steps: int = 200
    seed: int = 0
    group_size: int = 4  # rollouts per video (the paper: 4)
    videos_per_step: int = 1
    lr: float = 1e-6  # the paper's, for a 3B model; the 2.5 M demo model needs ~1e-5 (scripts/train_demo_model.sh)
    temperature: float = 1.2
    top_k: int = 10
    max_new_tokens: int = 100  # per assistant turn
    kl_coef: float = 0.0  # > 0: a k3 KL penalty to the SFT model in the loss
    weights: RewardWeights = RewardWeights()
    save_every: int = 50  # steps between checkpoints (the last step always saves)
    eval_every: int = 0  # steps between greedy evaluations on held-out dialogues (0: only at the start and end)
    eval_dialogues: int = 0
    eval_seed: int = 999_999
    threads: int = 2
    progress: bool = True

    def check(self) -> "RLOptions":
        bad = []
        if self.steps < 1:
            bad.append(f"steps must be >= 1, got {self.steps}")
        if self.group_size < 2:
            bad.append(f"group_size must be >= 2 (advantages are normalised within a group), got {self.group_size}")
        if self.videos_per_step < 1:
            bad.append(f"videos_per_step must be >= 1, got {self.videos_per_step}")
        if not self.lr > 0:
            bad.append(f"lr must be > 0, got {self.lr}")
        if not self.temperature > 0:
            bad.append(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0:
            bad.append(f"top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        if self.max_new_tokens < 1:
            bad.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.kl_coef < 0:
            bad.append(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.save_every < 1 or self.eval_every < 0 or self.eval_dialogues < 0:
            bad.append("save_every must be >= 1, eval_every and eval_dialogues >= 0")
        if bad:
            raise UsageError("bad RL options: " + "; ".join(bad))
        self.weights.check()
        return self


@dataclass
class Trajectory:
    ids: list[int]  # the whole dialogue
    sampled: list[bool]  # per token: sampled by the policy (carries loss)
    replies: list[str]  # per turn, as generated (NO REPLY included)


@dataclass
class RLResult:
    checkpoint: Path
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)  # per step: loss, reward terms (means over rollouts)
    evals: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------------------------- the dialogue


def example_gold(example: bm.Example, clock: bm.Clock) -> tuple[list[float], list[SpanGold], str]:
    """Turn times, reply spans (benchmark.gold_entry's, one place for the rule) and the first question."""
    entry = bm.gold_entry(example, "")
    spans = [SpanGold(a["content"], tuple(a["reply_timespan"])) for a in entry["answer"]]
    question = example.questions[0].text if example.questions else ""
    return [t.time_s for t in bm.turns(example, clock)], spans, question


def example_reward(example: bm.Example, clock: bm.Clock, replies: list[str],
                   weights: RewardWeights = RewardWeights()) -> RewardBreakdown:
    times, spans, question = example_gold(example, clock)
    return trajectory_reward(times, replies, spans, question, weights=weights)


def train_example(seed: int, step: int, index: int, clock: bm.Clock) -> bm.Example:
    """The training video of (seed, step, index): a resumed run sees the same ones."""
    rng = np.random.default_rng([seed, 8_800_001, step, index])
    return td.random_example(rng, float(bm.DURATIONS_S[int(rng.integers(len(bm.DURATIONS_S)))]), clock)


def image_features(model, pixel_values, grid):
    import torch

    return torch.cat(model.model.get_image_features(pixel_values, grid, return_dict=True).pooler_output)


def rollout(model, encoder: td.DialogueEncoder, example: bm.Example, feats, grid, *, temperature: float,
            top_k: int, max_new_tokens: int, generator=None, system_prompt: str = DEMO_SYSTEM_PROMPT) -> Trajectory:
    """One dialogue sampled turn by turn with a KV cache. ``top_k == 1`` is greedy (then ``generator`` is unused).

    feats: (F*16, hidden) visual features of every frame of the example; grid: (F, 3).
    """
    import torch
    from transformers import DynamicCache

    lm = model.model.language_model
    embed = model.get_input_embeddings()
    cache = DynamicCache(config=model.config.get_text_config())
    ids: list[int] = []
    sampled: list[bool] = []
    replies: list[str] = []
    pad = "<|vision_start|>" + "<|image_pad|>" * encoder.tokens_per_frame + "<|vision_end|>"
    n_frames = n_vis = 0
    # vision markers are the user's to write: one sampled by an untrained policy would shift every frame after it
    banned = torch.tensor([encoder.tok.token_to_id(t) for t in
                           ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")])
    pending = encoder.ids(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")

    def feed(chunk: list[int], positions) -> "torch.Tensor":
        nonlocal n_vis
        x = torch.tensor([chunk])
        emb = embed(x)
        mm = x == encoder.image_pad
        k = int(mm.sum())
        if k:
            emb[mm] = feats[n_vis: n_vis + k]
            n_vis += k
        h = lm(inputs_embeds=emb, position_ids=positions, cache=cache, use_cache=True).last_hidden_state
        return model.lm_head(h[0, -1])  # (vocab,)

    with torch.no_grad():
        for turn in bm.turns(example, encoder.clock):
            n_frames += len(turn.frame_times)
            chunk = pending + encoder.ids("<|im_start|>user\n" + pad * len(turn.frame_times) + (turn.text or "")
                                          + "<|im_end|>\n")
            chunk += encoder.ids("<|im_start|>assistant\n" + (bm.MUST_REPLY_PREFIX if turn.must_reply else ""))
            full = torch.tensor([ids + chunk])
            pos, _ = model.model.get_rope_index(full, (full == encoder.image_pad).int(), image_grid_thw=grid[:n_frames])
            pos = pos[:, :, len(ids):]  # (3, 1, len(chunk))
            logits = feed(chunk, pos)
            ids += chunk
            sampled += [False] * len(chunk)
            next_pos = int(pos.max()) + 1
            gen: list[int] = []
            while True:
                logits[banned] = -math.inf
                if top_k == 1:
                    nxt = int(logits.argmax())
                else:
                    z = logits / temperature
                    if top_k:
                        kth = torch.topk(z, min(top_k, z.numel())).values[-1]
                        z = z.masked_fill(z < kth, -math.inf)
                    nxt = int(torch.multinomial(torch.softmax(z, -1), 1, generator=generator))
                gen.append(nxt)
                if nxt == encoder.im_end or len(gen) >= max_new_tokens:
                    break
                logits = feed([nxt], torch.full((3, 1, 1), next_pos))
                next_pos += 1
            ids += gen
            sampled += [True] * len(gen)
            if gen[-1] != encoder.im_end:  # cut at max_new_tokens: close the turn (not sampled, no loss)
                feed([encoder.im_end], torch.full((3, 1, 1), next_pos))
                ids.append(encoder.im_end)
                sampled.append(False)
                next_pos += 1
            replies.append(encoder.tok.decode([t for t in gen if t != encoder.im_end]).strip())
            pending = encoder.ids("\n")
    return Trajectory(ids, sampled, replies)


def token_logprobs(model, trajs: list[Trajectory], pixel_values, grid, temperature: float, encoder):
    """Log-probabilities (at ``temperature``) of every sampled token of ``trajs`` (one video, so one set of frames),
    with gradients through the vision tower and the decoder. Returns (logp (n,), row index of each token (n,))."""
    import torch

    n = max(len(t.ids) for t in trajs)
    g = len(trajs)
    ids = torch.full((g, n), encoder.pad_id, dtype=torch.long)
    mask = torch.zeros((g, n), dtype=torch.long)
    target = torch.zeros((g, n), dtype=torch.bool)
    for b, t in enumerate(trajs):
        ids[b, : len(t.ids)] = torch.tensor(t.ids)
        mask[b, : len(t.ids)] = 1
        target[b, : len(t.ids)] = torch.tensor(t.sampled)
    mm = (ids == encoder.image_pad) & mask.bool()
    emb = model.get_input_embeddings()(ids)
    feats = image_features(model, pixel_values, grid)  # (F*16, hidden), once for the group
    emb = emb.masked_scatter(mm.unsqueeze(-1), feats.repeat(g, 1).to(emb.dtype))
    pos, _ = model.model.get_rope_index(ids, mm.int(), image_grid_thw=grid.repeat(g, 1), attention_mask=mask)
    h = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    sel = target[:, 1:]  # token j is predicted at position j - 1
    logits = model.lm_head(h[:, :-1][sel]) / temperature  # (n, vocab)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:][sel].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(g).unsqueeze(1).expand(g, n - 1)[sel]
    return logp, rows


def group_advantages(rewards: list[float]):
    """verl's GRPO outcome advantage: (r - mean) / (std + 1e-6), std unbiased; all equal -> all 0."""
    import torch

    r = torch.tensor(rewards, dtype=torch.float32)
    return (r - r.mean()) / (r.std() + 1e-6)


# --------------------------------------------------------------------------------------------- training


def check_sft_checkpoint(path: Path) -> None:
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"no SFT checkpoint in {path} (no config.json): train one first, e.g. "
                              f"`edge-duet train-demo {path}`, or point at a Hugging Face Qwen2.5-VL checkpoint")
    if not (Path(path) / "tokenizer.json").is_file():
        raise CheckpointError(f"{path} has no tokenizer.json: train-rl needs the checkpoint's fast tokenizer")


def train_rl(sft_checkpoint: str | Path | None, out_dir: str | Path, opts: RLOptions = RLOptions(),
             resume: bool = False, log=print) -> RLResult:
    """GRPO from ``sft_checkpoint`` into ``out_dir`` (copied there first), or continue ``out_dir`` with ``resume``.

    Saves the weights, ``training/rl_state.pt`` (optimizer, step, history: what --resume reads),
    ``training/rl_log.json`` and ``training/rl_curve.png`` every ``save_every`` steps and at the end.
    """
    import torch
    from tokenizers import Tokenizer

    from edge_duet.export.checkpoint import load_model

    opts.check()
    out = Path(out_dir)
    state_path = out / "training" / STATE_FILE
    state = None
    if resume:
        if not state_path.is_file():
            raise CheckpointError(f"nothing to resume in {out}: no training/{STATE_FILE} (start without --resume)")
        state = torch.load(state_path, weights_only=False)
        saved = RLOptions(**{**state["options"], "weights": RewardWeights(**state["options"]["weights"])})
        opts = replace(saved, steps=opts.steps, progress=opts.progress, threads=opts.threads)
        sft_checkpoint = Path(state["sft_checkpoint"])
    else:
        check_sft_checkpoint(Path(sft_checkpoint))
        if Path(sft_checkpoint).resolve() != out.resolve():
            shutil.copytree(sft_checkpoint, out, dirs_exist_ok=True)
        (out / "training" / STATE_FILE).unlink(missing_ok=True)
    torch.set_num_threads(opts.threads)
    model, _ = load_model(out)
    ref = None
    if opts.kl_coef > 0:
        check_sft_checkpoint(Path(sft_checkpoint))
        ref, _ = load_model(sft_checkpoint)
        ref.requires_grad_(False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    encoder = td.DialogueEncoder(tok)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0, betas=(0.9, 0.999))
    result = RLResult(out, 0, 0.0)
    if state is not None:
        optim.load_state_dict(state["optimizer"])
        result.steps, result.history, result.evals = state["step"], state["history"], state["evals"]
        result.seconds = state["seconds"]
        log(f"resumed {out} at step {result.steps}")
    eval_set = bm.sample_examples(opts.eval_seed, opts.eval_dialogues) if opts.eval_dialogues else []
    if eval_set and not result.evals:
        result.evals.append({"step": 0, **evaluate_greedy(model, encoder, eval_set, opts.weights)})
        log(f"eval @ step 0: {json.dumps(result.evals[-1])}")
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.steps, initial=min(result.steps, opts.steps), unit="step", desc="train-rl",
                   dynamic_ncols=True, mininterval=1.0)
    start = time.monotonic() - result.seconds
    while result.steps < opts.steps:
        step = result.steps
        gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)
        optim.zero_grad(set_to_none=True)
        rows: list[RewardBreakdown] = []
        loss_value = kl_value = 0.0
        for v in range(opts.videos_per_step):
            ex = train_example(opts.seed, step, v, encoder.clock)
            times = [t for turn in bm.turns(ex, encoder.clock) for t in turn.frame_times]
            proc = encoder.processor(images=encoder.frames(ex, times), return_tensors="pt")
            pixel_values, grid = proc["pixel_values"], proc["image_grid_thw"]
            model.eval()  # sampling: no dropout (there is none in Qwen2.5-VL, but be explicit)
            with torch.no_grad():
                feats = image_features(model, pixel_values, grid)
            trajs = [rollout(model, encoder, ex, feats, grid, temperature=opts.temperature, top_k=opts.top_k,
                             max_new_tokens=opts.max_new_tokens, generator=gen) for _ in range(opts.group_size)]
            breakdowns = [example_reward(ex, encoder.clock, t.replies, opts.weights) for t in trajs]
            rows += breakdowns
            adv = group_advantages([b.total for b in breakdowns])
            model.train()
            logp, row = token_logprobs(model, trajs, pixel_values, grid, opts.temperature, encoder)
            loss = -(adv[row] * logp).mean()
            if ref is not None:
                with torch.no_grad():
                    ref_logp, _ = token_logprobs(ref, trajs, pixel_values, grid, opts.temperature, encoder)
                d = ref_logp - logp
                kl = (torch.exp(d) - d - 1).mean()  # k3, verl's low_var_kl
                loss = loss + opts.kl_coef * kl
                kl_value += kl.item() / opts.videos_per_step
            (loss / opts.videos_per_step).backward()
            loss_value += loss.item() / opts.videos_per_step
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        result.steps += 1
        result.seconds = time.monotonic() - start
        rec = {"step": result.steps, "loss": loss_value, "kl": kl_value,
               **{k: float(np.mean([getattr(b, k) for b in rows])) for k in ("total", "pauc", "rep", "outspan", "pfx")},
               "replies": float(np.mean([b.n_replies for b in rows])), "seconds": round(result.seconds, 1)}
        result.history.append(rec)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{rec['total']:.3f}", pauc=f"{rec['pauc']:.3f}", loss=f"{loss_value:.3f}",
                            refresh=False)
        if result.steps % 10 == 0:
            recent = result.history[-10:]
            log(f"step {result.steps} t={result.seconds:.0f}s reward={np.mean([r['total'] for r in recent]):.3f} "
                f"pauc={np.mean([r['pauc'] for r in recent]):.3f} rep={np.mean([r['rep'] for r in recent]):.3f} "
                f"outspan={np.mean([r['outspan'] for r in recent]):.3f} replies={np.mean([r['replies'] for r in recent]):.1f}")
        last = result.steps == opts.steps
        if eval_set and ((opts.eval_every and result.steps % opts.eval_every == 0) or last):
            result.evals.append({"step": result.steps, **evaluate_greedy(model, encoder, eval_set, opts.weights)})
            log(f"eval @ step {result.steps}: {json.dumps(result.evals[-1])}")
        if result.steps % opts.save_every == 0 or last:
            save_rl(model, optim, out, opts, Path(sft_checkpoint), result)
    if bar is not None:
        bar.close()
    model.eval()
    return result


def evaluate_greedy(model, encoder: td.DialogueEncoder, examples: list[bm.Example], weights: RewardWeights) -> dict:
    """Greedy dialogues on held-out examples: the reward's terms (means) and the evaluation's strict PAUC."""
    import torch

    from edge_duet.eval.evaluator import evaluate
    from edge_duet.eval.formats import Prediction, Reply, parse_gold_example

    model.eval()
    rows, gold, preds = [], [], []
    for ex in examples:
        times = [t for turn in bm.turns(ex, encoder.clock) for t in turn.frame_times]
        proc = encoder.processor(images=encoder.frames(ex, times), return_tensors="pt")
        with torch.no_grad():
            feats = image_features(model, proc["pixel_values"], proc["image_grid_thw"])
        traj = rollout(model, encoder, ex, feats, proc["image_grid_thw"], temperature=1.0, top_k=1, max_new_tokens=24)
        rows.append(example_reward(ex, encoder.clock, traj.replies, weights))
        turn_times = [t.time_s for t in bm.turns(ex, encoder.clock)]
        gold.append(parse_gold_example(bm.gold_entry(ex, ""), ex.question_id))
        said = [Reply(t, r.removeprefix(bm.MUST_REPLY_PREFIX).strip()) for t, r in zip(turn_times, traj.replies)
                if r.removeprefix(bm.MUST_REPLY_PREFIX).strip() != bm.NO_REPLY]
        preds.append(Prediction(ex.question_id, tuple(said), tuple(turn_times)))
    report = evaluate(gold, preds)
    out = {k: round(float(np.mean([getattr(b, k) for b in rows])), 4) for k in ("total", "pauc", "rep", "outspan", "pfx")}
    out["strict_pauc"] = round(report.overall.pauc, 2)
    out["replies"] = report.overall.n_replies
    out["replies_in_span"] = report.overall.n_replies_in_span
    return out


def save_rl(model, optim, out: Path, opts: RLOptions, sft: Path, result: RLResult) -> None:
    """Weights in place (exportable as is), and beside them in training/: the state --resume reads, the log, the plot."""
    import torch

    model.save_pretrained(out, safe_serialization=True)
    d = out / "training"
    d.mkdir(exist_ok=True)
    options = asdict(opts)
    tmp = d / (STATE_FILE + ".tmp")
    torch.save({"step": result.steps, "optimizer": optim.state_dict(), "history": result.history,
                "evals": result.evals, "seconds": result.seconds, "options": options,
                "sft_checkpoint": str(sft)}, tmp)
    tmp.replace(d / STATE_FILE)  # a run killed while saving keeps the previous state
    (d / "rl_log.json").write_text(json.dumps({"options": options, "sft_checkpoint": str(sft), "steps": result.steps,
                                               "seconds": round(result.seconds, 1), "history": result.history,
                                               "evals": result.evals}, indent=1) + "\n")
    plot_curve(result, d / "rl_curve.png")


def plot_curve(result: RLResult, path: Path) -> bool:
    """Reward and r_PAUC per step (and the greedy evaluations' strict PAUC); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    steps = [h["step"] for h in result.history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    k = max(1, len(steps) // 25)
    for ax, key, label in ((a, "total", "reward"), (b, "pauc", "r_PAUC (rollouts)")):
        y = np.array([h[key] for h in result.history])
        ax.plot(steps, y, lw=0.5, alpha=0.4, label=f"{label}, per step")
        if len(y) >= k:
            ax.plot(steps[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), lw=1.5, label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_title(label)
    if result.evals:
        ax2 = b.twinx()
        ax2.plot([e["step"] for e in result.evals], [e["strict_pauc"] for e in result.evals], "o-", color="C3",
                 label="held-out PAUC (strict, greedy)")
        ax2.set_ylabel("PAUC x100")
        ax2.legend(loc="lower right")
    a.legend()
    b.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True

