"""The synthetic benchmark generator: determinism, the gold format, the frame-input file, and that the answers
describe what the rendered frames show at the times they say."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_duet.eval import benchmark as bm
from edge_duet.eval import scenes as sc

CLOCK = bm.Clock(1.0, 2)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return bm.write_benchmark(tmp_path_factory.mktemp("bench") / "a", seed=5, n_examples=6, clock=CLOCK, size=112)


def test_same_seed_gives_byte_identical_files(bench, tmp_path):
    again = bm.write_benchmark(tmp_path / "b", seed=5, n_examples=6, clock=CLOCK, size=112)
    assert _digest(bench) == _digest(again)


def test_other_seed_gives_other_examples():
    a = [bm.gold_entry(e, "v") for e in bm.sample_examples(5, 12)]
    b = [bm.gold_entry(e, "v") for e in bm.sample_examples(6, 12)]
    assert a != b


def test_gold_follows_proactivevideoqa_format(bench):
    gold = json.loads((bench / "gold.json").read_text())
    assert [g["subset"] for g in gold] == list(bm.SUBSETS)
    for g in gold:
        assert set(g) == {"video", "question_id", "duration", "subset", "conversation", "answer"}
        assert (bench / g["video"]).is_file()
        assert g["conversation"] and all(c["role"] == "user" and isinstance(c["content"], str) for c in g["conversation"])
        assert g["answer"], f"{g['question_id']} has no answer"
        for a in g["answer"]:
            r0, r1 = a["related_timespan"]
            p0, p1 = a["reply_timespan"]
            assert a["role"] == "assistant" and a["content"]
            assert 0 <= r0 < r1 <= g["duration"]
            assert p0 == r0 and p1 == pytest.approx(min(r1 + 1.0, g["duration"]))
        starts = [a["related_timespan"][0] for a in g["answer"]]
        assert starts == sorted(starts)


def test_gold_loads_in_the_evaluator(bench):
    from edge_duet.eval.formats import load_gold

    gold = load_gold(bench / "gold.json")
    assert {g.subset for g in gold} == set(bm.SUBSETS)


def test_infer_input_matches_gold_turns_and_frames(bench):
    gold = {g["question_id"]: g for g in json.loads((bench / "gold.json").read_text())}
    scenes = json.loads((bench / "scenes.json").read_text())
    assert scenes["meta"] == {"seed": 5, "frame_interval_s": 1.0, "frames_per_turn": 2}
    for entry in json.loads((bench / "infer_input.json").read_text()):
        g = gold[entry["question_id"]]
        conv = entry["conversation"]
        n_frames = 0
        asked = []
        for k, turn in enumerate(conv):
            images = [c["image"] for c in turn["content"] if c["type"] == "image"]
            texts = [c["text"] for c in turn["content"] if c["type"] == "text"]
            assert turn["role"] == "user" and len(images) == 2 and len(texts) <= 1
            assert turn["content"][-1]["type"] == ("text" if texts else "image")  # question after the frames
            n_frames += len(images)
            assert turn["time"] == pytest.approx(n_frames * 1.0)  # frames seen so far x interval
            for path in images:
                assert not Path(path).is_absolute() and (bench / path).is_file()
            if texts:
                asked.append((turn["time"] - 2.0, texts[0], turn.get("must_reply", False)))
        assert n_frames == int(g["duration"])
        assert asked == [(c["time"], c["content"], c.get("must_reply", False)) for c in g["conversation"]]


def test_frames_and_video_show_the_rendered_scene(bench):
    ex = bm.sample_examples(5, 1, CLOCK)[0]
    png = cv2.imread(str(bench / "frames" / ex.question_id / "0003.png"))
    assert np.array_equal(png, sc.render_frame(ex.scene, 3.0, 112))
    cap = cv2.VideoCapture(str(bench / "videos" / f"{ex.question_id}.mp4"))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    cap.set(cv2.CAP_PROP_POS_FRAMES, 30)
    ok, frame = cap.read()
    cap.release()
    assert n == int(ex.duration_s * 10) and ok and frame.shape == (112, 112, 3)
    # lossy video coding: close to the rendered frame, not equal
    assert np.abs(frame.astype(int) - sc.render_frame(ex.scene, 3.0, 112).astype(int)).mean() < 12


@pytest.mark.parametrize("seed", range(4))
def test_answers_are_due_when_the_frames_show_them(seed):
    """At each answer's due turn the named object's look changes between consecutive sampled frames, and every
    answer names a colour or shape (or a count) of the scene."""
    for ex in bm.sample_examples(100 + seed, 24, CLOCK):
        turns = bm.turns(ex, CLOCK)
        assert len(turns) == int(ex.duration_s / 2)
        for a in ex.answers:
            turn = turns[a.due_turn]
            assert a.text in turn.reply
            assert turn.time_s >= a.start_s and turn.time_s <= a.end_s + 1.0 + 1e-9, (ex.question_id, a)
            words = set(a.text.lower().strip(".").split())
            assert words & (set(sc.COLOUR_NAMES) | set(sc.SHAPES) | set(bm.NUMBERS)), a.text
            if a.must_reply or a.start_s == 0:
                continue
            t_prev = turn.frame_times[0] - CLOCK.frame_interval_s
            before = [o.state_at(t_prev) for o in ex.scene.objects]
            after = [o.state_at(turn.frame_times[-1]) for o in ex.scene.objects]
            assert before != after, (ex.question_id, a)
        silent = [t for t in turns if t.reply == bm.NO_REPLY]
        assert silent, "every dialogue has silent turns"


def test_distinct_shapes_and_colours_make_names_unique():
    for ex in bm.sample_examples(3, 60, CLOCK):
        shapes = [o.shape for o in ex.scene.objects]
        colours = [o.colour for o in ex.scene.objects] + [o.new_colour for o in ex.scene.objects if o.new_colour]
        assert len(set(shapes)) == len(shapes) and len(set(colours)) == len(colours)


def test_multi_dialogue_has_must_reply_questions_at_any_time():
    multi = [e for e in bm.sample_examples(8, 60, CLOCK) if e.subset == "multi"]
    assert all(any(q.must_reply for q in e.questions) for e in multi)
    assert any(q.time_s > 0 for e in multi for q in e.questions)
    assert any(not q.must_reply for e in multi for q in e.questions)


def test_cell_labels_follow_the_drawn_objects():
    ex = bm.sample_examples(11, 1, CLOCK)[0]
    t = 5.0
    cells = sc.cell_objects(ex.scene, t, 4, 112)
    ids = sc.object_id_map(ex.scene, t, 112)
    for c, i in enumerate(cells):
        block = ids[(c // 4) * 28:(c // 4 + 1) * 28, (c % 4) * 28:(c % 4 + 1) * 28]
        if i >= 0:
            assert (block == i + 1).mean() >= 0.12
        else:
            assert all((block == k + 1).mean() < 0.12 for k in range(len(ex.scene.objects)))


def test_make_benchmark_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from edge_duet.apps import cmd_bench_data

    app = typer.Typer()
    cmd_bench_data.register(app)
    app.command("noop")(lambda: None)  # a second command keeps Typer in multi-command mode
    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["make-benchmark", str(out), "--seed", "2", "--examples", "2", "--size", "112"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((out / "gold.json").read_text())) == 2
    bad = CliRunner().invoke(app, ["make-benchmark", str(tmp_path / "x"), "--examples", "0"])
    assert bad.exit_code == 2 and "--examples" in bad.output


def test_an_oracle_replaying_the_gold_scores_no_duplicates():
    """Gold answers said at their due turns are never counted as duplicates: a dialogue does not ask the same
    thing twice while the first answer's span is open (it once did, two 'How many objects?' two seconds apart)."""
    from edge_duet.eval.evaluator import evaluate
    from edge_duet.eval.formats import Prediction, Reply, parse_gold

    examples = bm.sample_examples(1234, 120, CLOCK)
    gold = parse_gold([bm.gold_entry(ex, f"videos/{ex.question_id}.mp4") for ex in examples])
    preds = []
    for ex in examples:
        turns = bm.turns(ex, CLOCK)
        replies = sorted((turns[a.due_turn].time_s, a.text) for a in ex.answers)
        preds.append(Prediction(ex.question_id, tuple(Reply(t, text) for t, text in replies)))
    report = evaluate(gold, preds)
    assert report.overall.n_duplicates == 0
    assert report.overall.n_replies_in_span == report.overall.n_replies
