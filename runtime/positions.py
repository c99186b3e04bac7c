"""3-D M-RoPE positions for an incremental dialogue (see shared/EXPORT-NOTES.md, "Positions").

One integer ``next_pos`` is the whole state: a text token takes (p, p, p) and advances p by 1; a still image whose
merged grid is gh x gw gives its tokens (p, p + row, p + col) in raster order and advances p by max(gh, gw).
This equals transformers' ``get_rope_index`` over the full dialogue (tests/test_positions.py), so positions of
earlier turns never change as the dialogue grows. Positions are *not* token counts: after an image, the
next text position is max(used) + 1, which is less than the number of tokens so far.
"""

from __future__ import annotations

import numpy as np


def text_positions(start: int, n: int) -> np.ndarray:
    """(3, n) int64."""
    return np.broadcast_to(np.arange(start, start + n, dtype=np.int64), (3, n)).copy()


def image_positions(start: int, gh: int, gw: int, t: int = 1) -> np.ndarray:
    """(3, t*gh*gw) int64 for a merged grid gh x gw (a still image has t = 1)."""
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
    return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]).astype(np.int64) + start


def image_advance(gh: int, gw: int) -> int:
    return max(gh, gw)
