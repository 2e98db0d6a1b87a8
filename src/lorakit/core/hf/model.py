"""An adapted HF model instance that transformers treats as a model with adapters (PeftAdapterMixin's state).

`sync(model)` runs after every add / load / delete / unload. While a `PreTrainedModel` holds lorakit adapters its
instance (never its class) carries what transformers' PEFT integration checks: `_hf_peft_config_loaded = True`,
`peft_config` (the live {name: config} mapping lorakit keeps), and bound methods that shadow the class's:
`save_pretrained` (adapter-only, PEFT's layout; `merged=True` for a full model) and the adapter API in
`adapter_api`. They are `functools.partial`s of module functions, so deepcopy and pickling keep working. The last
adapter gone, all of it is removed again and the class's own methods answer.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ... import errors
from .. import api, files
from . import adapter_api
from .describe import is_hf_model

_FLAG = "_hf_peft_config_loaded"  # what transformers' save_pretrained, gradient checkpointing and Trainer check
_MARK = "_lorakit_hf_bridge"
# transformers' save_pretrained arguments that have no meaning for an adapter directory (always safetensors, PEFT keys)
_IGNORED_SAVE_ARGS = {"max_shard_size", "variant", "token", "save_peft_format", "safe_serialization",
                      "save_original_format", "distributed_checkpoint"}


def sync(model) -> None:
    """Give an HF model with lorakit adapters transformers' adapter state and methods; take them away again when
    its last adapter is gone. A model holding transformers' own PEFT adapters is left alone."""
    installed = model.__dict__.get(_MARK, False)
    has_adapters = bool(api.list_adapters(model))
    if installed and not has_adapters:
        for key in (_FLAG, "peft_config", _MARK, *_METHODS):
            model.__dict__.pop(key, None)
    elif has_adapters and (installed or (is_hf_model(model) and not model.__dict__.get(_FLAG))):
        model.__dict__[_FLAG] = True
        model.__dict__["peft_config"] = api.state(model).configs  # the same dict: always current
        for name, fn in _METHODS.items():
            model.__dict__[name] = functools.partial(fn, model)
        model.__dict__[_MARK] = True
        from .trainer import ensure_trainer_patched

        ensure_trainer_patched()


def save_pretrained(model, save_directory: Union[str, os.PathLike], is_main_process: bool = True,
                    state_dict: Optional[dict] = None, push_to_hub: bool = False, *, merged: bool = False,
                    selected_adapters: Optional[Sequence[str]] = None, **kwargs) -> None:
    """The adapters in PEFT's layout (what `Trainer.save_model` and every Trainer checkpoint call): the active
    adapter (else the first) in `save_directory`, every other one in `save_directory/<name>` (PEFT's layout for
    several adapters). No base weights and no config.json are written, so `from_pretrained(save_directory)`,
    `PeftModel.from_pretrained(base, save_directory)` and `lorakit.load_adapter` load the adapter onto the base.

    Args:
        save_directory: where to write (created if needed; other files in it are kept).
        is_main_process: False writes nothing (transformers' meaning, for distributed runs).
        state_dict: a full model state dict to take the adapter tensors from (FSDP / DeepSpeed gathered ones);
            default: the live tensors.
        merged: write a standalone model instead: the active adapters merged into a copy of the base weights
            (the model in memory is not changed), through transformers' own save_pretrained; kwargs go to it.
        selected_adapters: which adapters to write (PEFT's argument); default: all.
        save_embedding_layers: PEFT's option; "auto" and False write the adapter only (lorakit never changes the
            base embeddings: trained embeddings are modules_to_save copies, saved with the adapter).
    """
    if push_to_hub:
        raise errors.ConfigError("save_pretrained(push_to_hub=True) is not supported for lorakit adapters: save to a "
                                 "directory, then upload it with huggingface_hub.upload_folder")
    if merged:
        return save_merged(model, save_directory, is_main_process=is_main_process, **kwargs)
    if kwargs.pop("save_embedding_layers", "auto") is True:
        raise errors.ConfigError("save_embedding_layers=True: lorakit never changes the base embeddings; to train and "
                                 "save resized embeddings, list embed_tokens / lm_head in modules_to_save")
    unknown = set(kwargs) - _IGNORED_SAVE_ARGS
    if unknown:
        raise TypeError(f"save_pretrained() got unexpected arguments {sorted(unknown)}")
    names = _adapters_in_save_order(model, selected_adapters)
    if not is_main_process:
        return None
    root = Path(save_directory)
    for i, name in enumerate(names):  # the root directory first: a writer that replaces it keeps the subfolders
        target = root if i == 0 else root / name
        if state_dict is None:
            files.save_adapter(model, target, name)
        else:
            files.write_adapter_files(target, files.adapter_state_dict_from(model, name, state_dict),
                                      files.adapter_config_dict(model, name))
    return None


