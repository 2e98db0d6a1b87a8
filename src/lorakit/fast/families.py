"""Forward patches for HF modules of known shape (Llama, Mistral, Qwen2/3, Gemma 1-3, BERT-likes).

Each patch replaces one module's `forward` on the instance (never the class, so other models in the
process keep HF's code) with a function that takes the fused route when it applies and calls the
module's own forward otherwise:
- attention: q/k/v (or query/key/value) computed in ONE fused call reading the input once, parked on the
  projections for HF's own attention code to pick up; RoPE fused inside it (rope.py);
- gated MLP: gate/up in one fused call, act(g)·u in one kernel (swiglu.py), down as usual (in a Llama-form
  layer's checkpoint recompute, without its unread base product);
- RMSNorm: norms.py; causal-LM head + loss: cross_entropy.py (logits are not returned when labels are
  given in a training forward, as with Liger/Unsloth).
Hooks (forward or backward) keep their calls: the attention's projections still run as modules (they take the
parked outputs); a gated MLP with a hooked projection runs its projections as modules; a hooked LM head keeps the
model's own loss.
"""

from __future__ import annotations

import contextlib
import inspect
import sys

import torch
from torch import nn

from ..core.adapted import AdaptedLayer
from ..core.patching import is_patched, pack_parameters, patch_forward, patched_original, unpatch_forward
from . import model_dropout, positions, recipes, wide
from .forms import forward_body, function_body, known_bodies, seen_by_hooks, source_bodies
from .checkpoint import CHECKPOINT_SLOT
from .cross_entropy import CHECKPOINTED_CHUNK_BYTES, CHUNK_BYTES, linear_cross_entropy, shift_labels
from .lora_linear import fused_linears, lora_linear_fast_path
from .spec import layer_spec
from .norms import WANT_ATTR, fast_rms_forward, norm_style
from .rope import make_fused_apply, set_fused_rope
from .swiglu import act_kind, gated_act
from .thread_scope import RECOMPUTED_BLOCK, SINGLE_BACKWARD
from .tiling import norm_remake, tile_rows_for, tiled_rows

SIBLING_GROUPS = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


# --- attention: grouped projections + fused RoPE -------------------------------------------------------------
def sibling_names(module: nn.Module) -> tuple[str, ...]:
    """The names of `module`'s q/k/v-like child projections that read one input, or () when it has none."""
    for names in SIBLING_GROUPS:
        if all(isinstance(getattr(module, n, None), nn.Module) for n in names):
            return names
    return ()


ROPE_PARAMS = ("q", "k", "cos", "sin", "unsqueeze_dim")  # HF's Llama-style apply_rotary_pos_emb, which rope.py fuses


