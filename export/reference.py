"""The PyTorch reference: transformers' own forward over a whole dialogue (full recompute).

Positions come from the model's ``get_rope_index`` over the whole sequence (the correct multi-turn answer, see
shared/EXPORT-NOTES.md); visual embeddings from its ``get_image_features``, one frame at a time and cached (the
vision tower attends within a frame, so this is what a batched call gives). Used by export validation, by the
parity tests of the runtime, and by ``bench``'s transformers baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch


@dataclass
class Forward:
    logits: torch.Tensor  # (S, vocab) rows asked for
    hidden: torch.Tensor  # (S, hidden) final hidden states of those rows (after the final norm)
    cache: object  # transformers cache of the whole sequence


class TorchReference:
    """Full-recompute reference over token ids where each frame appears as its run of image-pad ids."""

    def __init__(self, model, image_pad_id: int):
        self.model = model
        self.pad = image_pad_id
        self._vision_cache: dict[int, torch.Tensor] = {}

    def image_embeds(self, key: int, patches: np.ndarray, grid: Sequence[int]) -> torch.Tensor:
        """(tokens, hidden) of one frame; ``key`` identifies the frame for caching."""
        if key not in self._vision_cache:
            with torch.no_grad():
                out = self.model.model.get_image_features(
                    torch.from_numpy(patches), torch.tensor([list(grid)]), return_dict=True
                ).pooler_output
            self._vision_cache[key] = torch.cat(list(out), 0) if isinstance(out, (list, tuple)) else out
        return self._vision_cache[key]

    def positions(self, ids: Sequence[int], grids: Sequence[Sequence[int]]) -> torch.Tensor:
        input_ids = torch.tensor([list(ids)])
        mm = (input_ids == self.pad).int()
        if not grids:
            pos = torch.arange(len(ids)).view(1, 1, -1).expand(3, 1, -1)
            return pos
        with torch.no_grad():
            pos, _ = self.model.model.get_rope_index(input_ids, mm_token_type_ids=mm,
                                                     image_grid_thw=torch.tensor([list(g) for g in grids]))
        return pos

    def forward(self, ids: Sequence[int], frames: Sequence[tuple[int, np.ndarray, Sequence[int]]],
                rows: Sequence[int] | None = None) -> Forward:
        """Full forward. ``frames``: (key, patches, grid) of every frame in the sequence, in order."""
        input_ids = torch.tensor([list(ids)])
        with torch.no_grad():
            emb = self.model.model.language_model.embed_tokens(input_ids)
            if frames:
                vis = torch.cat([self.image_embeds(k, p, g) for k, p, g in frames], 0)
                mask = input_ids[0] == self.pad
                if int(mask.sum()) != vis.shape[0]:
                    raise ValueError(f"{int(mask.sum())} image-pad ids but {vis.shape[0]} visual tokens")
                emb[0, mask] = vis
            pos = self.positions(ids, [g for _, _, g in frames])
            out = self.model.model(inputs_embeds=emb, position_ids=pos, use_cache=True)
            hidden = out.last_hidden_state[0]
            sel = hidden if rows is None else hidden[list(rows)]
            logits = self.model.lm_head(sel)
        return Forward(logits=logits, hidden=sel, cache=out.cache)

    def greedy(self, ids: Sequence[int], frames, max_new_tokens: int, eos: Sequence[int]) -> tuple[list[int], int | None]:
        """Greedy decoding by full recompute per token. Returns (generated ids without the stop token, stop
        token or None when the budget ran out)."""
        ids = list(ids)
        generated: list[int] = []
        while True:
            tok = int(self.forward(ids, frames, rows=[len(ids) - 1]).logits[-1].argmax())
            if tok in eos:
                return generated, tok
            generated.append(tok)
            ids.append(tok)
            if len(generated) >= max_new_tokens:
                return generated, None


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache, each (batch, kv_heads, seq, head_dim)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return [(k, v) for k, v in cache]
