"""GPU execution and TensorRT engines.

The parts that need no GPU run everywhere: optimisation profiles, refusing graphs TensorRT cannot run, the
missing-TensorRT error, stale-engine detection, the EPContext wrapper, and the IO-binding engine (run on the host
with providers="cpu"). Tests marked ``gpu`` need onnxruntime-gpu and a CUDA device and skip with a reason
otherwise; the TensorRT ones also need NVIDIA's ``tensorrt`` package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_duet.errors import BundleError, MissingExtraError, UsageError
from edge_duet.manifest import Manifest
from edge_duet.quant import engines as eng
from edge_duet.quant.compare import _probe, generated_dialogues, probe_metrics
from edge_duet.quant.quantize import QuantOptions, quantize_bundle
from edge_duet.runtime import gpu
from edge_duet.runtime.engine import Engine
from edge_duet.runtime.session import Session, SessionOptions

QUIET = dict(log=lambda s: None)


def need_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (this onnxruntime has no CUDA provider)")
    if not gpu.cuda_available():
        pytest.skip("needs a CUDA GPU (no CUDA driver/device on this machine)")


def need_tensorrt():
    need_cuda()
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("needs NVIDIA's tensorrt Python package (JetPack / pip from NVIDIA's index)")


def _events(bundle, engine=None, turns=5, max_new_tokens=8):
    return _events_on(Session(bundle, SessionOptions(max_new_tokens=max_new_tokens, providers="cpu"), engine=engine),
                      turns)


def _events_on(s, turns=5):
    d = generated_dialogues(1, turns, s.manifest.prompt.frames_per_turn, 1.0, 112, seed=1)[0]
    out = []
    for t in d.turns:
        if t.text:
            s.ask(t.text, must_reply=t.must_reply, t=t.time_s)
        s.add_frames(list(t.frames), t=t.time_s, channels="rgb")
        out += [{k: v for k, v in e.to_dict().items() if k != "latency_s"} for e in s.step()
                if e.kind in ("Reply", "Silence")]
    return out, s


# ----------------------------------------------------------------------------------------------- profiles, checks


def test_decoder_profile_spans_decode_and_prefill(tiny_bundle):
    m = Manifest.load(tiny_bundle)
    (p,) = gpu.profiles_for(m, "decoder", max_context_tokens=1024)
    t = m.text
    assert p.min["inputs_embeds"] == (1, 1, t.hidden_size) and p.max["inputs_embeds"] == (1, 1024, t.hidden_size)
    assert p.min["past.0.key"] == (1, t.num_kv_heads, 0, t.head_dim)  # first prefill: empty cache
    assert p.max["past.1.value"][2] == 1023 and p.max["attention_mask"] == (1, 1024)
    for shapes in (p.min, p.opt, p.max):  # opt inside the box, mask = past + seq at opt
        assert shapes["attention_mask"][1] <= 1024
    assert p.opt["attention_mask"][1] == p.opt["past.0.key"][2] + p.opt["inputs_embeds"][1]
    both = gpu.profiles_for(m, "decoder", max_context_tokens=1024, split=True)
    assert [x.name for x in both] == ["decode+prefill", "decode"]
    assert both[1].max["inputs_embeds"][1] == 1
    (v,) = gpu.profiles_for(m, "vision")
    unit = m.vision.merge_size ** 2
    assert all(v.min[k][0] % unit == 0 for k in ("pixel_values", "rotary_pos_ids"))
    assert v.max["reverse_index"][0] * unit == v.max["pixel_values"][0]
    opts = gpu.profiles_for(m, "embed")[0].ort_options()
    assert opts["trt_profile_max_shapes"] == f"input_ids:1x{m.prompt.max_context_tokens}"


def test_build_engines_refuses_contrib_op_graphs(tiny_bundle, tmp_path):
    out = tmp_path / "int4"
    quantize_bundle(tiny_bundle, out, "int4", QuantOptions(check=False), **QUIET)
    with pytest.raises(UsageError, match="MatMulNBits") as info:
        eng.build_engines(out, eng.EngineOptions(), **QUIET)
    assert "`providers` cuda" in str(info.value)
    int8 = tmp_path / "int8"
    quantize_bundle(tiny_bundle, int8, "int8", QuantOptions(check=False), **QUIET)
    with pytest.raises(UsageError, match="MatMulInteger"):
        eng.build_engines(int8, eng.EngineOptions(graphs=("decoder",)), **QUIET)


def test_trt_int4_recipe_keeps_plain_onnx_ops(tiny_bundle, tmp_path):
    """decoder=int4-qdq: int4 weights behind standard DequantizeLinear (opset 21), which TensorRT 10 builds
    weight-only int4 engines from; it also runs on the CPU provider."""
    import onnx

    out = tmp_path / "trt-int4"
    report = quantize_bundle(tiny_bundle, out, "trt-int4", **QUIET)
    m = Manifest.load(out)
    assert report.graphs["decoder"].quantized_ops == report.graphs["decoder"].weight_ops
    for g in ("vision", "embed", "decoder"):
        assert eng.tensorrt_blockers(onnx.load(str(out / m.graphs[g].path))) == []
    dec = onnx.load(str(out / "decoder.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in dec.graph.node) == report.graphs["decoder"].weight_ops
    assert report.check["argmax_agree"] > 0
    assert _events(out, turns=2)[0]


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_missing_tensorrt_names_how_to_get_it(tiny_bundle):
    with pytest.raises(MissingExtraError, match="python3-libnvinfer") as info:
        eng.build_engines(tiny_bundle, eng.EngineOptions(), **QUIET)
    assert info.value.exit_code == 9 and "--builder ort" in str(info.value)


def test_bad_engine_options():
    for kw in ({"precision": "int4"}, {"builder": "trtexec"}, {"graphs": ("lm_head",)},
               {"builder": "ort", "profiles": "split"}):
        with pytest.raises(UsageError):
            eng.build_engines("unused", eng.EngineOptions(**kw), **QUIET)


def _fake_engine(bundle: Path, graph: str = "decoder") -> dict:
    """A manifest record and files as build-engines writes them (the plan's bytes are not a real engine)."""
    m = Manifest.load(bundle)
    d = bundle / "engines"
    d.mkdir(exist_ok=True)
    (d / f"{graph}.fp16.plan").write_bytes(b"\0" * 100)
    io = [(t.name, "input", t.dtype, tuple(-1 if isinstance(x, str) else x for x in t.shape))
          for t in m.graphs[graph].inputs] + [(t.name, "output", t.dtype, tuple(-1 if isinstance(x, str) else x
                                                                                  for x in t.shape))
                                              for t in m.graphs[graph].outputs]
    import onnx

    ctx = eng.context_model(f"{graph}.fp16.plan", io, m.graphs[graph], "10.3.0", "87")
    onnx.save(ctx, str(d / f"{graph}.fp16_ctx.onnx"))
    record = {"graph": graph, "precision": "fp16", "plan": f"engines/{graph}.fp16.plan",
              "context_model": f"engines/{graph}.fp16_ctx.onnx", "plan_bytes": 100, "tensorrt": "10.3.0",
              "device": "Orin", "compute_capability": "8.7", "source": gpu.graph_fingerprint(bundle, m, graph)}
    eng.with_engine_records(m, {graph: record}, {"step": "build-engines"}).save(bundle)
    return record


def test_engine_records_and_staleness(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    record = _fake_engine(bundle)
    m = Manifest.load(bundle)  # the record survives a manifest round trip
    assert gpu.engine_records(m)["decoder"] == record
    assert m.provenance[-1]["step"] == "build-engines"
    assert gpu.stale_reasons(record, bundle, m, "10.3.0", "8.7") == []
    reasons = gpu.stale_reasons(record, bundle, m, "10.7.0", "8.9")
    assert any("TensorRT 10.3.0" in r for r in reasons) and any("compute capability 8.7" in r for r in reasons)
    (bundle / "engines" / "decoder.fp16.plan").write_bytes(b"\0" * 99)
    assert any("changed size" in r for r in gpu.stale_reasons(record, bundle, m))
    (bundle / "engines" / "decoder.fp16.plan").unlink()
    assert any("missing" in r for r in gpu.stale_reasons(record, bundle, m))
    other = dataclasses.replace(m.graphs["decoder"], path="vision.onnx")  # the graph file "changed"
    m2 = dataclasses.replace(m, graphs={**m.graphs, "decoder": other})
    assert any("changed since" in r for r in gpu.stale_reasons(record, bundle, m2))


def test_tensorrt_provider_refuses_a_stale_engine(tiny_bundle, tmp_path):
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    _fake_engine(bundle)
    m = Manifest.load(bundle)
    path, provs = gpu.session_config(bundle, m, "decoder", [gpu.TRT, gpu.CPU])
    assert path == bundle / "engines" / "decoder.fp16_ctx.onnx" and provs[0][0] == gpu.TRT
    path, provs = gpu.session_config(bundle, m, "vision", [gpu.TRT, gpu.CPU])  # no engine: ORT builds + caches
    assert path == bundle / "vision.onnx" and "trt_profile_min_shapes" in provs[0][1]
    (bundle / "engines" / "decoder.fp16.plan").write_bytes(b"\0" * 7)
    with pytest.raises(BundleError, match="stale.*build-engines"):
        gpu.session_config(bundle, m, "decoder", [gpu.TRT, gpu.CPU])


def test_context_model_wraps_the_engine_with_the_graph_io(tiny_bundle, tmp_path):
    import onnx

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    _fake_engine(bundle, "embed")
    ctx = onnx.load(str(bundle / "engines" / "embed.fp16_ctx.onnx"))
    onnx.checker.check_model(ctx)
    (node,) = ctx.graph.node
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert (node.op_type, node.domain) == ("EPContext", "com.microsoft")
    assert attrs["embed_mode"] == 0 and attrs["ep_cache_context"] == b"embed.fp16.plan"  # relative to the wrapper
    assert [i.name for i in ctx.graph.input] == ["input_ids"] and [o.name for o in ctx.graph.output] == ["inputs_embeds"]
    assert ctx.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "seq"


# ----------------------------------------------------------------------------------------------- IO binding


def test_bound_engine_matches_engine_on_the_host(tiny_bundle):
    # the plain decoder's IO binding (auto would pick the fused decoder on the CPU, which binds its own buffers)
    want, ref = _events(tiny_bundle, Engine(tiny_bundle, providers="cpu", decoder="plain"))
    got, s = _events(tiny_bundle, gpu.BoundEngine(tiny_bundle, providers="cpu", decoder="plain"))
    assert got == want
    assert isinstance(s.cache, gpu.DeviceKVCache) and s.cache.length == ref.cache.length
    assert s.cache.nbytes == ref.cache.nbytes
    host = s.cache.to_host()
    for (k, v), (rk, rv) in zip(host.layers, ref.cache.layers):
        np.testing.assert_allclose(k, rk, atol=1e-5)
        np.testing.assert_allclose(v, rv, atol=1e-5)
    cut = s.cache.truncate(17).to_host()
    assert cut.length == 17
    np.testing.assert_array_equal(cut.layers[1][0], host.layers[1][0][:, :, :17])
    # emptied (a reset, an eviction): no graph run, the host's empty cache, uploaded again by the next decode
    from edge_duet.runtime.engine import KVCache

    empty = s.cache.truncate(0)
    assert isinstance(empty, KVCache) and empty.length == 0
    s.reset()
    again, _ = _events_on(s)
    assert again == want



@pytest.mark.parametrize("n", [1, 2, 72])  # 72: the 3B's 36 layers of keys and values
def test_kv_slice_bytes_are_what_onnx_helper_writes(n):
    # The runtime writes the slicer's ONNX bytes itself (no onnx in `pip install edge-duet`); the reference is the
    # same graph built with onnx.helper, and the bytes must be identical, not merely similar.
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    from edge_duet.runtime.kv_slice import IR_VERSION, OPSET, kv_slice_model

    nodes = [helper.make_node("Slice", [f"kv{i}", "zero", "length", "axis"], [f"out{i}"]) for i in range(n)]
    ins = [helper.make_tensor_value_info(f"kv{i}", TensorProto.FLOAT, [1, "h", "t", "d"]) for i in range(n)]
    ins.append(helper.make_tensor_value_info("length", TensorProto.INT64, [1]))
    outs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [1, "h", "l", "d"]) for i in range(n)]
    inits = [helper.make_tensor(name, TensorProto.INT64, [1], [v]) for name, v in (("zero", 0), ("axis", 2))]
    graph = helper.make_graph(nodes, "kv_slice", ins, outs, initializer=inits)
    ref = helper.make_model(graph, ir_version=IR_VERSION, opset_imports=[helper.make_opsetid("", OPSET)])
    mine = kv_slice_model(n)
    onnx.checker.check_model(onnx.load_from_string(mine), full_check=True)
    assert mine == ref.SerializeToString()


