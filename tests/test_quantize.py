"""Quantized bundles (edge_duet.quant): recipes, what each quantizer changed, the new bundle's manifest, and
`edge-duet compare` on the tiny random bundle (random weights: agreement numbers here test the plumbing, not
quantization quality)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_duet.errors import UsageError, ValidationError
from edge_duet.manifest import Manifest

pytest.importorskip("onnx", reason="quantizing needs the quant extra: pip install -e .[quant]")

from edge_duet.quant import quantize as q  # noqa: E402
from edge_duet.quant.compare import CompareOptions, compare_bundles, generated_dialogues  # noqa: E402
from edge_duet.quant.compare_table import format_table  # noqa: E402
from edge_duet.quant.quantize import QuantOptions, quantize_bundle  # noqa: E402
from edge_duet.quant.recipes import PRESETS, Recipe  # noqa: E402
from edge_duet.runtime.events import Reply, Silence  # noqa: E402
from edge_duet.runtime.session import Session, SessionOptions  # noqa: E402

QUIET = dict(log=lambda s: None)


# ----------------------------------------------------------------------------------------------- recipes


def test_presets_and_per_graph_recipes_parse():
    assert Recipe.parse("int4") == Recipe("int4", "int4", "int4")
    assert Recipe.parse("decoder=int4") == Recipe("fp32", "fp32", "int4")
    r = Recipe.parse("vision=fp16, embed=int8, decoder=int4-fp16, lm_head=w8")
    assert (r.vision, r.embed, r.decoder, r.head) == ("fp16", "int8", "int4-fp16", "w8")
    assert r.precision_label("decoder") == "int4-fp16;lm_head=w8"
    assert str(Recipe.parse(PRESETS["jetson"])) == "jetson"  # presets print by name
    assert str(Recipe.parse("decoder=int4,lm_head=fp32")) == "vision=fp32,embed=fp32,decoder=int4,lm_head=fp32"


@pytest.mark.parametrize("text, message", [
    ("int5", "unknown recipe"),
    ("decoder=int5", "is not one of"),
    ("decoder=int4,head=fp32", "unknown part"),
    ("decoder=int4,decoder=int8", "given twice"),
    ("lm_head=int8", "needs a quantized decoder"),
    ("decoder=int4-fp16,lm_head=int8", "use lm_head=w8"),
    ("decoder=int4,lm_head=fp16", "computes in float32"),
    ("embed=int4-qdq", "no Gather"),
    ("decoder=int4-qdq,lm_head=w8", "plain ONNX ops"),
])
def test_bad_recipes_say_what_is_allowed(text, message):
    with pytest.raises(UsageError, match=message):
        Recipe.parse(text)


def test_weight_byte_estimates():
    assert q.estimate_weight_bytes(1000, "fp16") == 2000
    assert q.estimate_weight_bytes(1024, "int4", block_size=32) == 1024 * (0.5 + 4 / 32)
    assert q.estimate_weight_bytes(1024, "int4-fp16", block_size=128) == 1024 * (0.5 + 2 / 128)
    assert q.estimate_weight_bytes(1024, "w8", block_size=32, symmetric=False) == 1024 * (1 + 5 / 32)


# ----------------------------------------------------------------------------------------------- graph rewrites


def _gemm_model():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 16)).astype(np.float32)  # (out, in): transB=1, as torch exports nn.Linear
    b = rng.standard_normal(24).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])],
                              initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, feeds):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_gemm_is_rewritten_to_matmul_exactly():
    model = _gemm_model()
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    before = _run(model, {"x": x})
    assert q.gemm_to_matmul(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add"]
    np.testing.assert_allclose(_run(model, {"x": x}), before, rtol=1e-6, atol=1e-6)


def test_int4_quantizes_a_gemm_graph_after_the_rewrite():
    model, result = q.quantize_graph(_gemm_model(), "vision", "int4", None, QuantOptions(), Path("."))
    assert (result.weight_ops, result.quantized_ops, result.rewritten_gemm) == (1, 1, 1)
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)


def test_a_quantizer_that_changed_nothing_is_an_error(tmp_path):
    """A graph whose only MatMul multiplies two activations has nothing for the weight quantizers."""
    from onnx import TensorProto, helper

    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="attn")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4])
                                            for n in ("a", "b")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for precision in ("int4", "int8", "fp16"):
        _, result = q.quantize_graph(model, "decoder", precision, None, QuantOptions(), tmp_path)
        assert result.quantized_ops == 0
        with pytest.raises(ValidationError, match="none of its 0 weight ops changed"):
            q.check_changed({"decoder": result}, Recipe(decoder=precision))


def test_a_silent_no_op_quantizer_fails_the_bundle_and_leaves_nothing(tiny_bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(q, "_block_quant", lambda model, *a, **k: model)  # "quantizes" nothing
    out = tmp_path / "int4"
    with pytest.raises(ValidationError) as info:
        quantize_bundle(tiny_bundle, out, "int4", QuantOptions(check=False), **QUIET)
    assert [m.split(":")[0] for m in info.value.mismatches] == ["vision", "embed", "decoder", "decoder_fused"]
    assert not out.exists() and not list(tmp_path.glob(".int4.tmp-*"))


# ----------------------------------------------------------------------------------------------- bundles


def _dialogue_events(bundle: Path, turns: int = 4) -> list:
    s = Session(bundle, SessionOptions(max_new_tokens=6, providers="cpu"))
    d = generated_dialogues(1, turns, s.manifest.prompt.frames_per_turn, 1.0, 112, seed=3)[0]
    events = []
    for t in d.turns:
        if t.text:
            s.ask(t.text, must_reply=t.must_reply, t=t.time_s)
        s.add_frames(list(t.frames), t=t.time_s, channels="rgb")
        events += [e for e in s.step() if isinstance(e, (Reply, Silence))]
    return events + [e for e in s.finish() if isinstance(e, (Reply, Silence))]


@pytest.fixture(scope="module")
def int8_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "int8"
    report = quantize_bundle(tiny_bundle, out, "int8", **QUIET)
    return out, report


@pytest.fixture(scope="module")
def int4_bundle(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "int4"
    report = quantize_bundle(tiny_bundle, out, "int4", QuantOptions(block_size=16), **QUIET)
    return out, report


@pytest.mark.parametrize("which", ["int8_bundle", "int4_bundle"])
def test_quantized_bundle_manifest_records_what_changed(which, tiny_bundle, request):
    out, report = request.getfixturevalue(which)
    recipe = which.split("_")[0]
    m, src = Manifest.load(out), Manifest.load(tiny_bundle)
    m.check_files(out)  # checksums recomputed
    assert m.variant == recipe
    for g in ("vision", "embed", "decoder"):
        r = report.graphs[g]
        assert m.graphs[g].precision == recipe
        assert m.graphs[g].quantized_ops == r.quantized_ops == r.weight_ops > 0  # every weight op changed
        assert r.size_bytes < r.source_size_bytes
    assert report.graphs["vision"].rewritten_gemm > 0  # the TorchScript exporter's Gemms were rewritten
    entry = m.provenance[-1]
    assert entry["step"] == "quantize" and entry["recipe"] == recipe
    assert entry["source"]["bundle"] == str(Path(tiny_bundle).resolve())
    assert entry["source"]["files"]["decoder.onnx"] == src.files["decoder.onnx"]
    assert entry["options"]["block_size"] == (16 if recipe == "int4" else 32)
    assert 0.5 < entry["check"]["logits_cosine"] <= 1.0 + 1e-6
    assert (out / "tokenizer.json").read_bytes() == (Path(tiny_bundle) / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("which", ["int8_bundle", "int4_bundle"])
def test_quantized_bundles_run_and_pass_compare(which, tiny_bundle, request):
    out, _ = request.getfixturevalue(which)
    events = _dialogue_events(out)
    assert {e.turn for e in events} == {0, 1, 2, 3}
    report = compare_bundles(tiny_bundle, out, options=CompareOptions(
        dialogues=2, turns=4, probe_turns=2, probe_tokens=6, max_new_tokens=6, isolate=which == "int8_bundle"),
        **QUIET)
    d, c = report.decisions, report.decisions["confusion_a_b"]
    assert d["turns"] == len(report.per_turn) == 8 and sum(c.values()) == 8
    # the count, the confusion matrix and the per-turn table are three views of the same decisions
    assert d["agree"] == c["reply/reply"] + c["silence/silence"] == sum(t["a"] == t["b"] for t in report.per_turn)
    assert d["agreement"] == pytest.approx(d["agree"] / 8)
    p = report.probe
    assert p["positions"] > 0 and len(p["per_position_cosine"]) == p["positions"]
    assert p["logits_cosine"] == pytest.approx(np.mean(p["per_position_cosine"]))
    assert p["logits_cosine_min"] == pytest.approx(min(p["per_position_cosine"]))
    assert p["logits_cosine"] > 0.5  # quantized, not broken: the bound quantize's own check holds it to
    if which == "int8_bundle":  # int8 keeps the tiny model's logits close, even on random weights
        assert report.probe["logits_cosine"] > 0.99 and report.probe["argmax_agree"] > 0.9
        assert report.a["peak_rss_mib"] > 10 and report.b["peak_rss_mib"] > 10  # measured in worker processes
    assert report.b["size_mib"] < report.a["size_mib"]
    table = format_table(report)
    assert "reply/silence decision agreement" in table and f"({d['agree']}/8 turns)" in table


def test_fp16_bundle_runs_with_float32_io(tiny_bundle, tmp_path):
    out = tmp_path / "fp16"
    report = quantize_bundle(tiny_bundle, out, "fp16", **QUIET)
    m = Manifest.load(out)
    assert all(t.dtype in ("float32", "int64") for g in m.graphs.values() for t in (*g.inputs, *g.outputs))
    assert report.check["logits_cosine"] > 0.999 and report.check["argmax_agree"] == 1.0
    assert _dialogue_events(out, turns=2)


def test_lm_head_can_stay_float(tiny_bundle, tmp_path):
    out = tmp_path / "head"
    report = quantize_bundle(tiny_bundle, out, "decoder=int4,lm_head=fp32", QuantOptions(check=False), **QUIET)
    dec = report.graphs["decoder"]
    assert dec.quantized_ops == dec.weight_ops - 1 and len(dec.left_fp32) == 1
    assert Manifest.load(out).graphs["decoder"].precision == "int4;lm_head=fp32"
    assert Manifest.load(out).graphs["vision"].quantized_ops == 0


def test_refuses_to_overwrite_or_requantize(tiny_bundle, int8_bundle, tmp_path):
    out, _ = int8_bundle
    with pytest.raises(UsageError, match="already exists"):
        quantize_bundle(tiny_bundle, out, "int8", **QUIET)
    with pytest.raises(UsageError, match="quantize from the fp32 bundle"):
        quantize_bundle(out, tmp_path / "again", "int4", **QUIET)
    with pytest.raises(UsageError, match="new directory"):
        quantize_bundle(tiny_bundle, tiny_bundle, "int8", QuantOptions(overwrite=True), **QUIET)


def test_the_same_recipe_again_copies_every_graph_both_decoders_included(int8_bundle, tmp_path):
    # Graphs already at the recipe's precision are copied; the fused decoder follows the same rule as the plain one
    # (it was once quantized a second time, and the no-op quantizer check then failed the bundle).
    src, _ = int8_bundle
    report = quantize_bundle(src, tmp_path / "again", "int8", QuantOptions(check=False), **QUIET)
    m = Manifest.load(tmp_path / "again")
    assert set(report.graphs) == set(m.graphs) and "decoder_fused" in m.graphs
    for name, spec in m.graphs.items():
        assert (tmp_path / "again" / spec.path).read_bytes() == (src / spec.path).read_bytes(), name
        assert report.graphs[name].precision == "int8"


# ----------------------------------------------------------------------------------------------- CLI, benchmark


def _tiny_benchmark(root: Path) -> Path:
    """Two examples in the benchmark's layout: infer_input.json (frames), gold.json (answer spans)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    infer, gold = [], []
    for e in range(2):
        conv = []
        for k in range(3):
            paths = []
            for f in range(2):
                p = root / "frames" / f"ex{e}" / f"{k}-{f}.png"
                p.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(p)
                paths.append({"type": "image", "image": str(p.relative_to(root))})
            text = [{"type": "text", "text": "Tell me when something appears."}] if k == 0 else []
            conv.append({"role": "user", "content": paths + text, "time": 2.0 * (k + 1)})
        infer.append({"question_id": f"ex{e}", "conversation": conv})
        gold.append({"question_id": f"ex{e}", "video": "v.mp4", "duration": 6.0, "subset": "appear",
                     "conversation": [{"role": "user", "content": "Tell me when something appears.", "time": 0.0}],
                     "answer": [{"role": "assistant", "content": "A red square appeared.",
                                 "reply_timespan": [3.0, 5.0]}]})
    (root / "infer_input.json").write_text(json.dumps(infer))
    (root / "gold.json").write_text(json.dumps(gold))
    return root


def test_cli_quantize_and_compare_on_a_benchmark(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from edge_duet.apps.cli import app

    runner = CliRunner()
    out = tmp_path / "w8"
    r = runner.invoke(app, ["quantize", str(tiny_bundle), str(out), "--recipe", "w8", "--no-check"])
    assert r.exit_code == 0, r.output
    assert "weight ops changed" in r.output
    r = runner.invoke(app, ["quantize", str(tiny_bundle), str(out), "--recipe", "w8"])
    assert r.exit_code == 2 and "--overwrite" in r.output
    bench = _tiny_benchmark(tmp_path / "bench")
    r = runner.invoke(app, ["compare", str(tiny_bundle), str(out), "--benchmark", str(bench), "--no-isolate",
                            "--probe-turns", "1", "--probe-tokens", "4", "--max-new-tokens", "4", "--json", "-"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output[r.output.index("{"):])
    assert data["decisions"]["turns"] == 6
    bm = data["benchmark"]
    assert bm["examples"] == 2 and bm["overall"]["spans"] == 2
    assert bm["overall"]["pauc_delta"] == pytest.approx(bm["overall"]["pauc_b"] - bm["overall"]["pauc_a"])
