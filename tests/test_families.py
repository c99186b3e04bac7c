"""Model families as declared data (edge_duet/families.py): which checkpoints export, which bundles run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edge_duet.errors import BundleError, CheckpointError
from edge_duet.families import DEFAULT_FAMILY, FAMILIES, QWEN2_5_VL, check_geometry, family_for_config
from edge_duet.manifest import Manifest
from edge_duet.bundle_io import default_model_dir as demo_bundle_dir


def test_qwen2_5_vl_configs_nested_and_flat_are_one_family():
    nested = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "text_config": {"hidden_size": 2048}}
    flat = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048}
    assert family_for_config(nested) is QWEN2_5_VL and family_for_config(flat) is QWEN2_5_VL
    assert family_for_config({"model_type": "qwen2_5_vl"}) is QWEN2_5_VL  # a fine-tune that renamed its class


@pytest.mark.parametrize("model_type, phrase", [
    ("qwen3_vl", "DeepStack"), ("qwen2_vl", "window attention"), ("llama", "Qwen2_5_VLForConditionalGeneration")])
def test_other_families_get_a_precise_refusal(model_type, phrase):
    with pytest.raises(CheckpointError) as err:
        family_for_config({"model_type": model_type, "architectures": ["SomethingForCausalLM"]}, where="ckpt")
    assert phrase in str(err.value) and "ckpt" in str(err.value)


def test_preprocessor_geometry_must_match_the_family():
    check_geometry(QWEN2_5_VL, {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2})
    with pytest.raises(CheckpointError, match="patch_size=16 \\(a qwen2.5-vl model has 14\\)"):
        check_geometry(QWEN2_5_VL, {"patch_size": 16, "merge_size": 2})


def _demo_manifest() -> dict:
    return json.loads((demo_bundle_dir() / "manifest.json").read_text())


def test_a_manifest_without_family_is_qwen2_5_vl_and_an_unknown_family_is_refused():
    data = _demo_manifest()
    data.pop("family", None)
    assert Manifest.from_json(data).family == DEFAULT_FAMILY == "qwen2.5-vl"
    data["family"] = "qwen3-vl"
    with pytest.raises(BundleError, match="'qwen3-vl' model; this edge-duet runs qwen2.5-vl"):
        Manifest.from_json(data)
    assert set(FAMILIES) == {"qwen2.5-vl"}


def test_export_records_the_family_and_refuses_another_before_any_work(tiny_export, tmp_path):
    ckpt, bundle = tiny_export
    assert json.loads((bundle / "manifest.json").read_text())["family"] == "qwen2.5-vl"
    other = tmp_path / "qwen3"
    shutil.copytree(ckpt, other)
    config = json.loads((other / "config.json").read_text())
    config.update(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"])
    (other / "config.json").write_text(json.dumps(config))
    proc = subprocess.run([sys.executable, "-m", "edge_duet.apps.cli", "export", str(other), str(tmp_path / "b")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == CheckpointError.exit_code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "not supported yet" in proc.stderr and "docs/families.md" in proc.stderr
    assert not (tmp_path / "b").exists()
