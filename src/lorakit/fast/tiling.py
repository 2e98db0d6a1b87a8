"""Row-tiled evaluation of a per-token function (a gated MLP) so that its wide intermediates exist for one tile
of the sequence at a time, in the forward and in the backward.

A Llama-3-8B MLP keeps gate, up and act(gate)·up ([T, 14336] each, 84 KB per token in bf16) for its backward:
at T = 700k that is 59 GB for one block. `tiled_rows(fn, x, rows, params)` instead
- without grad: runs fn over tiles of `rows` rows of x [..., T, d] and writes each tile's output in place;
- with grad: does the same, saving only x; the backward recomputes fn tile by tile with grad and backpropagates
  each tile at once, summing the parameters' gradients over the tiles. There a tile's output is only autograd's
  root, so the caller may give a root_fn that skips computing its values (the MLP's down projection); and where
  nobody reads the tiled output at all (a Llama-form MLP in its block's recompute: families.py) the forward
  computes nothing. The RNG (dropout) is replayed so every
  tile draws in the backward what it drew in the forward.
fn must treat tokens independently (an MLP, a norm, a projection): tiling changes no value, only the order of
the sums that make the parameters' gradients. Tiles are runs of the flattened rows of x (batch 1: spans of
the sequence).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .checkpoint import device_rng_state, restore_device_rng

TILE_BYTES = 256 * 2**20  # one tile's widest intermediate (e.g. the MLP's gate output)


def tile_rows_for(width: int, element_size: int) -> int:
    """Rows per tile so that one [rows, width] intermediate takes about TILE_BYTES."""
    return max(256, TILE_BYTES // max(1, width * element_size))


def tiled_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int,
               params: Sequence[torch.Tensor] = (), remake: Optional[Callable[[int, int], torch.Tensor]] = None,
               root_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               unread: Optional[tuple[int, torch.dtype]] = None) -> torch.Tensor:
    """fn(x), computed `rows` tokens at a time.

    Args:
        fn: a function of x [n, d] → [n, d_out] that treats each row on its own.
        x: [..., d]; its leading dimensions are flattened into rows.
        rows: tokens per tile (≥ 1).
        params: the tensors fn reads that need gradients (e.g. LoRA factors); their gradients are returned
            to autograd as those of the tiled function's inputs.
        remake: remake(i0, i1) gives rows i0:i1 of x exactly, from tensors kept anyway (an RMSNorm's input
            and 1/rms: `norm_remake`); the backward then uses it and x itself is not kept.
        root_fn: fn for the backward's recompute of a tile, whose output serves only as autograd's root (it may
            leave the output's values unwritten); fn when None.
        unread: (d_out, dtype) when nobody reads the returned values (a checkpoint's recompute): the forward then
            computes nothing, the backward recomputes every tile as always.

    Returns:
        fn(x) as [..., d_out].
    """
    x2 = x.reshape(-1, x.shape[-1])
    trained = [p for p in params if p.requires_grad]
    if torch.is_grad_enabled() and (x2.requires_grad or trained):
        out = _TiledRows.apply(x2, fn, rows, remake, root_fn or fn, unread, *trained)
    elif unread is not None:
        out = _unwritten(x2, unread)
    else:
        out = _tiles_no_grad(fn, x2, rows)
    return out.view(*x.shape[:-1], out.shape[-1])


def _tiles_no_grad(fn, x2: torch.Tensor, rows: int) -> torch.Tensor:
    first = fn(x2[:rows])  # [rows, d_out]: tells the output's width and dtype
    out = torch.empty(x2.shape[0], first.shape[-1], device=first.device, dtype=first.dtype)
    out[:rows] = first
    del first
    for i0 in range(rows, x2.shape[0], rows):
        out[i0:i0 + rows] = fn(x2[i0:i0 + rows])
    return out


def _unwritten(x2: torch.Tensor, unread: tuple) -> torch.Tensor:
    """The output nobody reads: [N, d_out] in its dtype, values left unwritten."""
    return x2.new_empty(x2.shape[0], unread[0], dtype=unread[1])


class _TiledRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, fn, rows: int, remake, root_fn, unread, *params):
        ctx.fn, ctx.rows, ctx.remake = root_fn, rows, remake
        ctx.rng = device_rng_state(x2.device)
        ctx.x_meta = (x2.shape, x2.dtype, x2.device)
        ctx.save_for_backward(x2 if remake is None else None, *params)
        if unread is not None:
            return _unwritten(x2, unread)
        with torch.no_grad():
            return _tiles_no_grad(fn, x2, rows)

    @staticmethod
    def backward(ctx, dout):
        x2, *params = ctx.saved_tensors
        shape, dtype, device = ctx.x_meta
        need_x = ctx.needs_input_grad[0]
        dx = torch.empty(shape, dtype=dtype, device=device) if need_x else None
        grads: list = [None] * len(params)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            restore_device_rng(device, ctx.rng)
            for i0 in range(0, shape[0], ctx.rows):
                i1 = min(i0 + ctx.rows, shape[0])
                with torch.no_grad():
                    xt = x2[i0:i1] if ctx.remake is None else ctx.remake(i0, i1)
                xt = xt.detach().requires_grad_(need_x)
                out = ctx.fn(xt)
                wrt = ([xt] if need_x else []) + list(params)
                got = torch.autograd.grad(out, wrt, dout[i0:i1], allow_unused=True)
                if need_x:
                    dx[i0:i1] = got[0]
                    got = got[1:]
                grads = [g if a is None else a if g is None else a.add_(g) for a, g in zip(grads, got)]
                del out, got
        ctx.fn = ctx.remake = None
        return (dx, None, None, None, None, None, *grads)


def norm_remake(recipe, dtype: torch.dtype) -> Callable[[int, int], torch.Tensor]:
    """remake(i0, i1): rows i0:i1 of an RMSNorm's output from its recipe (fast/recipes.NormRecipe), computed as
    the norm's kernels compute it ("llama": dtype(x·rstd)·w; "gemma": x·rstd·(1 + w), in float32), so
    equal to the output it made."""
    d = recipe.x.shape[-1]
    x2, rstd = recipe.x.reshape(-1, d), recipe.rstd.reshape(-1)
    w = recipe.weight.float() + recipe.offset

    def remake(i0: int, i1: int) -> torch.Tensor:
        xhat = x2[i0:i1].float() * rstd[i0:i1, None]
        if recipe.offset == 0:  # Llama's recipe rounds x·rstd to the model dtype before the weight
            xhat = xhat.to(dtype).float()
        return (xhat * w).to(dtype)

    return remake
