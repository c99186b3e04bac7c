"""`edge-duet bench --quick` runs and writes its report. Benchmarks are not pass/fail: no timing is checked here,
only that every job ran every turn, that the report has the numbers the docs quote, and that the transformers
loops compute the same model as edge-duet (the scripted decisions hide the model's own choices: each record
keeps the model's top token at the turn's decision, before the script acted)."""

from __future__ import annotations

import json
import sys

import pytest
from typer.testing import CliRunner

from edge_duet.apps.cli import app


def test_bench_quick_on_a_bundle(tiny_bundle, tmp_path):
    pytest.importorskip("transformers", reason="the transformers baseline needs the export extra")
    out = tmp_path / "bench.json"
    # A 640-token budget: the context is half full from turn 4, so the session re-anchors (prefills a second
    # context through the same engine) in the last turns, without evicting yet.
    result = CliRunner().invoke(app, ["bench", str(tiny_bundle), "--quick", "--baseline", "both", "--json", str(out),
                                      "--max-context", "640", "--cache-dir", str(tmp_path / "cache")])
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

    assert edge["evictions"] == 0 and report["results"][0]["records"][-1]["cache_after"] > 320
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


def test_a_peer_that_cannot_run_is_reported_unavailable_with_the_reason(tiny_bundle, tmp_path):
    """No peer package here (CI installs neither onnxruntime-genai nor llama-cpp-python): the peer columns say why,
    edge-duet's column runs, and the command succeeds."""
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(tiny_bundle), "--quick", "--baseline", "none", "--no-drop-runs",
                                      "--decoder", "plain,fused", "--peers", "both", "--peer-python", sys.executable,
                                      "--json", str(out), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    names = ["edge fp32 plain", "edge fp32 fused", "onnxruntime-genai", "llama.cpp"]
    assert [j["name"] for j in report["jobs"]] == names
    plain, fused, ort_genai, llama = report["results"]
    for edge, flavour in ((plain, "plain"), (fused, "fused")):
        assert edge["unavailable"] is None and len(edge["records"]) == 6 and edge["info"]["decoder"] == flavour
    assert [r["top"] for r in plain["records"]] == [r["top"] for r in fused["records"]]  # one model, two graphs
    assert ort_genai["unavailable"].startswith("not installed: ") and "onnxruntime_genai" in ort_genai["unavailable"]
    assert llama["unavailable"].startswith("not installed: ") and "llama_cpp" in llama["unavailable"]
    assert ort_genai["records"] == llama["records"] == [] and ort_genai["error"] is None
    assert "onnxruntime-genai: unavailable: not installed: " in result.output
    status = next(line for line in result.output.splitlines() if line.startswith("status"))
    assert status.split()[1:] == ["ok", "ok", "unavailable", "unavailable"]


def test_peer_unavailable_without_an_interpreter(tiny_bundle, tmp_path):
    from edge_duet.bench.harness import Job
    from edge_duet.bench.peers import start_peer
    from edge_duet.errors import PeerUnavailable

    args = {"peer": "llama.cpp", "python": str(tmp_path / "no-venv" / "bin" / "python"), "llama_cpp_src": None,
            "cache": str(tmp_path), "checkpoint": None, "bundle": str(tiny_bundle), "options": {}, "system_prompt": ""}
    with pytest.raises(PeerUnavailable, match=r"peer interpreter .*no-venv/bin/python not found"):
        start_peer(Job("llama.cpp", "peer", args, str(tiny_bundle)))
    with pytest.raises(PeerUnavailable, match="no peer interpreter: pass --peer-python"):
        start_peer(Job("llama.cpp", "peer", {**args, "python": None}, str(tiny_bundle)))


def test_isolate_worker_holds_state_reraises_and_reports_its_peak():
    from edge_duet import isolate

    w = isolate.Worker(list, [1, 2], what="a list")  # the child holds list([1, 2]); module-level: picklable
    assert w.info is None  # a list has no ``info``
    w.call("append", 3)
    assert w.call("__len__") == 3
    peak = w.close()
    assert peak is None or peak > 1 << 20  # Linux: VmHWM of a Python process, more than a MiB
    w = isolate.Worker(list, [1])
    with pytest.raises(ValueError, match="99 is not in list"):
        w.call("index", 99)
    w.kill()


def test_the_table_of_a_saved_report_keeps_its_columns_apart_and_its_turns_in_order():
    # A report read back from its JSON (turn keys become strings) with cells wider than the job names: the
    # 200-turn peers run of docs/performance.md, where the breakdown cells once ran into each other.
    import re
    from pathlib import Path

    from edge_duet.bench.report import format_report

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "cpu2-bench-peers-200.json"
    report = json.loads(path.read_text())
    lines = format_report(report).splitlines()
    n_jobs = len(report["jobs"])
    table = [ln for ln in lines[1:] if not ln.startswith(("machine:", "note:")) and " / edge " not in ln]
    for line in table:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == n_jobs + 1, line
    turns = [int(m.group(1)) for ln in lines if (m := re.match(r"per turn at turn (\d+) ", ln))]
    assert turns == [1, 10, 50, 200]
    assert any(ln.startswith("  turn 200: render/vision/prefill/decode/other") for ln in lines)


def test_peer_names_on_the_command_line_and_in_the_library(tmp_path):
    from edge_duet.apps.cmd_bench import _peer_names
    from edge_duet.bench.peers import PEERS
    from edge_duet.bench.run import BenchRequest, run
    from edge_duet.errors import UsageError

    assert _peer_names("none", "/some/python") == []  # "none" once read as an unknown peer named none
    assert _peer_names("both", None) == list(PEERS)
    assert _peer_names(None, "/some/python") == list(PEERS) and _peer_names(None, None) == []
    assert _peer_names(" llama.cpp ,", None) == ["llama.cpp"]
    # the library refuses an unknown peer before any work (no checkpoint made, nothing exported)
    with pytest.raises(UsageError, match=r"`BenchRequest.peers`: unknown peer vllm"):
        run(BenchRequest(cache_dir=tmp_path / "cache", shape="tiny", peers=("llama.cpp", "vllm")), log=lambda s: None)
    assert not (tmp_path / "cache").exists()
    result = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--peers", "vllm", "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--peers: unknown peer vllm" in result.output


def test_turns_before_the_last_report_turn_are_refused_before_any_work(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--shape", "tiny", "--turns", "3", "--at", "1,5",
                                      "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 2 and "--turns (3) ends before the last of --at (5)" in result.output
    assert not (tmp_path / "c").exists()
