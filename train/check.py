"""Score a trained checkpoint on a benchmark directory with transformers (no export needed): greedy replies by full
recompute over ``infer_input.json``'s frames, written as ``edge-duet infer``-style JSONL, then PAUC with the
offline judge next to the always-silent and reply-every-turn baselines.

    python -m edge_duet.train.check CHECKPOINT BENCH_DIR [--out preds.jsonl] [--limit N]

A development tool: the shipped numbers come from the exported bundle through `edge-duet infer` + `edge-duet eval`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def predict(checkpoint: Path, bench_dir: Path, limit: int | None = None, threads: int = 1, log=print) -> list[dict]:
    import cv2
    import torch
    from tokenizers import Tokenizer

    from edge_duet.export.checkpoint import load_model
    from edge_duet.eval.benchmark import MUST_REPLY_PREFIX, NO_REPLY

    from . import data as td
    from .sft import greedy_turns

    torch.set_num_threads(threads)
    model, info = load_model(checkpoint)
    encoder = td.DialogueEncoder(Tokenizer.from_file(str(Path(checkpoint) / "tokenizer.json")))
    entries = json.loads((bench_dir / "infer_input.json").read_text())[:limit]
    out = []
    for n, entry in enumerate(entries):
        frames, specs, times = [], [], []
        for turn in entry["conversation"]:
            if turn["role"] != "user":
                continue
            images = [c["image"] for c in turn["content"] if c["type"] == "image"]
            text = " ".join(c["text"] for c in turn["content"] if c["type"] == "text") or None
            for path in images:
                bgr = cv2.imread(str(bench_dir / path), cv2.IMREAD_COLOR)
                frames.append(bgr[..., ::-1].copy())
            specs.append((len(images), text, bool(turn.get("must_reply"))))
            times.append(turn["time"])
        replies = greedy_turns(model, encoder, frames, specs, system_prompt=info.proactive.system_prompt)
        lines = []
        for (count, text, must), t, reply in zip(specs, times, replies):
            lines.append({"role": "user", "time": t, **({"content": text} if text else {})})
            if reply != NO_REPLY or must:
                lines.append({"role": "assistant", "time": t, "content": (MUST_REPLY_PREFIX if must else "") + reply})
        out.append({"question_id": entry["question_id"], "model_response_list": lines})
        log(f"[{n + 1}/{len(entries)}] {entry['question_id']}: "
            + " | ".join(f"{t:g}s {r}" for t, r in zip(times, replies) if r != NO_REPLY))
    return out


def score(bench_dir: Path, preds_path: Path) -> str:
    from edge_duet.eval.baselines import every_turn_predictions, silent_predictions
    from edge_duet.eval.evaluator import evaluate
    from edge_duet.eval.formats import load_gold, load_predictions
    from edge_duet.eval.report import format_table

    gold = load_gold(bench_dir / "gold.json")
    preds = load_predictions(preds_path)
    qids = {p.question_id for p in preds}
    gold = [g for g in gold if g.question_id in qids]
    report = evaluate(gold, preds)
    baselines = {"silent": evaluate(gold, silent_predictions(gold)),
                 "every-turn": evaluate(gold, every_turn_predictions(gold, preds))}
    return format_table(report, baselines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("bench_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="predictions JSONL (default BENCH_DIR/pred-transformers.jsonl)")
    ap.add_argument("--limit", type=int, default=None)
    args = ap.parse_args(argv)
    out = args.out or args.bench_dir / "pred-transformers.jsonl"
    preds = predict(args.checkpoint, args.bench_dir, args.limit, log=lambda s: print(s, file=sys.stderr))
    out.write_text("".join(json.dumps(p) + "\n" for p in preds))
    print(score(args.bench_dir, out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
