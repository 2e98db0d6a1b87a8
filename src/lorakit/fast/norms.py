"""RMSNorm in one pass each way (Triton on GPU, the same math in torch elsewhere).

HF's RMSNorm upcasts the whole input to float32 and saves that copy for backward (4 bytes a value); this
saves the input as it came (bf16: 2 bytes) and 1/rms per row, and tags its output with both so the
fused LoRA linears that read it save nothing of their own (see recipes.py).

Two output conventions, both HF's: "llama" y = w · bf16(x·rstd) (Llama, Mistral, Qwen2/3), and
"gemma" y = bf16(x·rstd·(1 + w)) computed in float32.
"""

from __future__ import annotations

import torch

from . import recipes
from .wide import storage_alias
from ..triton_gate import tl, triton, use_triton, warps_for, row_block, cdiv
from ..triton_launch import cached_launch

if triton is not None:

    @cached_launch
    @triton.jit
    def _rms_fwd(X, Y, W, RSTD, stride_x, stride_y, n_cols, eps, offset,
                 LLAMA_CAST: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        if LLAMA_CAST:  # HF Llama: round x·rstd to the model dtype before the weight
            y = (x * rstd).to(Y.dtype.element_ty).to(tl.float32) * w
        else:
            y = x * rstd * w
        tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + row, rstd)

    @cached_launch
    @triton.jit
    def _rms_bwd(DY, X, W, RSTD, DX, DW, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset, rows_per_prog,
                 HAS_DW: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
        dw = tl.zeros([BLOCK], dtype=tl.float32)
        for i in range(rows_per_prog):
            row = pid * rows_per_prog + i
            ok = row < n_rows
            row64 = row.to(tl.int64)
            m = mask & ok
            x = tl.load(X + row64 * stride_x + cols, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(DY + row64 * stride_dy + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row64, mask=ok, other=0.0)
            xhat = x * rstd
            dxhat = dy * w
            c = tl.sum(dxhat * xhat, axis=0) / n_cols
            dx = (dxhat - xhat * c) * rstd
            tl.store(DX + row64 * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=m)
            if HAS_DW:
                dw += dy * xhat
        if HAS_DW:
            tl.store(DW + pid * n_cols + cols, dw, mask=mask)


def _fwd_torch(x, weight, eps, offset, llama_cast):
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1) + eps)  # [...]
    if llama_cast:
        y = (weight.float() + offset) * (xf * rstd[..., None]).to(x.dtype).float()
    else:
        y = xf * rstd[..., None] * (weight.float() + offset)
    return y.to(x.dtype), rstd


def _bwd_torch(dy, x, weight, rstd, offset, need_dw):
    xhat = x.float() * rstd[..., None]
    dyf = dy.float()
    dxhat = dyf * (weight.float() + offset)
    c = (dxhat * xhat).mean(-1, keepdim=True)
    dx = ((dxhat - xhat * c) * rstd[..., None]).to(x.dtype)
    dw = (dyf * xhat).reshape(-1, x.shape[-1]).sum(0) if need_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """(x [..., d], weight [d]) → (y [..., d], rstd [...] float32, not differentiable)."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float, llama_cast: bool, wide=None):
        # outputs are fresh tensors of x's shape (not views), so callers may still modify them in place;
        # wide [N, d + E]: y is written into its first d columns (y shares its storage, not a view of it)
        d = x.shape[-1]
        x2 = _rows(x, d)
        if use_triton(x2):
            y = torch.empty(x.shape, device=x.device, dtype=x.dtype) if wide is None else _rows_of(wide, x.shape)
            rstd = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
            block = row_block(d)
            _rms_fwd[(x2.shape[0],)](x2, y, weight, rstd, x2.stride(0), d if wide is None else wide.stride(0), d,
                                     eps, offset, LLAMA_CAST=llama_cast, BLOCK=block, num_warps=warps_for(block))
        else:
            y, rstd = _fwd_torch(x, weight, eps, offset, llama_cast)
            y = y if wide is None else _rows_of(wide, x.shape).copy_(y)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset, ctx.shape = offset, x.shape
        ctx.mark_non_differentiable(rstd)
        return y, rstd

    @staticmethod
    def backward(ctx, dy, _drstd):
        x2, weight, rstd = ctx.saved_tensors
        need_dw = ctx.needs_input_grad[1]
        n, d = x2.shape
        rstd = rstd.reshape(n)
        if use_triton(x2):
            dy2 = _rows(dy, d)
            dx = torch.empty(ctx.shape, device=x2.device, dtype=x2.dtype)
            progs = min(n, 4 * _sm_count(x2.device))
            rows_per_prog = cdiv(n, progs)
            progs = cdiv(n, rows_per_prog)
            dw_part = torch.empty(progs, d, device=x2.device, dtype=torch.float32) if need_dw else dx
            block = row_block(d)
            _rms_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), d, n, d,
                               ctx.offset, rows_per_prog, HAS_DW=need_dw, BLOCK=block, num_warps=warps_for(block))
            dw = dw_part.sum(0) if need_dw else None
        else:
            dx, dw = _bwd_torch(dy, x2.view(ctx.shape), weight, rstd.view(ctx.shape[:-1]), ctx.offset, need_dw)
        return dx, (dw.to(weight.dtype) if dw is not None else None), None, None, None, None


def _rows_of(wide: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of `shape` [..., d] on the first d columns of `wide` [N, d + E]'s rows: shares its storage but is
    not a view of it (autograd sees a fresh output)."""
    stride = [wide.stride(0), 1]
    for size in reversed(shape[1:-1]):
        stride.insert(0, stride[0] * size)
    return storage_alias(wide, shape, stride[-len(shape):], wide.storage_offset())


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    """t as [rows, d] with unit column stride (what the kernels index)."""
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(1) == 1 else t2.contiguous()


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


