"""Index arrays the vision graph needs, computed in numpy from the frames' grids.

transformers computes these inside the vision tower with Python loops and ``.tolist()`` (untraceable), so the
exported graph takes them as inputs instead. Each function mirrors ``transformers.vision_utils`` exactly
(tests/test_vision_index.py compares them).

Shapes: N = patches of all frames (sum of t*h*w over grids), M = N / merge**2 merged tokens.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edge_duet.manifest import VisionSpec

Grid = tuple[int, int, int]  # (t, h, w) in patches, as the image processor reports it


def rotary_position_ids(grids: Sequence[Grid], merge: int) -> np.ndarray:
    """(N, 2) int64 (row, col) of every patch, laid out block-major over merge x merge blocks."""
    out = []
    for t, h, w in grids:
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
        block = (h // merge, merge, w // merge, merge)
        hpos = hpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        wpos = wpos.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([hpos, wpos], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int64)


def window_index(grids: Sequence[Grid], merge: int, window_size: int, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Window-attention order of the merged tokens and the window boundaries (in patches).

    Returns ``window_index`` (M,) int64 and ``cu_window_seqlens`` (windows + 1,) int64, deduplicated like
    transformers' ``unique_consecutive``.
    """
    order: list[np.ndarray] = []
    cu = [0]
    offset = 0
    win = window_size // merge // patch_size
    unit = merge * merge
    for t, h, w in grids:
        lh, lw = h // merge, w // merge
        index = np.arange(t * lh * lw).reshape(t, lh, lw)
        pad_h = win - lh % win
        pad_w = win - lw % win
        nh, nw = (lh + pad_h) // win, (lw + pad_w) // win
        padded = np.pad(index, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=-100)
        padded = padded.reshape(t, nh, win, nw, win).transpose(0, 1, 3, 2, 4).reshape(t, nh * nw, win, win)
        seqlens = (padded != -100).sum(axis=(2, 3)).reshape(-1)
        flat = padded.reshape(-1)
        order.append(flat[flat != -100] + offset)
        cu.extend((np.cumsum(seqlens) * unit + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])
    return np.concatenate(order).astype(np.int64), cu_arr[keep]


def frame_seqlens(grids: Sequence[Grid]) -> np.ndarray:
    """cu_seqlens of full attention: one segment per frame (t segments per grid)."""
    lens = np.concatenate([np.full(t, h * w) for t, h, w in grids])
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def _segment_ids(cu: np.ndarray, n: int) -> np.ndarray:
    ids = np.zeros(n, dtype=np.int64)
    for k in range(len(cu) - 1):
        ids[cu[k]:cu[k + 1]] = k
    return ids


def vision_inputs(patches: np.ndarray, grids: Sequence[Grid], spec: VisionSpec) -> dict[str, np.ndarray]:
    """Everything ``vision.onnx`` takes, for ``patches`` (N, C*T*P*P) in the image processor's order.

    The graph attends within ``full_segment_ids`` groups in full-attention blocks and within
    ``window_segment_ids`` groups elsewhere; patches arrive already permuted into window order (a row
    permutation commutes with the per-patch embedding), and ``reverse_index`` restores the processor's order
    of the merged tokens at the end.
    """
    merge = spec.merge_size
    unit = merge * merge
    n = patches.shape[0]
    if n != sum(t * h * w for t, h, w in grids):
        raise ValueError(f"{n} patches do not match grids {list(grids)}")
    widx, cu_window = window_index(grids, merge, spec.window_size, spec.patch_size)
    perm = (widx[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)  # merged-token order -> patch order
    pos = rotary_position_ids(grids, merge)
    return {
        "pixel_values": np.ascontiguousarray(patches[perm], dtype=np.float32),
        "rotary_pos_ids": np.ascontiguousarray(pos[perm]),
        # frames stay contiguous under the window permutation, so frame segments need no permuting
        "full_segment_ids": _segment_ids(frame_seqlens(grids), n),
        "window_segment_ids": _segment_ids(cu_window, n),
        "reverse_index": np.argsort(widx).astype(np.int64),
    }


def merged_tokens(grid: Grid, merge: int) -> int:
    t, h, w = grid
    return t * (h // merge) * (w // merge)