def rope_module(module: nn.Module):
    """The Python module defining `module`'s class, when it has HF's Llama-style apply_rotary_pos_emb (GPT-J's
    (x, sin, cos), Gemma3n's (x, cos, sin, unsqueeze_dim) and other forms are left alone)."""
    mod = sys.modules.get(type(module).__module__)
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if not callable(fn) or not type(module).__name__.endswith("Attention"):
        return None
    fn = getattr(fn, "lorakit_original", fn)
    try:
        names = tuple(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return mod if names[:5] == ROPE_PARAMS or names == ROPE_PARAMS[:4] else None


def install_fused_rope(mod) -> None:
    """Replace `mod.apply_rotary_pos_emb` (an HF modeling module) with the fused one, once."""
    fn = mod.apply_rotary_pos_emb
    if getattr(fn, "lorakit_original", None) is None:
        mod.apply_rotary_pos_emb = make_fused_apply(fn)


def _grouped_members(module: nn.Module, names: tuple[str, ...]) -> list[AdaptedLayer]:
    layers = [getattr(module, n) for n in names]
    return [m for m in layers if isinstance(m, AdaptedLayer) and m.fast_path is lora_linear_fast_path]


def attention_forward(module, original, names, hash_dropout: bool, *args, **kwargs):
    """Attention forward with the sibling projections `names` computed in one fused call and RoPE fused; with
    hash_dropout (optimize's `dropout`), transformers' sdpa draws its CPU dropout from the hash masks."""
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else (args[0] if args else None)
    members = _grouped_members(module, names) if module.__dict__.get("_lorakit_group_ok", True) else []
    outs = fused_linears(x, members) if len(members) > 1 and isinstance(x, torch.Tensor) else None
    prev = set_fused_rope(True)
    scope = model_dropout.attention_scope if hash_dropout else contextlib.nullcontext
    try:
        if outs is None:
            with scope():
                return original(*args, **kwargs)
        recipes.park(members, x, outs)
        try:
            with scope():
                result = original(*args, **kwargs)
        except BaseException:
            recipes.unpark(members)
            raise
        if not recipes.unpark(members):  # this module's projections do not all read its first input
            module.__dict__["_lorakit_group_ok"] = False
        return result
    finally:
        set_fused_rope(prev)


# --- gated MLP -----------------------------------------------------------------------------------------------
# Gated MLPs whose forward is one of these, statement for statement (the input's name aside): down(act(gate(x)) ·
# up(x)) and nothing else (~115 classes in transformers 5.17). Clamps, multipliers, activation sparsity or an inner
# dropout (DeepseekV4, FalconH1, Gemma3n, T5Gemma, ...) keep the module's forward.
MLP_FORMS = (("llama", "LlamaMLP"), ("qwen2", "Qwen2MLP"))


def gated_mlp_kind(module: nn.Module):
    """The activation kind of a gate/up/down MLP (swiglu.act_kind), or None when `module` is not one."""
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return None
    if not type(module).__name__.endswith("MLP") or not hasattr(module, "act_fn"):
        return None
    if forward_body(type(module)) not in known_bodies(MLP_FORMS):
        return None
    return act_kind(module.act_fn)


TILE_ATTR = "_lorakit_tile_mlp"  # rows per tile, or "auto", set on gated MLPs by optimize (tile_mlp)
TILED_OUT_ATTR = "_lorakit_tiled_output"  # ((x's dtype, autocast), (width, dtype)) of the last tiled output


def mlp_forward(module, original, kind, x):
    """Gated MLP forward: gate/up in one fused call, act(g)·u in one kernel, then down. Under
    optimize(checkpoint="offload") a long sequence runs in row tiles (tiling.py) so that the [T, intermediate]
    tensors exist for one tile at a time."""
    tile = module.__dict__.get(TILE_ATTR)
    if tile:
        if tile == "auto":  # tiles of ~TILE_BYTES; shorter sequences keep the one-pass (faster) route
            width = getattr(module, "intermediate_size", None) or 4 * x.shape[-1]
            rows = tile_rows_for(width, x.element_size())
            least = 4 * rows
        else:
            rows = least = int(tile)
        if x.numel() // x.shape[-1] > least:
            recipe = recipes.norm_recipe(x)  # x is a norm's output: remade per tile, not kept
            remake = norm_remake(recipe, x.dtype) if recipe is not None else None
            dev = x.device.type
            key = (x.dtype, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
            last = module.__dict__.get(TILED_OUT_ATTR)  # what the block's forward gave, for its recompute
            skip = _output_unread(module) and not seen_by_hooks(*_projections(module)) and last and last[0] == key
            out = tiled_rows(lambda xt: _gated_mlp(module, kind, xt, False), x, rows, list(module.parameters()),
                             remake, lambda xt: _gated_mlp(module, kind, xt, True), last[1] if skip else None)
            if not skip:  # the recompute's tiles run in its backward alone
                module.__dict__[TILED_OUT_ATTR] = (key, (out.shape[-1], out.dtype))
            return out
    return _gated_mlp(module, kind, x, _output_unread(module))


def _projections(mlp: nn.Module) -> tuple:
    return mlp.gate_proj, mlp.up_proj, mlp.down_proj


def _gated_mlp(module, kind, x, unread: bool):
    """down(act(gate(x)) · up(x)); unread: nobody reads the output's values (the down projection computes only
    what its backward needs)."""
    gate, up = module.gate_proj, module.up_proj
    # With a hook on a projection (or a global one), gate and up run as modules, so the hooks see their
    # calls, and no gradient is written over what a hook may keep (gate, up, act).
    hooked = seen_by_hooks(*_projections(module))
    with SINGLE_BACKWARD.left() if hooked else contextlib.nullcontext():
        outs = None
        if not hooked and (isinstance(gate, AdaptedLayer) or isinstance(up, AdaptedLayer)):
            outs = fused_linears(x, (gate, up))
        g, u = outs if outs is not None else (gate(x), up(x))
        act, down = gated_act(g, u, kind), module.down_proj
        # Unread: an adapted or frozen linear computes only what its backward reads; another module (one that
        # reads its inner linear's output) runs as it is.
        out = fused_linears(act, (down,), unread=True) if unread and not hooked else None
        return out[0] if out is not None else down(act)


# Decoder layers whose forward is one of these, statement for statement (Llama's: 62 classes in transformers 5.17):
# `x = residual + self.mlp(x); return x`, so only the residual addition reads the MLP's output, and an addition
# keeps neither operand for its backward. In the layer's recompute under checkpointing (checkpoint.py) nobody reads
# that value: the down projection computes only what its backward needs and skips its base product (and, with
# checkpoint=True, a 4-bit base's dequantisation), [T, intermediate]·[intermediate, d] a block (Llama-3-8B, T2048:
# 0.24 TFLOP, ~6% of the graphed bf16 and QLoRA steps; BENCHMARKS.md); a sequence-tiled MLP runs no tile there (its
# backward recomputes every tile anyway) and gives an output of the width and dtype its forward gave.
DECODER_FORMS = (("llama", "LlamaDecoderLayer"),)


def _output_unread(mlp: nn.Module) -> bool:
    """Whether nobody reads the MLP's output now: the block being recomputed has this MLP as its `mlp`, and the
    forward its recompute runs (the one beneath its checkpoint patch) is a method of the block whose statements are
    those of DECODER_FORMS as transformers' source files have them; no hook sees the MLP's call."""
    block = RECOMPUTED_BLOCK.get()
    if block is None or block._modules.get("mlp") is not mlp or seen_by_hooks(mlp):
        return False
    runs = patched_original(block, CHECKPOINT_SLOT)
    return getattr(runs, "__self__", None) is block and \
        function_body(getattr(runs, "__func__", None)) in source_bodies(DECODER_FORMS)


def set_mlp_tiling(model: nn.Module, tile) -> int:
    """Tile every patched gated MLP of `model` over the sequence: tile = rows per tile, "auto", or 0/None (off).
    Returns how many MLPs were set."""
    count = 0
    for _, m in model.named_modules():
        if gated_mlp_kind(m) is not None and is_patched(m):
            if tile:
                m.__dict__[TILE_ATTR] = tile
            else:
                m.__dict__.pop(TILE_ATTR, None)
            count += 1
    return count


# --- causal-LM head and loss -----------------------------------------------------------------------------------
# Causal LMs whose forward is one of these, statement for statement (docstrings aside), compute logits =
# lm_head(hidden) and transformers' standard loss, nothing else: Llama's (Mistral, Qwen2/3, Gemma, Phi-3 and ~45
# more in transformers 5.17), Mixtral's (MoE models: the same plus the auxiliary loss when router logits are asked
# for) and Gemma 2's (the same plus a logit soft-cap, which must be off). A head with its own scaling, soft-cap,
# z-loss or vocabulary trimming (Cohere, Granite, FalconH1, RecurrentGemma, ...) keeps the model's forward.
HEAD_FORMS = (("llama", "LlamaForCausalLM"), ("mixtral", "MixtralForCausalLM"), ("gemma2", "Gemma2ForCausalLM"))


def causal_lm_eligible(model: nn.Module) -> bool:
    """Whether `model` is an HF causal LM whose head and loss `causal_lm_forward` can fuse: its forward is one of
    HEAD_FORMS, with no logit soft-cap and transformers' own causal-LM loss."""
    head = getattr(model, "lm_head", None)
    if not isinstance(getattr(model, "model", None), nn.Module) or head is None:
        return False
    if getattr(getattr(model, "config", None), "final_logit_softcapping", None) is not None:
        return False
    if "logits_to_keep" not in inspect.signature(type(model).forward).parameters or _custom_loss(model):
        return False
    return forward_body(type(model)) in known_bodies(HEAD_FORMS)


def _router_logits_asked(model: nn.Module, kwargs: dict) -> bool:
    """output_router_logits from the call, or from the config where the call leaves it None (as transformers reads
    it)."""
    asked = kwargs.get("output_router_logits")
    return bool(getattr(model.config, "output_router_logits", False) if asked is None else asked)


def _custom_loss(model: nn.Module) -> bool:
    """A loss function set on the model (transformers' `loss_function` setter) or defined by a subclass, or a loss
    type other than the causal-LM cross-entropy."""
    if "_loss_function" in model.__dict__ or getattr(model, "loss_type", None) not in (None, "ForCausalLM"):
        return True
    owner = next((k for k in type(model).__mro__ if "loss_function" in vars(k)), None)
    return owner is not None and owner.__module__ != "transformers.modeling_utils"


LOSS_CHUNK_ATTR = "_lorakit_loss_chunk_bytes"  # on a model whose blocks are checkpointed: smaller loss chunks


def set_checkpointed_loss(model: nn.Module) -> None:
    """The fused loss of a model whose blocks are checkpointed takes smaller chunks (cross_entropy.py says why)."""
    model.__dict__[LOSS_CHUNK_ATTR] = CHECKPOINTED_CHUNK_BYTES


def causal_lm_forward(model, original, *args, **kwargs):
    """Causal-LM forward that, in a training forward with labels, computes the loss from the hidden states
    without materialising the logits; any other call goes to `original`."""
    labels = kwargs.get("labels")
    spec = layer_spec(model.lm_head) if type(model.lm_head) is nn.Linear else None  # (w, bias, ...)
    trained_bias = spec is not None and spec[1] is not None and spec[1].requires_grad  # the fused loss gives it none
    head = spec[:2] if spec is not None and not trained_bias else None
    if (labels is None or not torch.is_grad_enabled() or head is None or kwargs.get("logits_to_keep", 0) != 0
            or "return_dict" in kwargs or kwargs.get("past_key_values") is not None
            or _router_logits_asked(model, kwargs) or _custom_loss(model) or seen_by_hooks(model.lm_head)):
        return original(*args, **kwargs)  # a MoE's auxiliary loss, a custom loss, a hook on the head's logits
    signature = inspect.signature(type(model).forward)
    bound = signature.bind(model, *args, **kwargs).arguments
    bound.pop("self", None)
    extra = bound.pop("kwargs", {})
    for name in ("labels", "logits_to_keep"):
        bound.pop(name, None)
    scope = contextlib.nullcontext()
    packed = bound.get("position_ids") is not None and bound.get("attention_mask") is None
    if (bound.get("use_cache") is None and "use_cache" not in extra and "use_cache" in signature.parameters
            and not packed):  # given positions and no mask, the cache decides whether transformers looks for
        bound["use_cache"] = False  # packed rows: left to the model (HF's default cache copies every layer's)
        if bound.get("position_ids") is None and bound.get("attention_mask") is None:
            scope = positions.no_packed_check()  # as with the cache on: no packed check, no host-device sync
    with scope:
        outputs = model.model(**bound, **extra)
    hidden = outputs.last_hidden_state
    ignore_index = extra.get("ignore_index", -100)
    target = extra.get("shift_labels")
    target = shift_labels(labels, ignore_index) if target is None else target
    w, b = head
    loss = linear_cross_entropy(hidden, w, b, target, ignore_index, extra.get("num_items_in_batch"),
                                chunk_bytes=model.__dict__.get(LOSS_CHUNK_ATTR, CHUNK_BYTES))
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


# --- wide weights (wide.py) ------------------------------------------------------------------------------------
def _base_param(layer: nn.Module):
    """The dense, frozen, untransposed base weight Parameter of a linear the fused path reads, or None."""
    spec = layer_spec(layer)
    if spec is None or spec[0] is None or spec[3] is not None:
        return None
    base = layer.base_layer if isinstance(layer, AdaptedLayer) else layer
    w = base._parameters.get("weight")
    return w if w is spec[0] else None  # GPT-2's Conv1D gives a transposed view: not widened


def widen_groups(model: nn.Module) -> int:
    """Give the base weights of every fused group that reads an RMSNorm's output (q/k/v, gate/up) spare columns
    for the group's total rank (wide.py); returns how many weights were widened."""
    count = 0
    if not any(norm_style(m) is not None and is_patched(m) for m in model.modules()):
        return 0  # no norm writes wide outputs
    for _, m in model.named_modules():
        if not is_patched(m):
            continue
        names = ("gate_proj", "up_proj") if gated_mlp_kind(m) is not None else sibling_names(m)
        layers = [getattr(m, n) for n in names]
        specs = [layer_spec(layer) for layer in layers]
        if not layers or any(s is None for s in specs) or not any(isinstance(x, AdaptedLayer) for x in layers):
            continue
        rank = sum(t[0].shape[0] for s in specs for t in s[2])
        params = [_base_param(layer) for layer in layers]
        if rank > 0 and all(p is not None for p in params):
            count += sum(wide.widen(p, rank) for p in params)
    return count


# --- installing ------------------------------------------------------------------------------------------------
def install(model: nn.Module, *, group: bool, norms: bool, rope: bool, glu: bool, fused_loss: bool,
            dropout: bool) -> dict:
    """Patch every known module of `model`; returns counts per patch kind."""
    counts = {"attention": 0, "mlp": 0, "norm": 0, "lm_loss": 0}
    counts["dropout"] = model_dropout.install(model) if dropout else 0  # first: the loop skips patched modules
    for _, m in model.named_modules():
        if isinstance(m, AdaptedLayer) or is_patched(m):
            continue
        names = sibling_names(m) if group else ()
        rope_mod = rope_module(m) if rope else None
        if names or rope_mod is not None:
            if rope_mod is not None:
                install_fused_rope(rope_mod)
            counts["attention"] += patch_forward(m, attention_forward, names, dropout)
        elif glu and gated_mlp_kind(m) is not None:
            counts["mlp"] += patch_forward(m, mlp_forward, gated_mlp_kind(m))
        elif norms and norm_style(m) is not None:
            counts["norm"] += patch_forward(m, fast_rms_forward)
    if fused_loss and causal_lm_eligible(model):
        positions.install()
        counts["lm_loss"] += patch_forward(model, causal_lm_forward)
    return counts


def uninstall(model: nn.Module) -> None:
    """Remove every family patch that `install` put on `model`, and its wide weights."""
    pack_parameters(model)
    for _, m in model.named_modules():
        m.__dict__.pop(WANT_ATTR, None)
        unpatch_forward(m)
        m.__dict__.pop("_lorakit_group_ok", None)
        m.__dict__.pop(TILE_ATTR, None)
        m.__dict__.pop(TILED_OUT_ATTR, None)
        m.__dict__.pop(LOSS_CHUNK_ATTR, None)
