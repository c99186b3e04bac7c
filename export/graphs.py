"""The three exportable graphs, written over the weights of a loaded ``Qwen2_5_VLForConditionalGeneration``.

transformers' forward is not exportable as written (index arrays built with Python loops, a cache object), so
each graph re-wires the same submodules with explicit inputs::

    frames --numpy--> patches + index arrays --VisionGraph--> image_embeds ─┐
    token ids ----------------------------------EmbedGraph--> text embeds ──┴─> inputs_embeds
    inputs_embeds + 3-D positions + mask + past KV --DecoderGraph--> logits (selected rows) + present KV

Only plain ONNX ops come out (MatMul, Softmax, Concat, ...): TensorRT and every ONNX Runtime provider take them.
Parity with transformers is checked by export/validate.py after every export.
"""

from __future__ import annotations

import torch
from torch import nn

NEG = -1e9  # additive mask value; exp() of it is exactly 0 in fp32, and it clamps safely under fp16 conversion


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class VisionGraph(nn.Module):
    """Qwen2.5-VL vision tower with attention segments given as ids (see runtime/vision_index.py)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        proj = visual.patch_embed.proj  # Conv3d whose kernel == stride == one patch: a linear map per patch
        self.register_buffer("patch_weight", proj.weight.detach().reshape(proj.weight.shape[0], -1).t().contiguous())
        self.register_buffer("inv_freq", visual.rotary_pos_emb.inv_freq.detach().clone())
        self.full_blocks = set(visual.fullatt_block_indexes)

    @staticmethod
    def _mask(segment_ids: torch.Tensor) -> torch.Tensor:
        same = segment_ids[:, None] == segment_ids[None, :]  # (N, N)
        return torch.where(same, 0.0, NEG)[None, None]  # (1, 1, N, N)

    def forward(self, pixel_values, rotary_pos_ids, full_segment_ids, window_segment_ids, reverse_index):
        x = pixel_values @ self.patch_weight  # (N, E)
        freqs = rotary_pos_ids[..., None].float() * self.inv_freq  # (N, 2, d/4)
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # (N, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (N, d)
        cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]  # (N, 1, d)
        full_mask = self._mask(full_segment_ids)
        window_mask = self._mask(window_segment_ids)
        n = x.shape[0]
        for i, blk in enumerate(self.visual.blocks):
            attn = blk.attn
            h = blk.norm1(x)
            qkv = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)  # (3, N, heads, d)
            q, k, v = qkv[0], qkv[1], qkv[2]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, heads, N, d)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling
            scores = scores + (full_mask if i in self.full_blocks else window_mask)
            probs = torch.softmax(scores, dim=-1)
            out = (probs @ v)[0].transpose(0, 1).reshape(n, -1)  # (N, E)
            x = x + attn.proj(out)
            x = x + blk.mlp(blk.norm2(x))
        merged = self.visual.merger(x)  # (M, hidden) in window order
        return merged[reverse_index]


class EmbedGraph(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)


class DecoderGraph(nn.Module):
    """Qwen2.5-VL text decoder with an explicit KV cache.

    inputs_embeds (B, S, H); position_ids (3, B, S); attention_mask (B, P+S) of 1/0 over cache + new tokens;
    logits_index (n,) rows of the S new tokens that need logits (the last one for decoding; a few for
    verifying speculated tokens); past: 2*L tensors (B, kv_heads, P, head_dim).
    Returns logits (B, n, vocab) and 2*L present tensors (B, kv_heads, P+S, head_dim).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        lm = model.model.language_model
        self.layers = lm.layers
        self.norm = lm.norm
        self.lm_head = model.lm_head
        self.register_buffer("inv_freq", lm.rotary_emb.inv_freq.detach().clone())
        self.mrope_section = list(lm.rotary_emb.mrope_section)
        cfg = lm.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def rope(self, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # (3, B, S, d/2)
        parts, start = [], 0
        for i, width in enumerate(self.mrope_section):  # time / height / width bands of the rotary dims
            parts.append(freqs[i % 3, :, :, start:start + width])
            start += width
        f = torch.cat(parts, dim=-1)  # (B, S, d/2)
        emb = torch.cat([f, f], dim=-1)[:, None]  # (B, 1, S, d)
        return emb.cos(), emb.sin()

    def forward(self, inputs_embeds, position_ids, attention_mask, logits_index, *past):
        b, s, _ = inputs_embeds.shape
        p = past[0].shape[2]
        cos, sin = self.rope(position_ids)
        q_idx = torch.arange(s, device=inputs_embeds.device) + p  # cache index of each new token
        k_idx = torch.arange(p + s, device=inputs_embeds.device)
        allowed = (k_idx[None, :] <= q_idx[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        mask = torch.where(allowed, 0.0, NEG)  # (B, 1, S, P+S)
        rep = self.num_heads // self.num_kv_heads
        h = inputs_embeds
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            k = torch.cat([past[2 * i], k], dim=2)  # (B, kv, P+S, d)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            if rep > 1:
                k = k[:, :, None].expand(b, self.num_kv_heads, rep, p + s, self.head_dim).reshape(b, -1, p + s, self.head_dim)
                v = v[:, :, None].expand(b, self.num_kv_heads, rep, p + s, self.head_dim).reshape(b, -1, p + s, self.head_dim)
            scores = (q @ k.transpose(-1, -2)) * attn.scaling + mask
            out = torch.softmax(scores, dim=-1) @ v  # (B, heads, S, d)
            h = h + attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h)[:, logits_index]  # (B, n, H): only rows that need logits pay for the vocabulary matmul
        return (self.lm_head(h), *presents)