WANT_ATTR = "_lorakit_wide_want"  # on a patched norm: [spare columns readers asked for, untaken in a row]
STRIKES = 3  # untaken wide outputs in a row after which the norm stops giving spare columns (fast/wide.py)


# --- HF RMSNorm modules -----------------------------------------------------------------------------------
LLAMA_STYLE = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen3MoeRMSNorm",
               "Qwen2MoeRMSNorm", "MixtralRMSNorm", "Phi3RMSNorm", "OlmoRMSNorm")
GEMMA_STYLE = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")


def norm_style(module: torch.nn.Module):
    """"llama" or "gemma" (which RMSNorm recipe an HF norm module computes, by its class name), or None if unknown."""
    name = type(module).__name__
    return "llama" if name in LLAMA_STYLE else "gemma" if name in GEMMA_STYLE else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str, want=None) -> torch.Tensor:
    """The normalised x, tagged with its recipe for the fused linears that read it. want: [E, untaken], the spare
    columns its readers asked for and how many wide outputs in a row no reader took (fast/wide.py); the output
    then lies in the first columns of a wider buffer."""
    offset = 1.0 if style == "gemma" else 0.0
    d = x.shape[-1]
    wide = None
    if want is not None and want[0] > 0 and _takers_possible(x):
        if want[1] >= STRIKES:  # that many wide outputs in a row untaken: stop giving the columns
            want[0] = want[1] = 0
        else:
            wide = wide_buffer(x, x.numel() // max(d, 1), d + want[0])
            want[1] += 1  # untaken until a reader takes it
    y, rstd = RMSNormFunction.apply(x, weight, eps, offset, style == "llama", wide)
    recipes.tag_norm_output(y, x, rstd, weight, offset, wide, want)
    return y


def wide_buffer(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The [rows, d + E] buffer a wide output lies in (uninitialised: its readers write the spare columns)."""
    return x.new_empty(rows, cols)


def _takers_possible(x: torch.Tensor) -> bool:
    """Whether a fused linear could take a wide output here: not while compiling or in inference mode (no recipe
    there), nor under an autocast to another dtype than x's (the fused call then casts W)."""
    dev = x.device.type
    if recipes.compiling() or torch.is_inference_mode_enabled():
        return False
    return not torch.is_autocast_enabled(dev) or torch.get_autocast_dtype(dev) == x.dtype


def fast_rms_forward(module: torch.nn.Module, original, x: torch.Tensor) -> torch.Tensor:
    """Forward of a patched HF RMSNorm: the fused function, or the module's own forward when the
    dtypes would make HF's output differ (weight in another dtype than x)."""
    style = norm_style(module)
    w = module.weight
    if style is None or (style == "llama" and w.dtype != x.dtype) or not x.is_floating_point():
        return original(x)
    eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
    return rms_norm(x, w, float(eps), style, module.__dict__.setdefault(WANT_ATTR, [0, 0]))
