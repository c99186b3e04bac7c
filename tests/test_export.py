"""Export: three tiny shapes validate against PyTorch; broken graphs, checkpoints and targets fail loudly."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from typer.testing import CliRunner  # noqa: E402

from edge_duet.apps.cli import app  # noqa: E402
from edge_duet.errors import BundleError, CheckpointError, UsageError, ValidationError  # noqa: E402
from edge_duet.export.checkpoint import load_model, make_checkpoint  # noqa: E402
from edge_duet.export.onnx_export import ExportOptions, export_bundle  # noqa: E402
from edge_duet.export.validate import validate_bundle  # noqa: E402
from edge_duet.manifest import Manifest  # noqa: E402

runner = CliRunner()


@pytest.mark.parametrize("shape", ["tiny", "tiny-mha", "tiny-deep"])
def test_export_validates_across_shapes(tmp_path, shape):
    # tiny: GQA 4/2 heads, tied head; tiny-mha: 3/3 heads, untied, 3 vision blocks with 2 full-attention;
    # tiny-deep: 8/1 heads, 4 layers, small windows so window attention really splits frames
    ckpt = make_checkpoint(tmp_path / "ckpt", shape, seed=1, init_std=0.1)
    report = export_bundle(ckpt, tmp_path / "bundle", ExportOptions(), log=lambda s: None)
    cases = report.validation.cases
    names = ["one frame", "two frames, two sizes", "turn on a cache + decode"]
    assert [c.name for c in cases] == names + [f"{n} [fused]" for n in names]  # both decoder flavours validated
    assert max(c.max_logit_diff for c in cases) <= 1e-4
    assert cases[2].greedy_agree.startswith("4/4") and cases[-1].greedy_agree.startswith("4/4")
    m = Manifest.load(tmp_path / "bundle")
    m.check_files(tmp_path / "bundle")
    assert m.export_info["validated"] is True
    assert set(m.graphs) == {"vision", "embed", "decoder", "decoder_fused"}
    assert m.decoder_flavours == ("plain", "fused")
    assert not list(tmp_path.glob(".bundle.tmp-*"))


def test_validation_fails_loudly_on_a_wrong_graph(tmp_path, tiny_checkpoint):
    # A decoder from another seed has the right shapes and the wrong weights: every case must be reported.
    other = make_checkpoint(tmp_path / "other", "tiny", seed=99, init_std=0.1)
    export_bundle(tiny_checkpoint, tmp_path / "good", ExportOptions(), log=lambda s: None)
    export_bundle(other, tmp_path / "bad", ExportOptions(validate=False), log=lambda s: None)
    shutil.copy(tmp_path / "bad" / "decoder.onnx", tmp_path / "good" / "decoder.onnx")
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    manifest["files"].pop("decoder.onnx")  # the checksum would catch it first; we want validation to
    (tmp_path / "good" / "manifest.json").write_text(json.dumps(manifest))
    model, _ = load_model(tiny_checkpoint)
    with pytest.raises(ValidationError) as err:
        validate_bundle(model, tmp_path / "good")
    text = str(err.value)
    assert len(err.value.mismatches) >= 3
    assert "one frame: max abs logit diff" in text and "turn on a cache" in text


def test_vision_graph_mismatch_is_reported(tmp_path, tiny_checkpoint):
    other = make_checkpoint(tmp_path / "other", "tiny", seed=7, init_std=0.1)
    export_bundle(tiny_checkpoint, tmp_path / "good", ExportOptions(validate=False), log=lambda s: None)
    export_bundle(other, tmp_path / "bad", ExportOptions(validate=False), log=lambda s: None)
    shutil.copy(tmp_path / "bad" / "vision.onnx", tmp_path / "good" / "vision.onnx")
    manifest = json.loads((tmp_path / "good" / "manifest.json").read_text())
    manifest["files"].pop("vision.onnx")
    (tmp_path / "good" / "manifest.json").write_text(json.dumps(manifest))
    model, _ = load_model(tiny_checkpoint)
    with pytest.raises(ValidationError):
        validate_bundle(model, tmp_path / "good")


def test_flat_hub_config_exports(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", "tiny", seed=2, flat_config=True, init_std=0.1)
    cfg = json.loads((ckpt / "config.json").read_text())
    assert "text_config" not in cfg and cfg["rope_scaling"]["type"] == "mrope"
    export_bundle(ckpt, tmp_path / "bundle", ExportOptions(), log=lambda s: None)
    assert Manifest.load(tmp_path / "bundle").text.mrope_section == (2, 3, 3)


def test_existing_bundle_needs_overwrite(tmp_path, tiny_checkpoint):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError, match="set `overwrite`"):
        export_bundle(tiny_checkpoint, out, ExportOptions(validate=False), log=lambda s: None)
    assert (out / "keep.txt").read_text() == "mine"
    export_bundle(tiny_checkpoint, out, ExportOptions(validate=False, overwrite=True), log=lambda s: None)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_failed_export_leaves_nothing(tmp_path, tiny_checkpoint, monkeypatch):
    import edge_duet.export.onnx_export as ox

    def boom(*a, **k):
        raise RuntimeError("simulated failure in the decoder export")

    monkeypatch.setattr(ox, "export_decoder", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(tiny_checkpoint, tmp_path / "bundle", ExportOptions(), log=lambda s: None)
    assert not (tmp_path / "bundle").exists()
    assert not list(tmp_path.glob(".bundle.tmp-*"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path, tiny_checkpoint):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(UsageError, match="cannot write"):
        export_bundle(tiny_checkpoint, ro / "bundle", ExportOptions(), log=lambda s: None)


def test_unwritable_output_path_under_a_file(tmp_path, tiny_checkpoint):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="cannot create"):
        export_bundle(tiny_checkpoint, tmp_path / "afile" / "sub" / "bundle", ExportOptions(), log=lambda s: None)


def test_wrong_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="LlamaForCausalLM"):
        export_bundle(tmp_path, tmp_path / "bundle", ExportOptions(), log=lambda s: None)


def test_missing_checkpoint_and_files(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_bundle(tmp_path / "nope", tmp_path / "bundle", ExportOptions(), log=lambda s: None)
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        export_bundle(copy, tmp_path / "bundle", ExportOptions(), log=lambda s: None)


def test_corrupt_safetensors_is_refused(tmp_path, tiny_checkpoint):
    copy = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="safetensors"):
        export_bundle(copy, tmp_path / "bundle", ExportOptions(), log=lambda s: None)
    (copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="safetensors"):
        export_bundle(copy, tmp_path / "bundle", ExportOptions(), log=lambda s: None)
    assert not (tmp_path / "bundle").exists()


def test_bundle_errors_are_clear(tmp_path, tiny_bundle):
    from edge_duet.runtime.engine import Engine

    with pytest.raises(BundleError, match="edge-duet export"):
        Engine(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    (broken / "decoder.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(BundleError, match="checksum"):
        Engine(broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing decoder.onnx"):
        Engine(broken)
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    m = json.loads((old / "manifest.json").read_text())
    m["format_version"] = 0
    (old / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="version 0"):
        Engine(old)
    (old / "manifest.json").write_text("{ not json")
    with pytest.raises(BundleError, match="not JSON"):
        Engine(old)


def test_cli_make_checkpoint_and_export(tmp_path):
    res = runner.invoke(app, ["make-checkpoint", str(tmp_path / "ck"), "--shape", "tiny", "--init-std", "0.1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["export", str(tmp_path / "ck"), str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "validation (ONNX Runtime vs PyTorch)" in res.output and "[decoder] done" in res.output
    res = runner.invoke(app, ["export", str(tmp_path / "ck"), str(tmp_path / "b")])
    assert res.exit_code == UsageError.exit_code and "--overwrite" in res.output
    assert Manifest.load(tmp_path / "b").decoder_flavours == ("plain", "fused")
    res = runner.invoke(app, ["export", str(tmp_path / "ck"), str(tmp_path / "b3"), "--no-fused", "--no-validate"])
    assert res.exit_code == 0, res.output
    assert Manifest.load(tmp_path / "b3").decoder_flavours == ("plain",)
    assert not (tmp_path / "b3" / "decoder_fused.onnx").exists()
    res = runner.invoke(app, ["export", str(tmp_path / "nothing"), str(tmp_path / "b2")])
    assert res.exit_code == CheckpointError.exit_code and "does not exist" in res.output


def test_vision_graph_handles_many_frame_sizes(tiny_bundle):
    from edge_duet.runtime.engine import Engine
    from edge_duet.runtime.preprocess import preprocess_frames

    e = Engine(tiny_bundle)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((56, 56), (300, 40), (200, 200))]
    patches, grids = preprocess_frames(frames, e.manifest.preprocess, channels="rgb")
    emb = e.encode_frames(patches, grids)
    assert emb.shape == (sum(t * h * w for t, h, w in grids) // 4, e.manifest.text.hidden_size)
    assert np.isfinite(emb).all()


@pytest.mark.parametrize("shape,flat", [("tiny", True), ("tiny-mha", False)])
def test_part_loader_gives_transformers_weights(tmp_path, shape, flat):
    # export builds the model part by part from the safetensors files (to fit a 3B in 16 GB); its weights and
    # buffers must be exactly what transformers' from_pretrained gives, hub (flat) and transformers-5 key names alike
    from edge_duet.export.checkpoint import PartLoader, inspect_checkpoint

    ckpt = make_checkpoint(tmp_path / "c", shape, seed=4, init_std=0.1, dtype="bfloat16", flat_config=flat)
    ref, _ = load_model(ckpt)  # float32
    parts = PartLoader(inspect_checkpoint(ckpt))
    for part in ("vision", "embed", "text"):
        parts.load(part)
    got = dict(parts.model.named_parameters(remove_duplicate=False))
    want = dict(ref.named_parameters(remove_duplicate=False))
    assert got.keys() == want.keys()
    for name, p in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], p), name
    for (name, b), (_, rb) in zip(parts.model.named_buffers(), ref.named_buffers()):
        assert torch.equal(b, rb), name
    assert (parts.model.lm_head.weight is parts.model.model.language_model.embed_tokens.weight) == (shape == "tiny")
    parts.release("vision")
    assert all(p.is_meta for p in parts.model.model.visual.parameters())
    assert not any(p.is_meta for p in parts.model.model.language_model.parameters())


def test_part_loader_reports_missing_weights(tmp_path):
    from safetensors.torch import load_file, save_file

    from edge_duet.export.checkpoint import PartLoader, inspect_checkpoint

    ckpt = make_checkpoint(tmp_path / "c", "tiny", seed=4)
    weights = load_file(ckpt / "model.safetensors")
    dropped = [k for k in weights if "layers.1.mlp" in k]
    save_file({k: v for k, v in weights.items() if k not in dropped}, ckpt / "model.safetensors", metadata={"format": "pt"})
    parts = PartLoader(inspect_checkpoint(ckpt))
    parts.load("vision")
    with pytest.raises(CheckpointError, match="3 missing"):
        parts.load("text")


def test_export_in_child_processes_equals_in_process(tmp_path, tiny_checkpoint, tiny_bundle):
    # big models export each graph in a child process (all its memory back to the system after each graph), the
    # decoder with its weights streamed from the checkpoint one at a time and its PyTorch reference in a child of
    # its own; the tiny shape takes the same path when asked, and must give the same bundle and validation
    import onnxruntime as ort

    report = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(isolate=True), log=lambda s: None)
    assert {"vision (child)", "embed (child)", "decoder (child)", "reference (child)"} <= set(report.stage_peak_gb)
    assert max(c.max_logit_diff for c in report.validation.cases) <= 1e-4
    assert report.validation.cases[-1].greedy_agree.startswith("4/4")
    a, b = Manifest.load(tiny_bundle), Manifest.load(tmp_path / "b")
    assert a.prompt == b.prompt and a.preprocess == b.preprocess
    assert [(t.name, t.shape) for t in a.graphs["decoder"].inputs] == [(t.name, t.shape) for t in b.graphs["decoder"].inputs]
    for g in ("vision", "embed"):
        ma, mb = onnx.load(str(tiny_bundle / f"{g}.onnx")), onnx.load(str(tmp_path / "b" / f"{g}.onnx"))
        wa = {t.name: onnx.numpy_helper.to_array(t) for t in ma.graph.initializer}
        wb = {t.name: onnx.numpy_helper.to_array(t) for t in mb.graph.initializer}
        assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa), g
    # the streamed decoder (dynamo, weights written one by one) computes what the in-process one does
    assert (tmp_path / "b" / "decoder.onnx.data").is_file()
    sa = ort.InferenceSession(str(tiny_bundle / "decoder.onnx"), providers=["CPUExecutionProvider"])
    sb = ort.InferenceSession(str(tmp_path / "b" / "decoder.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    t = a.text
    s, p = 6, 5
    feeds = {"inputs_embeds": rng.standard_normal((1, s, t.hidden_size)).astype(np.float32),
             "position_ids": np.arange(p, p + s).reshape(1, 1, s).repeat(3, 0).astype(np.int64),
             "attention_mask": np.ones((1, p + s), np.int64), "logits_index": np.array([s - 2, s - 1], np.int64)}
    for i in range(t.num_layers):
        for kv in ("key", "value"):
            feeds[f"past.{i}.{kv}"] = rng.standard_normal((1, t.num_kv_heads, p, t.head_dim)).astype(np.float32)
    out_a, out_b = sa.run(None, feeds), sb.run(None, feeds)
    assert [o.name for o in sa.get_outputs()] == [o.name for o in sb.get_outputs()]
    for x, y in zip(out_a, out_b):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
    # its linear layers are MatMuls on stored weights (no Transpose left in front), so the quantizers find them all
    from edge_duet.quant.graph_ops import weight_ops
    from edge_duet.quant.quantize import QuantOptions, quantize_bundle

    mb = onnx.load(str(tmp_path / "b" / "decoder.onnx"), load_external_data=False)
    inits = {t.name for t in mb.graph.initializer}
    assert not [n for n in mb.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert len(weight_ops(mb)) == len(weight_ops(onnx.load(str(tiny_bundle / "decoder.onnx"))))
    q = quantize_bundle(tmp_path / "b", tmp_path / "q", "cpu", QuantOptions(check=False), log=lambda s: None)
    assert q.graphs["decoder"].quantized_ops == q.graphs["decoder"].weight_ops == len(weight_ops(mb))


def test_a_streamed_decoder_holds_one_weight_at_a_time(tmp_path, tiny_checkpoint, monkeypatch):
    # the 3B decoder (12.4 GB in float32) is written from a model with no weights loaded: each weight is read from
    # the checkpoint while it is written and dropped after. Count the bytes of weights alive at once.
    import gc
    import weakref

    import edge_duet.export.writers as writers
    from edge_duet.export.checkpoint import PartLoader, inspect_checkpoint

    parts = PartLoader(inspect_checkpoint(tiny_checkpoint))
    alive, peak, sizes = [0], [0], []

    def read(param):
        arr = parts.read(param)
        sizes.append(arr.nbytes)
        alive[0] += arr.nbytes
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(arr, lambda n=arr.nbytes: alive.__setitem__(0, alive[0] - n))
        return arr

    real = writers._streamed_export

    def counting(*args):
        *rest, weights = args
        return real(*rest, read)

    monkeypatch.setattr(writers, "_streamed_export", counting)
    spec = writers.export_decoder(parts.model, tmp_path, 18, force_dynamo=True, weights=parts.read)
    gc.collect()
    assert spec.external_data == ("decoder.onnx.data",)
    assert all(p.is_meta for p in parts.model.model.language_model.parameters())  # nothing was loaded
    total = sum(sizes)
    assert total >= sum(p.numel() * 4 for p in parts.model.model.language_model.layers.parameters())
    assert peak[0] <= 2 * max(sizes) < total, (peak[0], max(sizes), total)  # not all at once: two at most


def test_export_straight_to_a_quantized_bundle(tmp_path, tiny_checkpoint):
    pytest.importorskip("onnx_ir")
    res = runner.invoke(app, ["export", str(tiny_checkpoint), str(tmp_path / "q"), "--quantize", "cpu"])
    assert res.exit_code == 0, res.output
    m = Manifest.load(tmp_path / "q")
    assert m.variant == "cpu" and m.graphs["decoder"].precision == "int4;lm_head=int8"
    assert m.export_info["validated"] is True  # the float32 export was validated before it was quantized
    check = m.provenance[-1]["check"]
    assert check["argmax_agree"] >= 0.5 and check["logits_cosine"] > 0.9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # the temporary float32 bundle is gone
    res = runner.invoke(app, ["export", str(tiny_checkpoint), str(tmp_path / "h"), "--dtype", "fp16"])
    assert res.exit_code == 0, res.output
    assert Manifest.load(tmp_path / "h").variant == "fp16"


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int3"], "unknown recipe"),
    (["--dtype", "int8"], "--dtype"),
    (["--dtype", "fp16", "--quantize", "int4"], "two precisions"),
])
def test_export_refuses_a_bad_precision_before_any_work(tmp_path, tiny_checkpoint, args, message):
    res = runner.invoke(app, ["export", str(tiny_checkpoint), str(tmp_path / "q"), *args])
    assert res.exit_code == UsageError.exit_code and message in res.output
    assert not list(tmp_path.iterdir())


def test_a_streamed_decoder_from_a_bf16_checkpoint_is_float32_throughout(tmp_path):
    # MMDuet2 ships bf16 weights; the streamed export traces the weightless model, whose types become the graph's.
    # A bf16 type left in the graph broke ONNX Runtime's int8 quantizer (its shape inference) at 3B.
    import edge_duet.export.writers as writers
    from edge_duet.export.checkpoint import PartLoader, inspect_checkpoint

    ckpt = make_checkpoint(tmp_path / "c", "tiny", seed=5, dtype="bfloat16", flat_config=True)
    parts = PartLoader(inspect_checkpoint(ckpt))
    writers.export_decoder(parts.model, tmp_path, 18, force_dynamo=True, weights=parts.read)
    model = onnx.load(str(tmp_path / "decoder.onnx"))
    types = {v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input, *model.graph.output)}
    types |= {t.data_type for t in model.graph.initializer if t.data_type in (1, 10, 16)}
    assert onnx.TensorProto.BFLOAT16 not in types and onnx.TensorProto.FLOAT in types
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


@pytest.mark.slow
def test_export_memory_stays_within_a_multiple_of_the_weights(tmp_path):
    # A mid-size shape (Qwen2.5-0.5B-like text, 0.54 B params: its graphs pass the size where export works part by
    # part in child processes). The 3B export with validation peaks at 0.95x its float32 weight bytes
    # (13.2 GB, docs/3b.md); fixed costs (libraries, tracing) weigh more here: measured 1.6x. Before the per-part
    # export it was 2.65x here and the 3B was killed at 24 GB.
    from edge_duet.export.checkpoint import inspect_checkpoint
    from edge_duet.export.memory import memory_plan

    ckpt = make_checkpoint(tmp_path / "c", "perf", seed=0, dtype="bfloat16", flat_config=True)
    plan = memory_plan(inspect_checkpoint(ckpt))
    weights_gb = 4 * plan.total_params / 1024**3
    report = export_bundle(ckpt, tmp_path / "b", ExportOptions(), log=lambda s: None)
    peaks = report.stage_peak_gb
    assert "decoder (child)" in peaks and "reference (child)" in peaks  # the big-model path was taken
    assert report.peak_rss_gb <= 2.0 * weights_gb, (report.peak_rss_gb, weights_gb, peaks)
    assert report.peak_rss_gb <= plan.need_gb(True), "the estimate export refuses by must not be optimistic"
    assert peaks["decoder (child)"] < peaks["reference (child)"]  # streamed: the decoder's weights never all loaded


def test_every_graph_names_each_initializer_once(tiny_export):
    # ONNX allows one initializer per name; the fused builder once wrote each layer's rotary shape constants again
    import collections

    import onnx

    bundle = tiny_export[1]
    for path in sorted(bundle.glob("*.onnx")):
        model = onnx.load(str(path), load_external_data=False)
        counts = collections.Counter(t.name for t in model.graph.initializer)
        assert [n for n, c in counts.items() if c > 1] == [], path.name
