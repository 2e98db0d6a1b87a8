"""How a model is told where the rows of a packed micro-batch start, and the packed loss.

Three paths, all through what transformers and torch provide:
- "positions": position_ids restart at each row and attention_mask is None; transformers' mask builders
  (masking_utils.find_packed_sequence_indices) then keep attention inside each row, for sdpa, eager, flex
  and flash_attention_2 (which goes varlen). Llama, Mistral, Qwen, Gemma, GPT-2, ... in transformers 5.
- "mask": an explicit 4D block-diagonal mask (causal for decoders), made by transformers' own mask function
  for the model's attention implementation; for models whose mask builder ignores position_ids (BERT-likes).
  Quadratic in the packed length: the CPU reference.
- "varlen": the attention function "lorakit_varlen" (registered with transformers' AttentionInterface) runs
  torch.nn.attention.varlen.varlen_attn on the rows' cumulative lengths; no mask at all. GPU only.

Which path a model takes is measured once (`choose_path`): a packed probe of two short rows must give the
second row's logits alone, and must differ from what attention across the rows gives. The result is kept on
the model. `use_varlen_attention(model)` is the GPU seam.
"""

from __future__ import annotations

import inspect
from typing import Optional

import torch
import torch.nn.functional as F

from ..core.patching import is_patched
from ..errors import ConfigError
from ..loading.rows import IGNORE

PATH_ATTR = "_lorakit_packed_path"
VARLEN = "lorakit_varlen"


def _inner(model):
    return getattr(model, "module", model)  # the model inside a DDP wrapper


# --- the model inputs of a packed batch --------------------------------------------------------------------
def packed_inputs(model, batch: dict[str, torch.Tensor]) -> dict:
    """The keyword arguments of the model's forward for a packed batch (input_ids, position_ids, ...)."""
    path = choose_path(model)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if path == "mask":
        inputs["attention_mask"] = block_mask(_inner(model), batch["document_ids"])
    elif path == "varlen":
        cu, longest = cumulative_lengths(batch["document_ids"])
        # an all-ones padding mask: transformers skips mask building; the attention function reads these
        inputs.update(attention_mask=torch.ones_like(batch["input_ids"]), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=longest, max_length_k=longest)
    return inputs


def cumulative_lengths(documents: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(cu_seqlens int32 [segments + 1], longest segment) of [P, L] document ids, the parts laid end to end
    (each part's padding tail is a segment of its own)."""
    flat = documents.reshape(-1)
    part = torch.arange(documents.shape[0], device=documents.device).repeat_interleave(documents.shape[1])
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = (flat[1:] != flat[:-1]) | (part[1:] != part[:-1])
    edges = torch.cat([starts.nonzero().flatten(), torch.tensor([flat.numel()], device=flat.device)])
    return edges.to(torch.int32), int((edges[1:] - edges[:-1]).max())


def is_causal_model(model) -> bool:
    """Whether the model's attention is causal (a decoder), from its config and class."""
    config = model.config
    return bool(getattr(config, "is_decoder", False)) or "CausalLM" in type(model).__name__


def block_mask(model, documents: torch.Tensor) -> torch.Tensor:
    """The 4D mask [P, 1, L, L] keeping attention inside each document (and causal for a decoder), in the
    format of the model's attention implementation (transformers' mask functions make it)."""
    from transformers import masking_utils as mu

    same = mu.packed_sequence_mask_function(documents)
    base = mu.causal_mask_function if is_causal_model(model) else mu.bidirectional_mask_function
    impl = getattr(model.config, "_attn_implementation", "sdpa")
    make = mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.get(impl, mu.sdpa_mask)
    parts, length = documents.shape
    dtype = model.get_input_embeddings().weight.dtype
    return make(batch_size=parts, q_length=length, kv_length=length, q_offset=0, kv_offset=0,
                mask_function=mu.and_masks(base, same), attention_mask=None, allow_is_causal_skip=False,
                allow_is_bidirectional_skip=False, dtype=dtype, config=model.config, use_vmap=False,
                device=documents.device)


# --- choosing the path ---------------------------------------------------------------------------------------
def choose_path(model, prefer: Optional[str] = None) -> str:
    """The packed-attention path of `model` (kept on it after the first call): `prefer` or the attention
    implementation's own ("varlen" when use_varlen_attention ran), else "positions" when the probe shows
    transformers honours restarting position_ids, else "mask" when the probe shows the block mask exact.
    ConfigError when no path is exact."""
    inner = _inner(model)
    path = inner.__dict__.get(PATH_ATTR)
    if path is not None and prefer is None:
        return path
    candidates = [prefer] if prefer else (
        ["varlen"] if getattr(inner.config, "_attn_implementation", None) == VARLEN else ["positions", "mask"])
    for candidate in candidates:
        if probe_exact(inner, candidate):
            inner.__dict__[PATH_ATTR] = candidate
            return candidate
    raise ConfigError(f"packing: {type(inner).__name__} keeps rows apart on none of the paths {candidates} "
                      "(train without --packing)")


@torch.no_grad()
def probe_exact(model, path: str, compute_dtype: Optional[torch.dtype] = None) -> bool:
    """Two short rows packed on `path`: True when the second row's logits are those of it run alone, to
    within 1% (10% for bf16/fp16 weights or compute) of how far attention across the rows moves them: a
    scale-free test (a small random model's leak is small, a real model's large); a path that leaks misses it
    by ~100%. `compute_dtype`: the autocast dtype the run trains in (None: autocast off), so a kernel that
    takes only half precision (flash varlen) is probed as training will call it."""
    vocab = model.get_input_embeddings().num_embeddings
    device = model.get_input_embeddings().weight.device
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(vocab, (5,), generator=g), torch.randint(vocab, (4,), generator=g)
    docs = torch.tensor([[0] * 5 + [1] * 4], device=device)
    batch = {"input_ids": torch.cat([first, second])[None].to(device), "document_ids": docs,
             "position_ids": torch.tensor([list(range(5)) + list(range(4))], device=device)}
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None):
            model.__dict__[PATH_ATTR] = path
            packed = model(**packed_inputs(model, batch)).logits[0, 5:].float()
            alone = model(input_ids=batch["input_ids"][:, 5:], use_cache=False).logits[0].float()
            # the same positions with attention across the rows (a 2D mask of ones: no packed detection)
            across = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                           attention_mask=torch.ones_like(batch["input_ids"])).logits[0, 5:].float()
    except (RuntimeError, TypeError, ValueError):
        return False
    finally:
        model.__dict__.pop(PATH_ATTR, None)
        model.train(was_training)
    error, leak = (packed - alone).abs().max(), (across - alone).abs().max()
    # relative to the leak, so exact at any weight scale; bf16/fp16 kernels round differently per shape (~0.5%)
    full = model.get_input_embeddings().weight.dtype == torch.float32 and compute_dtype in (None, torch.float32)
    share = 0.01 if full else 0.1
    return bool(error <= share * leak)


