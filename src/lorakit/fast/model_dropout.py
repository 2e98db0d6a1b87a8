"""The model's own dropout on CPU from the seeded hash masks: its nn.Dropout modules and the dropout of the
attention probabilities.

Why: on CPU, torch draws a dropout mask with a scalar Bernoulli loop (one [32, 64, 384] mask: ~6 ms; a
[32, 12, 64, 64] attention mask: ~12 ms), while dropout_hash.py's keyed rounds make masks of the same keep
probability (1 − p, to 2⁻¹⁶) in vectorised int32 ops (~1.5 and ~2 ms). In a BERT-like encoder every hidden state
and every attention-probability tensor passes a dropout in training: on the project's 2-core box torch's mask draws
took 12-16% of an all-MiniLM-L6-v2 training step (B32 T64; the profiled self time of `bernoulli_`), the frozen
model's step as much as the adapted one's.

What changes: the masks come from another random stream than torch's (a draw of the same distribution, like the
fused linear's adapter dropout on CPU, dropout.py "hash"); a seeded run repeats itself, and a checkpoint's
recompute (which restores torch's RNG state) draws the same masks. Each call takes one 64-bit seed from torch's
default CPU generator. Masks are kept from forward to backward as int8: one byte per element, as nn.Dropout's bool
mask.

Where: `install(model)` patches every nn.Dropout of the model outside its adapted layers (whose dropout is the
reference path's). The patched forward takes the hash masks in training, on CPU, outside torch.compile and
torch.func's transforms, and calls the module's own forward otherwise. Attention: families.attention_forward runs the module's own forward inside
`attention_scope()`; there transformers' "sdpa" attention function, wrapped once (`install`), computes softmax
attention with the hash-masked probabilities when dropout > 0 on CPU (the math path that
scaled_dot_product_attention itself runs on CPU with dropout), and is transformers' own function for every other
call.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.patching import is_patched, patch_forward
from .dropout import draw_seed, mask_source
from .dropout_hash import keep_masks
from .thread_scope import ThreadScope

_SCOPE = ThreadScope()
_SAFE_SOFTMAX = getattr(torch, "_safe_softmax", None)  # torch ≥ 2.5: softmax giving 0 for a row of -inf


def takes_hash(x: torch.Tensor, p: float) -> bool:
    """Whether a training dropout of x with probability p takes the hash masks: 0 < p < 1, on a device whose
    mask source is "hash" (CPU), outside torch.compile (dropout.mask_source) and outside torch.func's transforms
    (grad, vmap: HashDropout has no setup_context for them, torch's own dropout has)."""
    return (0.0 < p < 1.0 and x.is_floating_point() and mask_source(x.device) == "hash"
            and not torch._C._are_functorch_transforms_active())


class HashDropout(torch.autograd.Function):
    """y = x ⊙ m / (1 − p), m the hash mask of `seed` (stream 0) over x's elements in row-major order."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        x = x.contiguous()
        kept = torch.empty((1, *x.shape), dtype=torch.int8, device=x.device)  # [1, *x.shape]: 0/1
        y = keep_masks(seed, [0], x.shape, p, x.dtype, x.device, times=x, kept=kept)[0]  # m ⊙ x
        ctx.save_for_backward(kept)
        ctx.scale = 1.0 / (1.0 - p)
        return y.mul_(ctx.scale)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (kept,) = ctx.saved_tensors
        dx = kept[0].to(g.dtype).mul_(g).mul_(ctx.scale)  # an int8 → float cast is vectorised (a bool one is not)
        return dx, None, None


def hash_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training dropout of x with the hash masks (takes_hash(x, p) must hold)."""
    return HashDropout.apply(x, p, draw_seed())


def dropout_forward(module: nn.Dropout, original, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Dropout's)
    """Forward of a patched nn.Dropout: the hash masks where they apply, else the module's own forward."""
    if module.training and not module.inplace and takes_hash(input, module.p):
        return hash_dropout(input, module.p)
    return original(input)


# --- attention ---------------------------------------------------------------------------------------------------
def attention_scope():
    """Within (a context manager, this thread): transformers' "sdpa" attention takes the hash masks for its dropout
    (see above)."""
    return _SCOPE.entered()


def _takes_attention(query: torch.Tensor, args: tuple, kwargs: dict) -> bool:
    """Whether a call of the sdpa function is taken: in scope, dropout (a keyword, as transformers' attention modules
    pass it) taking the hash masks, and nothing the function would read besides the mask, scaling and is_causal (no
    position bias, no attention weights asked for, no further positional argument), with a torch that has
    _safe_softmax (2.5 and later)."""
    return (_SCOPE.active() and not args and _SAFE_SOFTMAX is not None
            and takes_hash(query, kwargs.get("dropout", 0.0)) and kwargs.get("position_bias") is None
            and not kwargs.get("output_attentions", False))


def hash_attention(module, query, key, value, attention_mask, dropout, scaling=None, is_causal=None):
    """Softmax attention whose probabilities drop out with the hash masks, as transformers' sdpa function returns
    it: ([B, T, H, D], None).

    Args:
        query [B, H, T, D]; key, value [B, Hkv, S, D] (H a multiple of Hkv); attention_mask: None, bool
        (True: attend) or additive float, broadcastable to [B, H, T, S]; dropout: p; scaling: None (1/√D);
        is_causal: None (the module's own flag), as transformers' sdpa function reads it.
    """
    dtype = query.dtype
    if dtype in (torch.float16, torch.bfloat16):  # as sdpa's math path on CPU: the softmax attention in float32
        query, key, value = query.float(), key.float(), value.float()
    if query.shape[1] != key.shape[1]:  # grouped keys and values: each serves H / Hkv heads
        key = key.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        value = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)
    t, s = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if attention_mask is None and t > 1 and causal:  # sdpa's is_causal: the top-left aligned lower triangle
        attention_mask = torch.ones(t, s, dtype=torch.bool, device=query.device).tril()
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scale)  # [B, H, T, S]
    if attention_mask is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.to(scores.dtype)
        probs = _SAFE_SOFTMAX(scores, -1)  # a row with nothing to attend gives zeros, as sdpa's math path
    out = torch.matmul(hash_dropout(probs, dropout), value)  # [B, H, T, D]
    return out.to(dtype).transpose(1, 2).contiguous(), None


def _wrap_sdpa() -> None:
    """Wrap transformers' "sdpa" attention function once: a no-op where transformers is not imported (no model of
    this process is a transformers model then, and importing it would cost seconds)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers import AttentionInterface
    except ImportError:  # a transformers without the attention registry: nothing to wrap
        return

    original = AttentionInterface._global_mapping.get("sdpa")
    if original is None or getattr(original, "lorakit_original", None) is not None:
        return

    def sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs):
        if _takes_attention(query, args, kwargs):
            return hash_attention(module, query, key, value, attention_mask, kwargs["dropout"],
                                  kwargs.get("scaling"), kwargs.get("is_causal"))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    sdpa_attention_forward.lorakit_original = original
    AttentionInterface.register("sdpa", sdpa_attention_forward)


# --- installing --------------------------------------------------------------------------------------------------
def install(model: nn.Module) -> int:
    """Patch the model's own nn.Dropout modules (not those inside adapted layers) and wrap the sdpa attention
    function; returns how many modules were patched."""
    _wrap_sdpa()
    inside = {id(m) for layer in model.modules() if isinstance(layer, AdaptedLayer) for m in layer.modules()}
    count = 0
    for m in model.modules():
        if type(m) is nn.Dropout and id(m) not in inside and not is_patched(m):
            count += patch_forward(m, dropout_forward)
    return count
