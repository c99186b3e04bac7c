"""`edge-duet eval` end to end through typer's CliRunner, on hand-made gold and prediction files."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
import typer
from typer.testing import CliRunner

from edge_duet.apps.cmd_eval import register

runner = CliRunner()

GOLD = [
    {
        "video": "a.mp4",
        "question_id": "a",
        "duration": 16,
        "subset": "web",
        "conversation": [{"role": "user", "content": "Tell me when a shape appears.", "time": 0}],
        "answer": [
            {"role": "assistant", "content": "A red circle appeared.",
             "related_timespan": [2, 5], "reply_timespan": [2, 6]},
            {"role": "assistant", "content": "A blue square appeared.",
             "related_timespan": [10, 12], "reply_timespan": [10, 13]},
        ],
    },
    {
        "video": "b.mp4",
        "question_id": "b",
        "duration": 10,
        "conversation": [{"role": "user", "content": "Tell me when a shape appears.", "time": 0}],
        "answer": [{"role": "assistant", "content": "Two green triangles appeared.", "reply_timespan": [4, 8]}],
    },
]  # fmt: skip


def turns(*times):
    return [{"role": "user", "content": "", "time": t} for t in times]


def say(t, text):
    return {"role": "assistant", "content": text, "time": t}


PREDS = [
    {"question_id": "a", "model_response_list": turns(2, 4) + [say(4, "A red circle appeared.")] + turns(6, 8, 10, 12)
     + [say(12, "A blue square appeared.")] + turns(14, 16) + [say(16, "A blue square appeared.")]},
    {"question_id": "b", "model_response_list": turns(2, 4, 6) + [say(6, "Two green triangles appeared.")] + turns(8, 10)},
]  # fmt: skip


def make_app() -> typer.Typer:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:  # a callback keeps `eval` a sub-command even when it is the only one
        pass

    register(app)
    return app


def write(tmp_path, gold=GOLD, preds=PREDS, gold_text=None, pred_text=None):
    g, p = tmp_path / "gold.json", tmp_path / "pred.jsonl"
    g.write_text(gold_text if gold_text is not None else json.dumps(gold))
    p.write_text(pred_text if pred_text is not None else "\n".join(json.dumps(x) for x in preds) + "\n")
    return str(g), str(p)


def run(*args, env=None):
    return runner.invoke(make_app(), ["eval", *map(str, args)], env=env)


def test_table_and_json(tmp_path):
    gold, pred = write(tmp_path)
    out = tmp_path / "report.json"
    result = run(gold, pred, "--subset", "tv", "--json", out)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("PAUC x100 (omega=0.5, judge strict-v1)")
    assert lines[1].split()[:3] == ["subset", "examples", "spans"]
    rows = {line.split()[0]: line.split() for line in lines[3:] if not line.startswith("-")}
    assert set(rows) == {"tv", "web", "overall"}  # "b" has no subset field: it takes --subset
    assert rows["overall"][1:5] == ["2", "3", "4", "3"]  # examples, spans, replies, in span
    data = json.loads(out.read_text())
    assert data["omega"] == 0.5 and data["judge"] == "strict-v1" and "other_judges" not in data
    assert data["overall"]["pauc"] == pytest.approx(float(rows["overall"][5]), abs=0.05)
    # a: span 0 reply at 4 -> 3 at omega .5: (1*.5 + 3*2)/8; span 1 reply at 12 -> 11: (1*.5 + 2*2)/6
    # b: reply at 6 -> 5: (1*.5 + 3*2)/8
    expected = 100 * ((0.5 + 6) / 8 + (0.5 + 4) / 6 + (0.5 + 6) / 8) / 3
    assert data["overall"]["pauc"] == pytest.approx(expected)
    assert data["overall"]["n_replies_out_of_span"] == 1
    span = data["examples"][0]["spans"][0]
    assert span["reply_timespan"] == [2.0, 6.0] and span["replies"][0]["score"] == 2


def test_omega_option(tmp_path):
    gold, pred = write(tmp_path)
    out = tmp_path / "r.json"
    assert run(gold, pred, "--omega", "1", "--json", out).exit_code == 0
    assert json.loads(out.read_text())["overall"]["pauc"] == pytest.approx(100.0)
    result = run(gold, pred, "--omega", "1.5")
    assert result.exit_code == 2 and "omega" in result.stderr


def test_baselines_from_user_entries(tmp_path):
    gold, pred = write(tmp_path)
    out = tmp_path / "r.json"
    result = run(gold, pred, "--baselines", "--json", out)
    assert result.exit_code == 0, result.output
    table = result.stdout.split("PAUC x100 of the model and the baselines")[1].splitlines()
    assert table[1].split() == ["subset", "model", "silent", "every-turn"]  # no frames: no opencv, no oracle
    assert [line.split()[0] for line in table[3:] if not line.startswith("-")] == ["all", "web", "overall", "dup"]
    assert "opencv and oracle baselines need the benchmark's frames (--frames)" in result.stderr
    data = json.loads(out.read_text())
    assert data["baselines"]["silent"]["overall"]["pauc"] == pytest.approx(25.0)
    every = data["baselines"]["every-turn"]["overall"]
    assert every["n_replies"] > data["overall"]["n_replies"] and every["duplicate_pct"] > 0


def test_baselines_need_turn_times(tmp_path):
    preds = [{"question_id": "a", "model_response_list": [say(4, "A red circle appeared.")]}]
    gold, pred = write(tmp_path, preds=preds)
    result = run(gold, pred, "--baselines")
    assert result.exit_code == 2 and "--turn-interval" in result.stderr
    out = tmp_path / "r.json"
    result = run(gold, pred, "--baselines", "--turn-interval", "2", "--json", out)
    assert result.exit_code == 0, result.output
    assert "no prediction and count as silent: b" in result.stderr
    assert json.loads(out.read_text())["baselines"]["every-turn"]["overall"]["n_replies"] == 7  # a: 4, 6, ..., 16


@pytest.mark.parametrize(
    "gold_text, message",
    [
        ("[{]", "gold.json: not valid JSON"),
        ('{"question_id": "a"}', "JSON list of examples"),
        (json.dumps([{"question_id": "a", "answer": [{"content": "x"}]}]),
         "example #0 (question_id 'a'): answer[0] has no 'reply_timespan'"),
        (json.dumps([GOLD[0], {"question_id": "b", "answer": [{"content": "x", "reply_timespan": [5, 2]}]}]),
         "example #1 (question_id 'b'): answer[0].reply_timespan must have end > start"),
        (json.dumps([{"question_id": "a", "answer": [{"content": 3, "reply_timespan": [0, 2]}]}]),
         "answer[0].content must be a string"),
        (json.dumps([{"answer": []}]), "example #0 has no 'question_id'"),
        (json.dumps([GOLD[0], GOLD[0]]), "repeats the question_id"),
    ],
)  # fmt: skip
def test_malformed_gold(tmp_path, gold_text, message):
    gold, pred = write(tmp_path, gold_text=gold_text)
    result = run(gold, pred)
    assert result.exit_code == 6, result.output
    assert message in result.stderr


@pytest.mark.parametrize(
    "pred_text, message",
    [
        ('{"question_id": "a", "model_response_list": []}\n{oops\n', "pred.jsonl line 2: not valid JSON"),
        ("[" + json.dumps(PREDS[0]) + "]\n", "one JSON object a line"),
        (json.dumps({"question_id": "a"}), "line 1 (question_id 'a') has no 'model_response_list'"),
        (json.dumps({"question_id": "a", "model_response_list": [{"role": "assistant", "content": "x"}]}),
         "model_response_list[0] has no 'time'"),
        (json.dumps({"question_id": "a", "model_response_list": [say("4", "x")]}),
         "model_response_list[0].time must be a finite number"),
        (json.dumps({"question_id": "a", "model_response_list": [say(4, "NO REPLY")]}),
         "silent turns must be left out"),
        (json.dumps({"question_id": "a", "model_response_list": [{"role": "system", "content": "x", "time": 1}]}),
         "role must be 'user' or 'assistant'"),
    ],
)  # fmt: skip
def test_malformed_predictions(tmp_path, pred_text, message):
    gold, pred = write(tmp_path, pred_text=pred_text)
    result = run(gold, pred)
    assert result.exit_code == 6, result.output
    assert message in result.stderr


def test_missing_file(tmp_path):
    _, pred = write(tmp_path)
    result = run(tmp_path / "nope.json", pred)
    assert result.exit_code == 6 and "cannot read the gold file" in result.stderr


def test_unknown_judge(tmp_path):
    gold, pred = write(tmp_path)
    result = run(gold, pred, "--judge", "gpt-4")
    assert result.exit_code == 2 and "openai:MODEL@" in result.stderr


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    gold, pred = write(tmp_path)
    result = run(gold, pred, "--plots", tmp_path / "plots")
    assert result.exit_code == 0, result.output
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["a.png", "b.png"]
    assert (tmp_path / "plots" / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    gold, pred = write(tmp_path)
    result = run(gold, pred, "--plots", tmp_path / "plots")
    assert result.exit_code == 9
    assert 'pip install "edge-duet[plots]"' in result.stderr
    assert not (tmp_path / "plots").exists()  # it failed before judging or writing anything


def test_llm_judge_through_the_cli(tmp_path):
    from test_judges import FakeOpenAI

    def respond(body, i):
        return {"content": "no" if "Earlier replies" in body["messages"][-1]["content"] else "2"}

    with FakeOpenAI(respond) as server:
        gold, pred = write(tmp_path)
        cache = tmp_path / "cache.sqlite"
        args = (gold, pred, "--judge", f"openai:fake@{server.url}", "--cache", cache, "--judge-timeout", "5")
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert "judge openai:fake/rubric-v1" in result.stdout
        n = len(server.requests)
        assert n > 0
        assert run(*args).exit_code == 0
        assert len(server.requests) == n  # everything came from the cache
        assert run(*args, "--no-cache").exit_code == 0
        assert len(server.requests) == 2 * n


def test_several_judges(tmp_path):
    gold, pred = write(tmp_path)
    out = tmp_path / "r.json"
    result = run(gold, pred, "--judge", "strict,overlap", "--baselines", "--json", out)
    assert result.exit_code == 0, result.output
    titles = [line for line in result.stdout.splitlines() if line.startswith("PAUC x100 (omega")]
    assert [t.split("judge ")[1].split(")")[0] for t in titles] == ["strict-v1", "overlap-v2"]
    data = json.loads(out.read_text())
    assert data["judge"] == "strict-v1" and "examples" in data
    other = data["other_judges"]["overlap-v2"]
    assert other["judge"] == "overlap-v2" and "examples" not in other
    assert other["baselines"]["silent"]["overall"]["pauc"] == pytest.approx(25.0)
    # the strict judge is the harder one: the every-turn baseline repeats a stale reply into later spans
    assert data["baselines"]["every-turn"]["overall"]["pauc"] < other["baselines"]["every-turn"]["overall"]["pauc"]
    assert run(gold, pred, "--judge", "strict,strict").exit_code == 2


def test_opencv_and_oracle_baselines_on_a_generated_benchmark(tmp_path):
    """The frame-reading baselines on a small rendered split: the OpenCV pipeline sees frames and questions only
    (the same predictions with the gold answers blanked), and scores far above the silent baseline."""
    from edge_duet.eval import baselines as bl
    from edge_duet.eval.benchmark import write_benchmark
    from edge_duet.eval.formats import GoldAnswer, load_gold
    from edge_duet.runtime.infer import load_examples

    bench = write_benchmark(tmp_path / "bench", seed=5, n_examples=12)
    gold = load_gold(bench / "gold.json")
    streams = {ex.question_id: ex for ex in load_examples(bench / "infer_input.json")}
    cv = bl.opencv_predictions(gold, streams)
    blank = [replace(ex, answers=tuple(GoldAnswer("?", a.reply_timespan_s) for a in ex.answers)) for ex in gold]
    assert bl.opencv_predictions(blank, streams) == cv
    assert sum(len(p.replies) for p in cv) >= len(gold)

    pred = tmp_path / "silent.jsonl"
    pred.write_text("".join(json.dumps({"question_id": ex.question_id, "model_response_list": turns(2, 4)}) + "\n"
                            for ex in gold))  # fmt: skip
    out = tmp_path / "r.json"
    result = run(bench / "gold.json", pred, "--baselines", "--json", out)  # --frames: infer_input.json beside gold
    assert result.exit_code == 0, result.output
    b = json.loads(out.read_text())["baselines"]
    assert set(b) == {"silent", "every-turn", "opencv", "oracle"}
    assert b["opencv"]["overall"]["pauc"] >= 65.0, b["opencv"]["overall"]
    assert b["oracle"]["overall"]["pauc"] >= b["opencv"]["overall"]["pauc"] - 1.0
    assert b["oracle"]["overall"]["n_replies_in_span"] == b["oracle"]["overall"]["n_replies"]
    result = run(bench / "gold.json", pred, "--baselines", "--frames", tmp_path / "nope.json")
    assert result.exit_code == 6 and "nope.json" in result.stderr
