"""Frames -> vision-tower patches, bit-for-bit what transformers' Qwen2-VL image processor produces.

numpy + PIL only. The reference is ``Qwen2VLImageProcessorPil`` (transformers 5.x); every step below mirrors one of
its steps, including the dtypes, because "close" is not good enough for a parity test at 1e-6::

    HxWx3 uint8 (RGB)
      -> smart_resize (multiples of patch*merge within [min_pixels, max_pixels])
      -> PIL resize (uint8 in, uint8 out; bicubic by default)
      -> float64 * rescale_factor -> float32             (transformers' ``rescale``)
      -> (x - mean) / std in float32                      (transformers' ``normalize``)
      -> patchify: (gh/m, gw/m, m, m, C, T, P, P) raster  -> (gh*gw, C*T*P*P)

A still frame is repeated ``temporal_patch_size`` times on the time axis, so its grid is ``(1, gh, gw)``.
The patches come out in the processor's (merge-block raster) order; reordering into window order for the
vision graph is ``vision_index``'s job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from edge_duet.errors import BundleError, InputError, UsageError
from edge_duet.manifest import PreprocessSpec

__all__ = ["smart_resize", "resize_frame", "preprocess_frame", "preprocess_frames"]

# The aspect-ratio limit of the reference; beyond it the resized image would degenerate to one patch row.
MAX_ASPECT_RATIO = 200

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target ``(height, width)``: both multiples of ``factor``, area within ``[min_pixels, max_pixels]``.

    A copy of transformers' ``qwen2_vl.smart_resize``. Python's ``round`` rounds halves to even
    (``round(2.5) == 2``), which the reference relies on; do not replace it with ``floor(x + 0.5)``.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"frame size must be positive, got {height}x{width} (height x width).")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"frame aspect ratio {ratio:.1f} ({height}x{width}, height x width) is too extreme: "
            f"the model accepts at most {MAX_ASPECT_RATIO}:1. Crop the frame before passing it in."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb_image(frame, channels: str) -> Image.Image:
    """A PIL RGB image from an HxWx3 uint8 array (``channels`` = its order) or any PIL image."""
    if isinstance(frame, Image.Image):
        if frame.width == 0 or frame.height == 0:
            raise InputError(f"empty frame: PIL image of size {frame.width}x{frame.height} (width x height).")
        # Like transformers' convert_to_rgb: transparency is composited onto white, not dropped.
        if "A" in frame.getbands() or frame.info.get("transparency") is not None:
            rgba = frame.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return frame.convert("RGB")
    if not isinstance(frame, np.ndarray):
        raise InputError(
            f"a frame must be an HxWx3 uint8 numpy array or a PIL image, got {type(frame).__name__}."
        )
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise InputError(
            f"a frame must be an HxWx3 uint8 array, got shape {frame.shape} dtype {frame.dtype}. "
            "Convert it first, e.g. cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) or (x * 255).astype(np.uint8)."
        )
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise InputError(f"empty frame: array of shape {frame.shape}.")
    if channels == "bgr":
        frame = frame[..., ::-1]
    elif channels != "rgb":
        raise UsageError(f"channels must be 'bgr' (OpenCV) or 'rgb' (PIL, imageio), got {channels!r}.")
    # PIL reads the buffer directly: it must be C-contiguous (a BGR flip or a crop is a strided view).
    return Image.fromarray(np.ascontiguousarray(frame), mode="RGB")


def resize_frame(frame, spec: PreprocessSpec, channels: str = "bgr") -> Image.Image:
    """One frame -> the RGB PIL image the vision tower sees: smart-resized to the pixel budget, sides multiples of
    ``patch_size * merge_size``. (The remote backend sends this image, so the network carries no more pixels than
    the model uses.)"""
    image = _to_rgb_image(frame, channels)
    height, width = smart_resize(
        image.height, image.width, factor=spec.patch_size * spec.merge_size,
        min_pixels=spec.min_pixels, max_pixels=spec.max_pixels,
    )
    try:
        resample = _RESAMPLE[spec.resample.lower()]
    except KeyError:
        raise BundleError(
            f"unknown resample filter {spec.resample!r} in the bundle's preprocess spec; "
            f"allowed: {', '.join(sorted(_RESAMPLE))}. Re-export the bundle."
        ) from None
    if image.size != (width, height):  # PIL returns a plain copy for an unchanged size, so skipping is exact
        image = image.resize((width, height), resample=resample)
    return image


def preprocess_frame(frame, spec: PreprocessSpec, channels: str = "bgr") -> tuple[np.ndarray, tuple[int, int, int]]:
    """One frame -> ``(patches, grid_thw)``.

    frame: HxWx3 uint8 array in ``channels`` order ("bgr" from OpenCV, "rgb"), or a PIL image (any mode; always
    treated as RGB, ``channels`` is ignored for it).
    Returns patches float32 ``(gh*gw, C*T*P*P)`` (C=3, T=temporal_patch_size, P=patch_size) and
    ``grid_thw = (1, gh, gw)`` in patches (gh = resized height / P).
    """
    image = resize_frame(frame, spec, channels)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    height, width = image.height, image.width

    # (H, W, C) uint8. Rescale in float64 then cast, normalize in float32: the reference's exact arithmetic.
    x = (np.asarray(image).astype(np.float64) * spec.rescale_factor).astype(np.float32)
    mean = np.asarray(spec.image_mean, dtype=np.float32)
    std = np.asarray(spec.image_std, dtype=np.float32)
    x = (x - mean) / std

    gh, gw = height // p, width // p
    # (H, W, C) -> (gh/m, m, P, gw/m, m, P, C) -> (gh/m, gw/m, m, m, C, P, P)
    x = x.reshape(gh // m, m, p, gw // m, m, p, 3).transpose(0, 3, 1, 4, 6, 2, 5)
    # Still frame: the same image at every temporal slot -> (gh/m, gw/m, m, m, C, T, P, P).
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))
    patches = np.ascontiguousarray(x.reshape(gh * gw, 3 * t * p * p), dtype=np.float32)
    return patches, (1, gh, gw)


def preprocess_frames(
    frames: Sequence, spec: PreprocessSpec, channels: str = "bgr"
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Several frames -> ``(patches, grids)``: patches of all frames concatenated in order, float32
    ``(sum gh*gw, C*T*P*P)``, and one ``(1, gh, gw)`` per frame (frames may differ in size)."""
    if len(frames) == 0:
        raise InputError("no frames given: pass at least one frame.")
    results = [preprocess_frame(f, spec, channels) for f in frames]
    patches = np.concatenate([r[0] for r in results], axis=0)
    return patches, [r[1] for r in results]
