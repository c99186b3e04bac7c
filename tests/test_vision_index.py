"""numpy index arrays and M-RoPE positions vs transformers' own functions."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from transformers import vision_utils  # noqa: E402

from edge_duet.runtime.positions import image_advance, image_positions, text_positions  # noqa: E402
from edge_duet.runtime.vision_index import rotary_position_ids, window_index  # noqa: E402

GRIDS = [
    [(1, 4, 4)],
    [(1, 8, 12), (1, 4, 6)],
    [(1, 22, 16), (1, 2, 2), (1, 10, 30)],
    [(2, 6, 8)],  # a video-like grid (t = 2) for completeness
]


@pytest.mark.parametrize("grids", GRIDS)
@pytest.mark.parametrize("window", [112, 56, 224])
def test_window_index_matches_transformers(grids, window):
    ref_idx, ref_cu = vision_utils.get_vision_window_index(torch.tensor(grids), 2, window, 14)
    idx, cu = window_index(grids, 2, window, 14)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@pytest.mark.parametrize("grids", GRIDS)
def test_rotary_positions_match_transformers(grids):
    ref = vision_utils.get_vision_position_ids(torch.tensor(grids), 2)
    np.testing.assert_array_equal(rotary_position_ids(grids, 2), ref.numpy())


def test_incremental_positions_match_get_rope_index(tiny_checkpoint):
    """The one-integer rule over a multi-turn sequence equals get_rope_index on the whole sequence."""
    from edge_duet.export.checkpoint import load_model

    model, _ = load_model(tiny_checkpoint)
    pad, rng = 99, np.random.default_rng(0)
    ids, grids, ours, pos = [], [], [], 0
    for turn in range(6):
        n_text = int(rng.integers(1, 9))
        ids += [5] * n_text
        ours.append(text_positions(pos, n_text))
        pos += n_text
        for _ in range(2):
            gh, gw = (int(v) for v in rng.integers(1, 7, 2))
            grids.append((1, 2 * gh, 2 * gw))
            ids += [pad] * (gh * gw)
            ours.append(image_positions(pos, gh, gw))
            pos += image_advance(gh, gw)
            ids += [6]
            ours.append(text_positions(pos, 1))
            pos += 1
    input_ids = torch.tensor([ids])
    ref, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == pad).int(),
                                        image_grid_thw=torch.tensor(grids))
    np.testing.assert_array_equal(np.concatenate(ours, axis=1), ref[:, 0].numpy())
    # positions are not token counts: the next position is max(used) + 1, below the number of tokens
    assert pos == int(ref.max()) + 1 < len(ids)