def _adapters_in_save_order(model, selected: Optional[Sequence[str]]) -> list[str]:
    names = api.list_adapters(model) if selected is None else list(selected)
    api.require_adapters(model, names)
    first = next((n for n in api.active_adapters(model) if n in names), names[0] if names else None)
    return [first, *[n for n in names if n != first]] if first is not None else []


# --- a merged, standalone model ---------------------------------------------------------------------------
def save_merged(model, save_directory, **kwargs) -> None:
    """A full model with the active adapters merged into copies of the base weights (and the active adapter's
    modules_to_save copies in place of the originals), written by transformers' own save_pretrained. The model in
    memory is left as it is."""
    flag = model.__dict__.pop(_FLAG, None)
    try:  # the class's save_pretrained, with the adapter flag hidden so it writes a whole model
        type(model).save_pretrained(model, save_directory, state_dict=merged_state_dict(model), **kwargs)
    finally:
        if flag is not None:
            model.__dict__[_FLAG] = flag


@torch.no_grad()
def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict under its base keys, with the active adapters not merged yet merged into the base
    weights exactly as lorakit.merge merges them (each delta's own merge, in the active order: an output-scaled
    delta such as a weight-normalised one scales what was merged before it), and no lorakit-internal keys. Each
    layer is merged, read and restored bit for bit, so the model in memory ends as it was."""
    active = api.active_adapters(model)
    out = {k: v for k, v in model.state_dict().items() if ".deltas." not in k and ".copies." not in k}
    for path, layer in api.adapted_layers(model):
        names = tuple(n for n in active if n in layer.deltas and n not in layer.merged)
        if not names:
            continue
        w = layer.base_weight()
        key = f"{path}.weight"
        if key not in out or tuple(out[key].shape) != tuple(w.shape) or not w.is_floating_point():
            raise errors.QuantizedBaseError(f"{path}: the base weight is stored quantized; lorakit.dequantize(model) "
                                            "first, or lorakit.merge_requantized")
        out[key] = _merged_weight(layer, names)
    for path, holder in api.saved_modules(model):
        chosen = next((holder.copies[n] for n in active if n in holder.copies), None)
        if chosen is not None:
            out.update({f"{path}.{k}": v for k, v in chosen.state_dict().items()})
    return out


def _merged_weight(layer, names: tuple[str, ...]) -> torch.Tensor:
    """A copy of `layer`'s base weight with `names` merged as layer.merge does; the layer is restored after."""
    original = layer.base_weight().detach().clone()
    before = len(layer.merged)
    try:
        layer.merge(names)
        return layer.base_weight().detach().clone()
    finally:
        while len(layer.merged) > before:  # ours only, last first: an adapter merged earlier stays merged
            layer.deltas[layer.merged.pop()].unmerge(layer)
        layer.set_base_weight(original)  # bit for bit, whatever rounding the unmerge left


_METHODS = {
    "save_pretrained": save_pretrained,
    "set_adapter": adapter_api.set_adapter,
    "active_adapters": adapter_api.active_adapters,
    "disable_adapters": adapter_api.disable_adapters,
    "enable_adapters": adapter_api.enable_adapters,
    "load_adapter": adapter_api.load_adapter,
    "add_adapter": adapter_api.add_adapter,
    "delete_adapter": adapter_api.delete_adapter,
    "get_adapter_state_dict": adapter_api.get_adapter_state_dict,
}
