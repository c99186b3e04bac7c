"""`edge-duet bench --quick` runs and writes its report. Benchmarks are not pass/fail: no timing is checked here,
only that every job ran every turn, that the report has the numbers the docs quote, and that the transformers
loops compute the same model as edge-duet (the scripted decisions hide the model's own choices: each record
keeps the model's top token at the turn's decision, before the script acted)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edge_duet.apps.cli import app


def test_bench_quick_on_a_bundle(tiny_bundle, tmp_path):
    pytest.importorskip("transformers", reason="the transformers baseline needs the export extra")
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(tiny_bundle), "--quick", "--baseline", "both", "--json", str(out),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = [j["name"] for j in report["jobs"]]
    assert names == ["edge fp32", "edge fp32 drop", "transformers demo", "transformers kv"]
    for res, summary in zip(report["results"], report["summaries"]):
        assert res["error"] is None
        assert [r["turn"] for r in res["records"]] == list(range(1, 7))
        assert set(summary["at"]) == {"1", "3", "6"}
        assert summary["peak_rss_gb"] > 0
    edge, _, demo, kv = report["summaries"]
    assert edge["silent_calls_max"] == 1  # silence is one decoder call...
    assert demo["silent_calls"] == kv["silent_calls"] == 3  # ...generate() one per token of "NO REPLY<|im_end|>"

    tops = {r["job"]["name"]: [rec["top"] for rec in r["records"]] for r in report["results"]}
    assert tops["transformers kv"] == tops["edge fp32"]  # the same ids, positions and frames every turn
    # The demo loop re-tokenizes the replies it re-renders, which may change the ids after the first reply.
    assert tops["transformers demo"][:2] == tops["edge fp32"][:2]
    assert report["machine"]["bandwidth_gbs"] > 0
    assert "transformers demo / edge fp32" in report["speedups"]
    assert "per turn at turn 6" in result.output


def test_bench_without_a_target_says_what_to_give(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--json", str(tmp_path / "b.json")])
    assert result.exit_code == 2
    assert "--shape" in result.output
