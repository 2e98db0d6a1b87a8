"""The vectorised torch path of a mixed-adapter LoRA layer (CPU, and GPU when gradients are needed).

Every row gathers its own slot of the stack and one batched matmul pair does all rows at once:
    h = (x_row · A_slotᵀ) · scale_slot        [N0, M, R]
    y = y + h · B_slotᵀ                      [N0, M, out]
No Python loop over rows or adapters; autograd sends each row's gradient to its own adapter only.
"""

from __future__ import annotations

import torch

from .stack import AdapterStack


def lora_rows(x: torch.Tensor, y: torch.Tensor, stack: AdapterStack, slot: torch.Tensor, dropout: bool = False):
    """x [N0, ..., in], y [N0, ..., out] (the base output), slot [N0] (long): y with each row's LoRA added.
    dropout: apply each slot's dropout to its rows (training with stack.max_p > 0)."""
    n0 = x.shape[0]
    x3 = x.reshape(n0, -1, x.shape[-1])  # [N0, M, in]
    a = stack.a[slot]  # [N0, R, in]
    if dropout:
        x3 = _row_dropout(x3, stack.p[slot])
    h = torch.bmm(x3.to(a.dtype), a.transpose(1, 2))  # [N0, M, R]
    h = (h * stack.scale[slot].view(-1, 1, 1)).to(y.dtype)
    y3 = y.reshape(n0, -1, y.shape[-1])  # [N0, M, out]
    return torch.baddbmm(y3, h, stack.bt[slot].to(y.dtype)).view(y.shape)


def _row_dropout(x3: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Dropout with each row's own probability p [N0] (nn.Dropout's rule: zero with p, scale by 1/(1-p))."""
    p = p.to(x3.dtype).view(-1, 1, 1)
    keep = torch.rand_like(x3) >= p
    return x3 * keep / (1 - p)


def token_reference(x2: torch.Tensor, y2: torch.Tensor, stack: AdapterStack, slot_per_token: torch.Tensor):
    """What the GPU kernels compute, token by token: x2 [N, in], y2 [N, out], slot_per_token [N]."""
    return lora_rows(x2[:, None, :], y2[:, None, :], stack, slot_per_token).view(y2.shape)
