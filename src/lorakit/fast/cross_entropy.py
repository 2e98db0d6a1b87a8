"""The LM head and its cross-entropy, chunked over tokens: the full logits never exist.

HF computes logits [N, V] in the model dtype, upcasts all of them to float32, and keeps a float32
log-softmax for the backward (at V = 128k and N = 8k: 2 + 4 + 4 GB, plus as much again in the backward).
Here each chunk of rows goes: logits_c = h_c·Wᵀ (model dtype) → one kernel computes the row's loss and
overwrites logits_c with its gradient (softmax − onehot)·scale → dh_c = grad_c·W. The gradient w.r.t. h
is therefore made in the forward and kept ([N, H], the size of one hidden state); the backward only
scales it. The head's weight must be frozen (its gradient would need every chunk's logits again).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..triton_gate import tl, triton, use_triton
from ..triton_launch import cached_launch

CHUNK_BYTES = 512 * 2**20  # logits of one chunk, in the model dtype
# Under activation checkpointing the model holds one hidden state per block and token, and a 512 MiB chunk is the
# step's largest transient: an 8B Llama's QLoRA step at T2048 peaks 0.25 GiB lower with 128 MiB chunks, whose
# GEMMs (>= 500 rows at V = 128k) still run at full speed.
CHECKPOINTED_CHUNK_BYTES = 128 * 2**20

if triton is not None:

    @cached_launch
    @triton.jit
    def _ce_loss_grad(LOGITS, stride, TARGET, LOSS, SCALE, n_cols, ignore_index, BLOCK: tl.constexpr):
        """Per row: loss = lse − x_t; logits ← (softmax − onehot_t)·scale (zeros for an ignored row)."""
        row = tl.program_id(0).to(tl.int64)
        ptr = LOGITS + row * stride
        target = tl.load(TARGET + row)
        scale = tl.load(SCALE)
        cols = tl.arange(0, BLOCK)
        m = -float("inf")
        s = 0.0
        for off in range(0, n_cols, BLOCK):
            x = tl.load(ptr + off + cols, mask=off + cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        ignored = target == ignore_index
        safe_t = tl.where(ignored, 0, target)
        x_t = tl.load(ptr + safe_t).to(tl.float32)
        tl.store(LOSS + row, tl.where(ignored, 0.0, lse - x_t))
        row_scale = tl.where(ignored, 0.0, scale)
        for off in range(0, n_cols, BLOCK):
            idx = off + cols
            x = tl.load(ptr + idx, mask=idx < n_cols, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            p = tl.where(idx == safe_t, p - 1.0, p) * row_scale
            tl.store(ptr + idx, p.to(LOGITS.dtype.element_ty), mask=idx < n_cols)


def _loss_grad_torch(logits, target, scale, ignore_index):
    """The kernel's math in torch: per-row loss (float32) and the gradient, written into logits."""
    lf = logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target))
    loss = (lse - lf.gather(1, safe_t[:, None]).squeeze(1)) * valid
    grad = torch.exp(lf - lse[:, None])
    grad[torch.arange(len(target), device=lf.device), safe_t] -= 1.0
    grad *= torch.where(valid, scale, torch.zeros_like(scale))[:, None]  # no label at all: 0, not inf·0
    logits.copy_(grad)
    return loss


class LinearCrossEntropy(torch.autograd.Function):
    """Autograd function of the chunked LM head + cross-entropy: the full logits never exist (see the module
    docstring)."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, scale, ignore_index: int, chunk_rows: int):
        # h [N, H], weight [V, H] (frozen), target [N] (ignore_index where no loss), scale: 0-dim float32
        n, vocab = h.shape[0], weight.shape[0]
        need_grad = h.requires_grad
        dh = torch.empty_like(h) if need_grad else None
        losses = torch.empty(n, device=h.device, dtype=torch.float32)
        for i0 in range(0, n, chunk_rows):
            i1 = min(i0 + chunk_rows, n)
            logits = h[i0:i1] @ weight.t()
            if bias is not None:
                logits += bias
            t = target[i0:i1]
            if use_triton(logits):
                _ce_loss_grad[(i1 - i0,)](logits, logits.stride(0), t, losses[i0:i1], scale, vocab, ignore_index,
                                          BLOCK=4096, num_warps=8)
            else:
                losses[i0:i1] = _loss_grad_torch(logits, t, scale, ignore_index)
            if need_grad:
                torch.mm(logits, weight, out=dh[i0:i1])
            del logits
        ctx.save_for_backward(dh)
        return losses.sum() * scale

    @staticmethod
    def backward(ctx, dloss):
        (dh,) = ctx.saved_tensors
        return dh * dloss.to(dh.dtype), None, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], target: torch.Tensor,
                         ignore_index: int = -100, num_items_in_batch=None, chunk_rows: Optional[int] = None,
                         chunk_bytes: int = CHUNK_BYTES):
    """mean (or sum / num_items_in_batch, as HF) of CE(h·Wᵀ + b, target) over non-ignored rows.
    h [..., H], target [...] already shifted. Under autocast, h, W and b are cast to its dtype as autocast casts the
    LM head's F.linear, and the call runs with autocast off (the loss is float32 either way)."""
    h2 = h.reshape(-1, h.shape[-1])
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        cast = torch.get_autocast_dtype(dev)
        h2, weight = h2.to(cast), weight.to(cast)
        bias = bias.to(cast) if bias is not None else None
        with torch.autocast(dev, enabled=False):
            return linear_cross_entropy(h2, weight, bias, target, ignore_index, num_items_in_batch, chunk_rows,
                                        chunk_bytes)
    t = target.reshape(-1).to(h.device)
    if num_items_in_batch is None:
        scale = 1.0 / (t != ignore_index).sum().to(torch.float32)
    else:
        scale = 1.0 / torch.as_tensor(num_items_in_batch, device=h.device, dtype=torch.float32)
    if chunk_rows is None:
        chunk_rows = max(16, chunk_bytes // (weight.shape[0] * h.element_size()))
    return LinearCrossEntropy.apply(h2, weight, bias, t, scale.reshape(()), ignore_index, chunk_rows)


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """HF's causal-LM shift: position t predicts labels[t + 1]; the last position predicts nothing."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