def test_kv_slice_runs_in_onnx_runtime():
    import onnxruntime as ort

    from edge_duet.runtime.kv_slice import kv_slice_model

    sess = ort.InferenceSession(kv_slice_model(3), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    kv = [rng.standard_normal((1, 2, 9, 4)).astype(np.float32) for _ in range(3)]
    outs = sess.run(None, {**{f"kv{i}": x for i, x in enumerate(kv)}, "length": np.asarray([5], dtype=np.int64)})
    for x, y in zip(kv, outs):
        np.testing.assert_array_equal(y, x[:, :, :5])

# ----------------------------------------------------------------------------------------------- on a GPU


def _device_vs_host(bundle, engine) -> dict:
    """Teacher-forced probe: the host Engine decodes greedily, ``engine`` is fed the same tokens."""
    turns = generated_dialogues(1, 2, 2, 1.0, 112, seed=2)[0].turns
    host = Session(bundle, SessionOptions(providers="cpu"), engine=Engine(bundle, providers="cpu"))
    rows_h, toks = _probe(host, turns, 6, None)
    rows_d, _ = _probe(Session(bundle, SessionOptions(), engine=engine), turns, 6, toks)
    return probe_metrics(rows_h, rows_d, toks)


@pytest.mark.gpu
def test_cuda_io_binding_keeps_the_cache_on_the_device(tiny_bundle):
    need_cuda()
    engine = gpu.BoundEngine(tiny_bundle, providers="cuda")
    assert all(s.get_providers()[0] == gpu.CUDA for s in engine.sessions.values())
    got, s = _events(tiny_bundle, engine)
    want, _ = _events(tiny_bundle, Engine(tiny_bundle, providers="cpu"))
    assert [e["event"] for e in got] == [e["event"] for e in want]
    assert s.cache.layers[0][0].device_name().lower() == "cuda"
    assert s.cache.truncate(9).length == 9 and s.cache.truncate(9).layers[0][0].device_name().lower() == "cuda"
    m = _device_vs_host(tiny_bundle, gpu.BoundEngine(tiny_bundle, providers="cuda"))
    assert m["logits_cosine_min"] > 0.9999 and m["argmax_agree"] == 1.0


@pytest.mark.gpu
@pytest.mark.parametrize("recipe, min_cosine", [("fp16", 0.999), ("jetson", 0.95), ("int4", 0.95)])
def test_quantized_bundles_on_cuda(recipe, min_cosine, tiny_bundle, tmp_path):
    """The GPU kernels of a quantized bundle (fp16, MatMulNBits, GatherBlockQuantized) agree with the host's.
    (The host's int4 MatMulNBits computes with int8 activations (accuracy level 4): not bit-identical.)"""
    need_cuda()
    out = tmp_path / recipe
    quantize_bundle(tiny_bundle, out, recipe, QuantOptions(check=False), **QUIET)
    events, _ = _events(out, gpu.BoundEngine(out, providers="cuda"), turns=3)
    assert len(events) >= 3
    assert _device_vs_host(out, gpu.BoundEngine(out, providers="cuda"))["logits_cosine_min"] > min_cosine


@pytest.mark.gpu
def test_tensorrt_engines_build_run_and_go_stale(tiny_bundle, tmp_path):
    need_tensorrt()
    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    report = eng.build_engines(bundle, eng.EngineOptions(precision="fp16", max_context_tokens=1024), **QUIET)
    assert set(report.built) == {"vision", "embed", "decoder"}
    m = Manifest.load(bundle)
    assert all(r["tensorrt"] == gpu.installed_tensorrt() for r in gpu.engine_records(m).values())
    engine = gpu.BoundEngine(bundle, providers="tensorrt")
    got, _ = _events(bundle, engine, turns=3)
    want, _ = _events(bundle, Engine(bundle, providers="cpu"), turns=3)
    assert [e["event"] for e in got] == [e["event"] for e in want]
    again = eng.build_engines(bundle, eng.EngineOptions(precision="fp16", max_context_tokens=1024), **QUIET)
    assert sorted(again.kept) == ["decoder", "embed", "vision"]
    records = gpu.engine_records(m)
    records["decoder"] = {**records["decoder"], "tensorrt": "0.0.1"}
    data = json.loads((bundle / "manifest.json").read_text())
    data["export_info"][gpu.RECORD_KEY] = records
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="TensorRT 0.0.1"):
        gpu.BoundEngine(bundle, providers="tensorrt")
