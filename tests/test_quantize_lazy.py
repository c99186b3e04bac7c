"""Quantizing a graph whose weights stay on disk (how a 3B decoder is quantized within 16 GB) gives exactly what
quantizing the fully loaded graph gives."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnx_ir")

from edge_duet.quant.lazy import load_lazy, materialize, stored_bytes, tensor_array  # noqa: E402
from edge_duet.quant.quantize import QuantOptions, quantize_bundle  # noqa: E402


def _externalize(bundle, out):
    """A copy of ``bundle`` whose vision and decoder weights live in ``<graph>.onnx.data`` files, as a 3B export's do."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for graph in ("vision", "decoder"):
        path = out / f"{graph}.onnx"
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{graph}.onnx.data", size_threshold=0)
        manifest["graphs"][graph]["external_data"] = [f"{graph}.onnx.data"]
        manifest["files"].pop(f"{graph}.onnx", None)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def external_bundle(tiny_bundle, tmp_path_factory):
    return _externalize(tiny_bundle, tmp_path_factory.mktemp("ext") / "bundle")


def test_lazy_loading_reads_no_weights_until_asked(external_bundle):
    model = load_lazy(external_bundle / "decoder.onnx")
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(not t.raw_data for t in external)
    full = onnx.load(str(external_bundle / "decoder.onnx"))
    by_name = {t.name: onnx.numpy_helper.to_array(t) for t in full.graph.initializer}
    for t in external[:20]:
        np.testing.assert_array_equal(tensor_array(t), by_name[t.name])
    assert stored_bytes(model) == sum(by_name[t.name].nbytes for t in model.graph.initializer)
    materialize(model)
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@pytest.mark.parametrize("recipe", ["cpu", "int4", "trt-int4", "jetson", "fp16", "vision=fp16,embed=fp32,decoder=int4-fp16,lm_head=fp32"])
def test_lazy_quantization_equals_in_memory_quantization(tiny_bundle, external_bundle, tmp_path, recipe):
    opts = QuantOptions(check=False)
    a = tmp_path / "in-memory"
    b = tmp_path / "lazy"
    quantize_bundle(tiny_bundle, a, recipe, opts, log=lambda s: None)
    quantize_bundle(external_bundle, b, recipe, opts, log=lambda s: None)
    for graph in ("vision", "embed", "decoder"):
        ma, mb = onnx.load(str(a / f"{graph}.onnx")), onnx.load(str(b / f"{graph}.onnx"))
        ia = {t.name: onnx.numpy_helper.to_array(t) for t in ma.graph.initializer}
        ib = {t.name: onnx.numpy_helper.to_array(t) for t in mb.graph.initializer}
        assert ia.keys() == ib.keys(), graph
        for name in ia:
            np.testing.assert_array_equal(ia[name], ib[name], err_msg=f"{graph}: {name}")
        assert [(n.op_type, list(n.input)) for n in ma.graph.node] == [(n.op_type, list(n.input)) for n in mb.graph.node]
    # the source bundle is untouched, and the new bundle has no pointer into it: every external location is a
    # file of its own, named relatively
    assert (external_bundle / "decoder.onnx.data").is_file()
    for graph in ("vision", "embed", "decoder"):
        m = onnx.load(str(b / f"{graph}.onnx"), load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    assert not e.value.startswith("/") and (b / e.value).is_file(), e.value
