"""Parity of runtime.preprocess with transformers' Qwen2VLImageProcessorPil, and its input errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from edge_duet.errors import InputError, UsageError
from edge_duet.manifest import PreprocessSpec
from edge_duet.runtime.preprocess import preprocess_frame, preprocess_frames, smart_resize

qwen_ip = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SPECS = {
    # The processor's defaults (Qwen2.5-VL-3B's preprocessor_config.json).
    "default": PreprocessSpec(56 * 56, 28 * 28 * 1280, 14, 2, 2, CLIP_MEAN, CLIP_STD),
    # MMDuet2-like budget: ~128 visual tokens per frame.
    "mmduet2": PreprocessSpec(28 * 28 * 16, 28 * 28 * 128, 14, 2, 2, CLIP_MEAN, CLIP_STD),
    # Another geometry (Qwen3-VL-like patch 16), other mean/std: nothing may be hard-coded to 14/2/2.
    "patch16": PreprocessSpec(64 * 64, 32 * 32 * 64, 16, 2, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def reference(spec: PreprocessSpec):
    return qwen_ip.Qwen2VLImageProcessorPil(
        min_pixels=spec.min_pixels,
        max_pixels=spec.max_pixels,
        patch_size=spec.patch_size,
        merge_size=spec.merge_size,
        temporal_patch_size=spec.temporal_patch_size,
        image_mean=list(spec.image_mean),
        image_std=list(spec.image_std),
    )


def ref_run(spec, images):
    out = reference(spec)(images=images, return_tensors="np")
    return out["pixel_values"], [tuple(int(v) for v in g) for g in out["image_grid_thw"]]


def random_rgb(h, w, seed=0):
    # Smooth content plus noise: bicubic overshoot and clipping both get exercised.
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / max(w - 1, 1), y * 255 / max(h - 1, 1), (x + y) % 256], axis=-1)
    noise = rng.integers(-60, 60, (h, w, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


# (height, width): resized down, below min_pixels, already exact, extreme non-square, x.5 rounding, odd sizes.
SIZES = [(480, 640), (20, 30), (280, 364), (57, 1000), (70, 126), (333, 251), (1080, 1920), (29, 29)]


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bgr_array_matches_reference(spec_name, size):
    spec = SPECS[spec_name]
    rgb = random_rgb(*size, seed=size[0] * 7 + size[1])
    want, want_grids = ref_run(spec, [Image.fromarray(rgb)])
    got, grid = preprocess_frame(np.ascontiguousarray(rgb[..., ::-1]), spec, channels="bgr")
    assert grid == want_grids[0]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("size", [(480, 640), (20, 30), (333, 251)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_rgb_array_and_pil_match_reference(size):
    spec = SPECS["mmduet2"]
    rgb = random_rgb(*size, seed=1)
    want, want_grids = ref_run(spec, [rgb])  # the reference also takes HxWx3 RGB arrays
    for frame, channels in [(rgb, "rgb"), (Image.fromarray(rgb), "bgr")]:  # channels is ignored for PIL
        got, grid = preprocess_frame(frame, spec, channels=channels)
        assert grid == want_grids[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_pil_modes_match_reference(mode):
    # RGBA/LA: transparency is composited onto white by the reference, not dropped.
    spec = SPECS["mmduet2"]
    rgb = random_rgb(150, 200, seed=2)
    rgba = np.concatenate([rgb, random_rgb(150, 200, seed=3)[..., :1]], axis=-1)
    image = Image.fromarray(rgba, mode="RGBA").convert(mode)
    want, want_grids = ref_run(spec, [image])
    got, grid = preprocess_frame(image, spec)
    assert grid == want_grids[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_strided_view_input():
    # A crop of a larger OpenCV frame is a non-contiguous view.
    spec = SPECS["mmduet2"]
    big = random_rgb(300, 400, seed=4)
    crop = big[10:250:1, 30:390]
    want, _ = ref_run(spec, [np.ascontiguousarray(crop)])
    got, _ = preprocess_frame(crop[..., ::-1], spec, channels="bgr")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_preprocess_frames_concatenates_in_order():
    spec = SPECS["mmduet2"]
    frames = [random_rgb(h, w, seed=h) for h, w in [(240, 320), (100, 100), (57, 1000)]]
    want, want_grids = ref_run(spec, frames)
    got, grids = preprocess_frames(frames, spec, channels="rgb")
    assert grids == want_grids
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_smart_resize_matches_reference_on_many_sizes():
    rng = random.Random(0)
    budgets = [(56 * 56, 28 * 28 * 1280), (28 * 28 * 16, 28 * 28 * 128), (4 * 28 * 28, 4 * 28 * 28)]
    for _ in range(2000):
        h = rng.randint(1, 4000)
        w = rng.randint(-(-h // 200), min(4000, h * 200))  # aspect ratio within 200
        factor = rng.choice([28, 32])
        lo, hi = rng.choice(budgets)
        assert smart_resize(h, w, factor, lo, hi) == qwen_ip.smart_resize(h, w, factor, lo, hi), (h, w, factor)


def test_smart_resize_rounds_halves_to_even():
    # 70/28 = 2.5 -> 2 and 126/28 = 4.5 -> 4 (Python's round), not 3 and 5.
    assert smart_resize(70, 126) == (56, 112)
    assert smart_resize(98, 98) == (112, 112)  # 3.5 -> 4


@pytest.mark.parametrize("h,w", [(1, 201), (2000, 9)])
def test_extreme_aspect_ratio_is_input_error(h, w):
    with pytest.raises(ValueError):
        qwen_ip.smart_resize(h, w)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(h, w)
    with pytest.raises(InputError, match="aspect ratio"):
        preprocess_frame(np.zeros((h, w, 3), np.uint8), SPECS["default"])


def test_aspect_ratio_of_exactly_200_is_allowed():
    assert smart_resize(10, 2000) == qwen_ip.smart_resize(10, 2000)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((32, 32, 3), np.float32),
        np.zeros((32, 32), np.uint8),
        np.zeros((32, 32, 4), np.uint8),
        np.zeros((3, 32, 32), np.uint8),
        np.zeros((0, 32, 3), np.uint8),
        np.zeros((32, 0, 3), np.uint8),
        [[0, 0, 0]],
        None,
    ],
    ids=["float", "gray2d", "bgra", "chw", "empty-h", "empty-w", "list", "none"],
)
def test_bad_frames_are_input_errors(frame):
    with pytest.raises(InputError):
        preprocess_frame(frame, SPECS["default"])


def test_empty_pil_image_is_input_error():
    with pytest.raises(InputError, match="empty"):
        preprocess_frame(Image.new("RGB", (0, 10)), SPECS["default"])


def test_no_frames_is_input_error():
    with pytest.raises(InputError, match="no frames"):
        preprocess_frames([], SPECS["default"])


def test_unknown_channels_is_usage_error():
    with pytest.raises(UsageError, match="channels"):
        preprocess_frame(np.zeros((32, 32, 3), np.uint8), SPECS["default"], channels="rgba")
