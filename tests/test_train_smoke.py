"""The demo-model training path, in about a minute: the dialogue encoding equals what the runtime renders, a short
`train-demo` run on a tiny shape lowers the loss and leaves a checkpoint that loads."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="training needs the export extra (torch)")

from edge_duet.eval import benchmark as bm  # noqa: E402
from edge_duet.export.tokenizer import build_tokenizer  # noqa: E402
from edge_duet.train import data as td  # noqa: E402


@pytest.fixture(scope="module")
def encoder():
    return td.DialogueEncoder(build_tokenizer(td.corpus_lines(), 512), decision_weight=2.0)


def _multi_example():
    return next(e for e in bm.sample_examples(21, 12) if e.subset == "multi")


def test_encoding_matches_the_runtime_chat_renderer(encoder):
    from edge_duet.manifest import TokenSpec
    from edge_duet.runtime.chat import ChatRenderer, TextPiece, render_ids

    tok = encoder.tok
    ids = {t: tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                          "<|image_pad|>", "<|video_pad|>", "<|endoftext|>")}
    spec = TokenSpec(im_start=ids["<|im_start|>"], im_end=ids["<|im_end|>"], vision_start=ids["<|vision_start|>"],
                     vision_end=ids["<|vision_end|>"], image_pad=ids["<|image_pad|>"], video_pad=ids["<|video_pad|>"],
                     endoftext=ids["<|endoftext|>"], eos_ids=(ids["<|im_end|>"],))
    r = ChatRenderer(tok, spec)
    ex = _multi_example()
    enc = encoder.encode(ex, system_prompt="Watch and answer.")
    pieces = r.system("Watch and answer.")
    for turn in bm.turns(ex, encoder.clock):
        pieces += r.user([(1, 8, 8)] * len(turn.frame_times), turn.text)
        pieces += r.assistant_start(bm.MUST_REPLY_PREFIX if turn.must_reply else None)
        pieces.append(TextPiece(tuple(encoder.ids(turn.reply))))
        pieces += r.assistant_end()
    assert render_ids(pieces) == enc.input_ids.tolist()


def test_labels_cover_exactly_the_generated_reply_tokens(encoder):
    ex = _multi_example()
    enc = encoder.encode(ex)
    turns = bm.turns(ex, encoder.clock)
    im_end = encoder.im_end
    labelled = enc.labels != -100
    # one labelled run per turn, ending with <|im_end|>, starting at the decision position
    runs = np.flatnonzero(np.diff(np.concatenate([[0], labelled.astype(int), [0]])))
    starts, ends = runs[::2], runs[1::2]
    assert starts.tolist() == enc.decision_pos and len(starts) == len(turns)
    for s, e, turn in zip(starts, ends, turns):
        assert enc.input_ids[e - 1] == im_end
        assert encoder.tok.decode(enc.input_ids[s:e - 1].tolist()) == turn.reply
    assert (enc.weights[enc.decision_pos] == 2.0).all()
    assert enc.reply_turn == [t.reply != bm.NO_REPLY for t in turns]
    n_frames = sum(len(t.frame_times) for t in turns)
    assert enc.pixel_values.shape == (n_frames * 64, 3 * 2 * 14 * 14)
    assert (enc.input_ids == encoder.image_pad).sum() == n_frames * 16 == len(enc.cells)


def test_auxiliary_labels_mark_new_objects(encoder):
    ex = next(e for e in bm.sample_examples(4, 30) if e.subset == "appear" and e.answers)
    a = ex.answers[0]
    turn = bm.turns(ex, encoder.clock)[a.due_turn]
    t = next(f for f in turn.frame_times if f >= a.start_s)
    cells = td.frame_cells(ex.scene, t, t - 1.0)
    assert (cells[:, 2] == 1).any(), "the appearing object's cells are labelled 'appeared'"
    assert ((cells[:, 2] == 1) <= (cells[:, 0] > 0)).all()


def test_train_demo_smoke(tmp_path):
    """`train-demo --steps 40 --shape tiny` (steps, not minutes: a busy CI machine must not starve the run): the
    loss goes down, the checkpoint loads, keeps its side files, and the greedy evaluation loop runs on it."""
    import typer
    from typer.testing import CliRunner

    from edge_duet.apps import cmd_train
    from edge_duet.export.checkpoint import load_model

    app = typer.Typer()
    cmd_train.register(app)
    app.command("noop")(lambda: None)
    out = tmp_path / "ckpt"
    res = CliRunner().invoke(app, ["train-demo", str(out), "--steps", "40", "--shape", "tiny", "--seed", "3",
                                   "--batch-size", "2", "--eval-dialogues", "0"])
    assert res.exit_code == 0, res.output
    log = json.loads((out / "training" / "log.json").read_text())
    losses = log["losses"]
    assert len(losses) == 40
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3, losses
    assert (out / "training" / "loss.png").is_file() and (out / "training" / "aux_head.pt").is_file()
    model, info = load_model(out)
    from edge_duet.train import sft

    enc = td.DialogueEncoder(__import__("tokenizers").Tokenizer.from_file(str(out / "tokenizer.json")))
    ex = bm.sample_examples(77, 1)[0]
    stats = sft.evaluate(model, enc, [ex])
    assert stats["due"] == sum(t.reply != bm.NO_REPLY and not t.must_reply for t in bm.turns(ex, enc.clock))
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert info.preprocessor["max_pixels"] == info.preprocessor["min_pixels"] == 112 * 112
    assert info.proactive.frame_interval_s == 1.0 and info.proactive.frames_per_turn == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "proactive.json"):
        assert (out / name).is_file()
