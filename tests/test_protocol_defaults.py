"""MMDuet2's protocol by default: a checkpoint as MMDuet2 publishes it (no proactive.json) gets MMDuet2's system
prompt, frame timing and per-frame pixel budget; each is overridable at export and at run time, and the manifest
and `edge-duet inspect` say where each value came from."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from edge_duet.apps.cli import app  # noqa: E402
from edge_duet.export.checkpoint import make_checkpoint, shape_from_name  # noqa: E402
from edge_duet.export.onnx_export import ExportOptions, export_bundle  # noqa: E402
from edge_duet.manifest import Manifest  # noqa: E402
from edge_duet.protocol import MMDUET2_MAX_PIXELS, MMDUET2_SYSTEM_PROMPT  # noqa: E402

runner = CliRunner()
STOCK_MAX_PIXELS = 12845056  # Qwen2.5-VL-3B's preprocessor_config.json


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny checkpoint in MMDuet2's published layout: flat config, stock pixel budget, no proactive.json."""
    root = tmp_path_factory.mktemp("published")
    shape = shape_from_name("tiny", max_pixels=STOCK_MAX_PIXELS)
    ckpt = make_checkpoint(root / "mmduet2-like", shape, seed=3, init_std=0.1, flat_config=True)
    bundle = root / "bundle"
    export_bundle(ckpt, bundle, ExportOptions(), log=lambda s: None)  # no flags, validated
    return ckpt, bundle


def test_a_published_checkpoint_has_no_settings_file(published):
    ckpt, _ = published
    assert not (ckpt / "proactive.json").exists()
    assert json.loads((ckpt / "preprocessor_config.json").read_text())["max_pixels"] == STOCK_MAX_PIXELS


def test_export_without_flags_uses_mmduet2s_protocol(published):
    _, bundle = published
    m = Manifest.load(bundle)
    assert m.prompt.system_prompt == MMDUET2_SYSTEM_PROMPT
    assert m.prompt.system_prompt.endswith('output "NO REPLY".')
    assert (m.prompt.frames_per_turn, m.prompt.frame_interval_s) == (2, 1.0)
    assert m.preprocess.max_pixels == MMDUET2_MAX_PIXELS == 128 * 28 * 28
    assert m.protocol_sources == {k: "mmduet2-default" for k in
                                  ("system_prompt", "frame_interval_s", "frames_per_turn", "max_context_tokens",
                                   "max_pixels")}
    assert m.export_info["checkpoint_max_pixels"] == STOCK_MAX_PIXELS


def test_a_camera_frame_gets_mmduet2s_token_budget_at_run_time(published):
    from edge_duet.runtime.session import Session, SessionOptions

    _, bundle = published
    frame = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)

    def visual_tokens(**opts) -> int:
        s = Session(bundle, SessionOptions(max_new_tokens=2, **opts))
        s.add_frames([frame], t=1.0, channels="rgb")
        before = s.context_tokens
        list(s.step())
        frames = [c for seg in s.segments for c in seg.chunks if c.grid is not None]
        assert s.context_tokens > before and len(frames) == 1
        return frames[0].num_tokens

    assert visual_tokens() == 13 * 9  # 640x480 -> 364x252: 117 tokens, not the ~390 of the stock budget
    assert visual_tokens(max_pixels=28 * 28 * 64) <= 64  # overridable at run time
    with pytest.raises(Exception, match="minimum"):
        visual_tokens(max_pixels=10)


def test_each_setting_can_be_overridden_at_export(published, tmp_path):
    ckpt, _ = published
    out = tmp_path / "b"
    export_bundle(ckpt, out, ExportOptions(validate=False, system_prompt="Watch closely.", max_pixels=28 * 28 * 32,
                                           frames_per_turn=1), log=lambda s: None)
    m = Manifest.load(out)
    assert (m.prompt.system_prompt, m.prompt.frames_per_turn, m.preprocess.max_pixels) == ("Watch closely.", 1, 25088)
    assert m.protocol_sources["system_prompt"] == m.protocol_sources["max_pixels"] == "export option"
    assert m.protocol_sources["frame_interval_s"] == "mmduet2-default"


def test_a_checkpoint_with_settings_keeps_them(tmp_path):
    from edge_duet.protocol import ProactiveDefaults

    ckpt = make_checkpoint(tmp_path / "c", shape_from_name("tiny", max_pixels=STOCK_MAX_PIXELS), seed=1,
                           proactive=ProactiveDefaults(system_prompt="Mine.", frame_interval_s=2.0))
    export_bundle(ckpt, tmp_path / "b", ExportOptions(validate=False), log=lambda s: None)
    m = Manifest.load(tmp_path / "b")
    assert (m.prompt.system_prompt, m.prompt.frame_interval_s) == ("Mine.", 2.0)
    assert m.protocol_sources["system_prompt"] == "proactive.json"
    # an edge-duet checkpoint without a budget of its own keeps its preprocessor's
    assert m.preprocess.max_pixels == STOCK_MAX_PIXELS
    assert m.protocol_sources["max_pixels"] == "preprocessor_config.json"


def test_inspect_says_what_a_bundle_and_a_checkpoint_will_do(published):
    ckpt, bundle = published
    for path in (bundle, ckpt):
        res = runner.invoke(app, ["inspect", str(path), "--camera-size", "640x480"])
        assert res.exit_code == 0, res.output
        out = res.output
        assert "[mmduet2-default] 'You are a helpful assistant. Your task is to answer questions" in out
        assert "2 per turn [mmduet2-default], 1 s apart" in out
        assert "100352 px per frame [mmduet2-default]" in out
        assert "camera 640x480" in out and "364x252, 117 visual tokens per frame" in out
        assert "decoder  fp32" in out
    res = runner.invoke(app, ["inspect", str(bundle), "--json"])
    info = json.loads(res.output)
    assert info["protocol"]["frame"]["visual_tokens"] == 117
    assert info["protocol"]["tokens_per_silent_turn"] > 2 * 117
    assert info["memory"]["estimate_bytes"] == info["memory"]["weights_bytes"] + info["memory"]["kv_cache_bytes_at_max_context"]
    ck = json.loads(runner.invoke(app, ["inspect", str(ckpt), "--json"]).output)
    assert ck["has_proactive_json"] is False and ck["export"]["memory_needed_gb"] > 0
    res = runner.invoke(app, ["inspect", str(bundle), "--camera-size", "big"])
    assert res.exit_code != 0 and "width x height" in res.output


def test_a_checkpoint_too_big_for_memory_is_refused_before_any_work(published, tmp_path):
    from edge_duet.errors import CheckpointError

    ckpt, _ = published
    out = tmp_path / "never"
    with pytest.raises(CheckpointError) as err:
        export_bundle(ckpt, out, ExportOptions(memory_gb=0.5), log=lambda s: None)
    text = str(err.value)
    assert "needs about" in text and "0.5 GB available" in text and "Try:" in text
    assert not out.exists() and not list(tmp_path.iterdir())
