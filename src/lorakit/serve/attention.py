"""The server's attention: grouped-query decode without copying keys and values once per query head.

transformers' sdpa path repeats every key/value head for the query heads that share it (`repeat_kv`) whenever a
mask is given, and the server always gives one (rows of one batch attend different lengths). For a
Llama-3.2-1B decode step of 64 rows at 256 columns that is a [64, 32, 256, 64] copy of the keys and another of
the values in every layer: most of the step's GPU time. A decode query has one position, so the g query heads
that share a key/value head can sit as g query rows of that head:

    q [B, Hq, 1, D] → [B, Hkv, g, D]       (query head h reads key/value head h // g, as repeat_kv orders them)
    sdpa(q, k [B, Hkv, kv, D], v, mask [B, 1, 1, kv]) → [B, Hkv, g, D] → [B, 1, Hq, D]

the same sums as with repeated heads and no copy. Prefill (several positions per row) and anything else keep
transformers' sdpa function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "lorakit_slots"


def slot_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                   scaling=None, dropout: float = 0.0, **kwargs):
    """A transformers attention function (see the module docstring); returns ([B, q, Hq, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    plain = not (kwargs.get("softcap") or kwargs.get("s_aux") is not None or kwargs.get("sliding_window"))
    if length != 1 or heads == kv_heads or heads % kv_heads or dropout or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    group = heads // kv_heads
    q = query.reshape(batch, kv_heads, group, dim)  # [B, Hkv, g, D]
    mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]  # [B, 1, 1, kv]
    out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scaling)  # [B, Hkv, g, Dv]
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None  # [B, 1, Hq, Dv]


def install(model) -> None:
    """Register `NAME` with transformers (masks as sdpa builds them) and switch `model` to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, slot_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