# --- the loss ------------------------------------------------------------------------------------------------
def packed_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token CE over the packed batch's labelled targets, their count): the same sum as
    loop.causal_loss_sum gives for the same rows unpacked. With lorakit.optimize()'s chunked loss on the
    model, the logits are never materialised."""
    labels = batch["labels"]  # [P, L]; IGNORE on prompts, row starts and padding
    inputs = packed_inputs(model, batch)
    count = int((labels[:, 1:] != IGNORE).sum())
    if is_patched(_inner(model)):  # fast/families.causal_lm_forward: the loss from the hidden states
        return model(**inputs, labels=labels, num_items_in_batch=1).loss, count
    logits = model(**inputs).logits[:, :-1]  # position t predicts token t+1
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, count


# --- the GPU seam: torch's varlen attention as a transformers attention function ---------------------------------
def varlen_available(device: torch.device) -> bool:
    """Whether torch.nn.attention.varlen.varlen_attn can run here (CUDA and a torch that has it)."""
    if device.type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, T, D], key/value [B, Hkv, T, D] → ([B, T, H, D], None).
    With cu_seq_lens_q (a packed batch) one varlen_attn call over all rows; otherwise transformers' sdpa."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout and module.training:
        raise ConfigError("packed varlen attention has no attention dropout: set the model's attention_dropout to 0")
    from torch.nn.attention.varlen import varlen_attn

    kind = query.device.type
    if query.dtype == torch.float32 and torch.is_autocast_enabled(kind):
        # rotary embeddings promote q/k to fp32 under autocast; flash varlen takes only fp16/bf16 (as
        # transformers' flash-attention integration does, compute in the autocast dtype)
        query, key, value = (x.to(torch.get_autocast_dtype(kind)) for x in (query, key, value))
    b, h, t, d = query.shape
    params = inspect.signature(varlen_attn).parameters
    extra = {"scale": scaling} if "scale" in params else {}
    if "scale" not in params and scaling is not None:  # a torch without `scale`: it uses 1/sqrt(d)
        query = query * (scaling * d ** 0.5)
    causal = getattr(module, "is_causal", True)
    if "window_size" in params:  # torch 2.13: (-1, 0) is causal
        extra["window_size"] = (-1, 0) if causal else (-1, -1)
    else:
        extra["is_causal"] = causal
    if key.shape[1] != h:  # grouped-query attention
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:  # an older torch: repeat the key/value heads
            key = key.repeat_interleave(h // key.shape[1], dim=1)
            value = value.repeat_interleave(h // value.shape[1], dim=1)
    # [B, H, T, D] → [B·T, H, D]: the parts laid end to end, as cumulative_lengths counts them
    q, k, v = (x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (query, key, value))
    longest = kwargs["max_length_q"]
    out = varlen_attn(q, k, v, cu, cu, longest, longest, **extra)
    return out.reshape(b, t, h, d), None


ATTENTION_DROPOUT_FIELDS = ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")


def attention_dropout(config) -> float:
    """The model config's attention dropout probability (0 when it names none)."""
    values = [getattr(config, f, None) for f in ATTENTION_DROPOUT_FIELDS]
    return max([float(v) for v in values if isinstance(v, (int, float))], default=0.0)


def use_varlen_attention(model, compute_dtype: Optional[torch.dtype] = None) -> bool:
    """On CUDA with torch's varlen_attn: switch `model` to "lorakit_varlen" (install_varlen), probed in the
    run's `compute_dtype` (autocast; None: off). Returns whether it did; elsewhere, where the probe finds it
    inexact, or for a model with attention dropout (varlen_attn has none; the probe runs in eval mode, where
    dropout is off, so training would fail), nothing changes."""
    inner = _inner(model)
    if not varlen_available(next(inner.parameters()).device) or not getattr(inner, "_supports_attention_backend",
                                                                                False):
        return False
    if attention_dropout(inner.config) > 0:
        return False
    return install_varlen(inner, compute_dtype)


def install_varlen(model, compute_dtype: Optional[torch.dtype] = None) -> bool:
    """Register "lorakit_varlen" with transformers (padded batches keep sdpa's masks through the same name),
    switch `model` to it, and keep it only when the packed probe is exact (else the previous implementation)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, sdpa_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(VARLEN)
    if not probe_exact(model, "varlen", compute_dtype):
        model.set_attn_implementation(previous)
        return False
    model.__dict__[PATH_ATTR] = "varlen"
    return True
