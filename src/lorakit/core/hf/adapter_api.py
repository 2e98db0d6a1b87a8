"""transformers' adapter methods (PeftAdapterMixin's names and arguments) answered by lorakit, for code written
for transformers' PEFT integration: model.set_adapter(...), model.load_adapter(path, name), ...

Each function takes the model first; `model.sync` binds them onto an adapted HF model instance.
"""

from __future__ import annotations

from typing import Optional, Union

from ... import errors
from .. import api, files


def set_adapter(model, adapter_name: Union[str, list[str]]) -> None:
    """Use this adapter (or these, their outputs summed); the others stay loaded but inactive."""
    api.set_active(model, adapter_name)


def active_adapters(model) -> list[str]:
    """The names of the active adapters."""
    return api.active_adapters(model)


def disable_adapters(model) -> None:
    """Run the base model only until enable_adapters (merged adapters are taken out of the weights first)."""
    api.unmerge(model)
    for _, wrapper in [*api.adapted_layers(model), *api.saved_modules(model)]:
        wrapper.disabled = True


def enable_adapters(model) -> None:
    """Undo disable_adapters: the active adapters run again."""
    for _, wrapper in [*api.adapted_layers(model), *api.saved_modules(model)]:
        wrapper.disabled = False


def load_adapter(model, peft_model_id: Optional[str] = None, adapter_name: Optional[str] = None,
                 peft_config=None, adapter_state_dict=None, is_trainable: bool = False, hotswap="auto",
                 **kwargs) -> None:
    """Load a PEFT or lorakit adapter directory as adapter `adapter_name` ("default" when not given) with
    lorakit.load_adapter: inactive unless it is the model's first adapter; frozen unless is_trainable.
    Loading from a state dict (peft_config + adapter_state_dict) and hotswap=True are not supported: use
    lorakit.hot_swap to replace an adapter's weights in place."""
    if peft_model_id is None or peft_config is not None or adapter_state_dict is not None:
        raise errors.ConfigError("load_adapter on a lorakit model reads an adapter directory: "
                                 "model.load_adapter(path, adapter_name)")
    if hotswap is True:
        raise errors.ConfigError("load_adapter(hotswap=True): use lorakit.hot_swap(model, path, name)")
    files.load_adapter(model, peft_model_id, name=adapter_name or "default", trainable=is_trainable)


def add_adapter(model, adapter_config, adapter_name: Optional[str] = None) -> None:
    """Add a fresh adapter from a lorakit config or a PEFT config object and make it the active one (transformers'
    add_adapter activates it, unlike lorakit.add_adapter)."""
    name = adapter_name or "default"
    api.add_adapter(model, adapter_config, name)  # a lorakit or PEFT config; ConfigError for anything else
    api.set_active(model, name)


def delete_adapter(model, adapter_names: Union[str, list[str]]) -> None:
    """Remove these adapters; with the last one gone the model is its base again."""
    names = api.adapter_names(adapter_names)  # AdapterNameError for a name listed twice, before anything changes
    api.require_adapters(model, names)
    for name in names:
        api.delete_adapter(model, name)


def get_adapter_state_dict(model, adapter_name: Optional[str] = None, state_dict=None) -> dict:
    """The adapter's tensors under PEFT's keys without the `base_model.model.` prefix (transformers' format);
    the active adapter when no name is given. With `state_dict` (a full model state dict, e.g. gathered from a
    sharded model) the values are taken from it, matched by name (CheckpointError for a missing tensor)."""
    name = adapter_name or (api.active_adapters(model) or api.list_adapters(model))[0]
    tensors = (files.adapter_state_dict(model, name) if state_dict is None
               else files.adapter_state_dict_from(model, name, state_dict))
    return {k[len(files.PREFIX):]: v for k, v in tensors.items()}
