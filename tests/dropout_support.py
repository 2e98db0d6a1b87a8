"""Shared pieces of the fused-dropout tests (the CUDA kernels' masks and the CPU hash masks): a q/k/v layer group
with dropout adapters, a spy on the fused function's per-call seeds, fixed masks for the reference path, and a
block run plainly and under checkpointing."""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import lorakit
import lorakit.fast.lora_linear as ll
from lorakit.fast import recipes
from lorakit.fast.lora_linear import fused_linears
from support import Siblings


def siblings_model(dtype, dev="cpu", rank=4, mixed=True) -> Siblings:
    """Siblings with a dropout-0.25 adapter (trained biases) on q/k/v; mixed: a second adapter without dropout on
    q and v, both active."""
    torch.manual_seed(0)
    model = Siblings()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=rank, lora_alpha=8, target_modules=["q", "k", "v"],
                                                  lora_dropout=0.25, bias="all", init_lora_weights=False))
    if mixed:  # a second adapter without dropout: its terms read x itself
        lorakit.add_adapter(model, lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"],
                                                      init_lora_weights=False), name="plain")
        lorakit.set_active(model, ["default", "plain"])
    return model.to(dev, dtype)


def seeds_of(monkeypatch) -> list:
    """Every call of the fused function leaves its seed (None without seeded masks) in the returned list."""
    seeds, real = [], ll.FusedLoraLinears.apply

    def apply(*args):
        seeds.append(next((a for a in args[7:] if type(a) is int), None))
        return real(*args)

    monkeypatch.setattr(ll.FusedLoraLinears, "apply", apply)
    return seeds


def with_masks(monkeypatch, masks: list) -> list:
    """The reference path's F.dropout gives these masks, in call order."""
    queue, real = list(masks), F.dropout

    def fixed(t, p=0.5, training=True, inplace=False):
        return t * queue.pop(0).to(t.dtype) / (1 - p) if training and p > 0 else real(t, p, training, inplace)

    monkeypatch.setattr(F, "dropout", fixed)
    return queue


def plain_and_checkpointed(model: Siblings, x: torch.Tensor):
    """((output, grads) run plainly, the same under non-reentrant checkpointing) of a block over the fused q/k/v;
    the RNG moves on between forward and backward, so a recompute that drew new masks would differ."""
    layers = (model.q, model.k, model.v)
    params = [p for p in model.parameters() if p.requires_grad]

    def block(t):
        q, k, v = fused_linears(t, layers)
        return (q[..., :8] * k + v).tanh()

    def run(checkpointed):
        torch.manual_seed(11)
        y = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        torch.rand(5)
        return y, torch.autograd.grad(y.square().sum(), [x, *params])

    return run(False), run(True)


def norm_output(raw: torch.Tensor, norm_w: torch.Tensor, offset: float, tag: bool) -> torch.Tensor:
    """raw [..., d] RMS-normalised as the RMSNorm fast path computes it (rstd [...] in float32); tag: marked as
    that path's output, so a fused linear after it keeps the norm's input instead of its output."""
    rstd = raw.detach().float().square().mean(-1).add(1e-6).rsqrt()
    n = raw * rstd[..., None] * (norm_w + offset)
    if tag:
        recipes.tag_norm_output(n, raw.detach(), rstd, norm_w, offset)
    return n


def norm_case(dtype, dev="cpu"):
    """The RMSNorm-recipe case of both dropout test files: (model, its q/k/v layers, a raw input [3, 6, 24] that
    requires grad, the norm weight [24], the trainable parameters)."""
    model = siblings_model(dtype, dev)
    raw = torch.randn(3, 6, 24, dtype=dtype, device=dev, requires_grad=True)
    norm_w = torch.randn(24, dtype=dtype, device=dev) / 3
    return model, (model.q, model.k, model.v), raw, norm_w, [p for p in model.parameters() if p.requires_grad]
