"""Adapter files in PEFT's layout: adapter_config.json + adapter_model.safetensors.

Keys are `base_model.model.<module path>.<delta suffix>` with the adapter name left out, exactly as
PEFT writes them. Loading checks everything (config, file integrity, keys, shapes, finite values)
against deltas built next to the model, and only then changes the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import torch
import safetensors.torch
from torch import nn

from ..errors import AdapterFormatError, CheckpointError, ConfigError, ShapeMismatchError
from . import atomic
from .adapted import AdaptedLayer
from .layers import ParameterOps
from .api import AdapterPlan, adapted_layers, attach, get_config, plan_adapter, saved_modules
from .targeting import adapted_layer_at
from .originals import keep_originals
from .writing import CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, write_adapter_files
from .hf.describe import describe_base
from .registry import config_from_peft_dict

PREFIX = "base_model.model."


# --- saving -------------------------------------------------------------------------------------------
def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys."""
    config = get_config(model, name)
    out: dict[str, torch.Tensor] = {}
    adapted = dict(adapted_layers(model))
    for path, layer in adapted.items():
        if name in layer.deltas:
            for suffix, t in layer.deltas[name].peft_tensors_for_save().items():
                out[f"{PREFIX}{path}.{suffix}"] = t
    for path, holder in saved_modules(model):
        if name in holder.copies:
            for key, t in holder.copies[name].state_dict().items():
                out[f"{PREFIX}{path}.{key}"] = t
    bias_mode = config.bias_mode
    if bias_mode != "none":
        own = {f"{p}.base_layer.bias" for p, layer in adapted.items() if name in layer.deltas}
        for key, p in model.named_parameters():
            internal = ".deltas." in key or ".copies." in key or ".original_module." in key
            if key.endswith("bias") and not internal and (bias_mode == "all" or key in own):
                out[f"{PREFIX}{key}"] = p
    return out


def adapter_state_dict_from(model: nn.Module, name: str, state_dict: dict) -> dict[str, torch.Tensor]:
    """adapter_state_dict(model, name) as CPU copies, every value taken from `state_dict`: a full model state dict
    under the model's own keys (what a Trainer gathers under ZeRO-3 / sharded FSDP, where the live parameters are
    empty). Tensors are matched by the name each live tensor has in model.state_dict(), never by storage.

    Raises:
        CheckpointError: `state_dict` lacks one of the adapter's tensors, or holds it with another shape."""
    names = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}

    def passed(live: torch.Tensor, required: bool = True) -> torch.Tensor:
        key = names.get(id(live))
        if key is None or key not in state_dict:
            if not required:
                return live
            raise CheckpointError(f"the state dict passed for adapter {name!r} has no {key or 'tensor'!r}")
        t = state_dict[key]
        shape = tuple(getattr(live, "ds_shape", live.shape))  # DeepSpeed ZeRO-3 keeps the full shape aside
        if live.numel() and tuple(t.shape) != shape:
            raise CheckpointError(f"the state dict passed for adapter {name!r} holds {key!r} with shape "
                                  f"{tuple(t.shape)}; the model has {shape}")
        return t

    # the deltas hold the passed values while their save-time tensors are computed (a variant may derive them)
    own = [t for _, layer in adapted_layers(model) if name in layer.deltas
           for t in (*layer.deltas[name].parameters(), *layer.deltas[name].buffers())]
    originals = [t.data for t in own]
    try:
        with torch.no_grad():
            for t in own:
                t.data = passed(t, required=isinstance(t, nn.Parameter)).to(t.dtype)
            return {k: passed(v).detach().to("cpu", copy=True).contiguous() if id(v) in names
                    else v.detach().to("cpu", copy=True).contiguous()
                    for k, v in adapter_state_dict(model, name).items()}
    finally:
        for t, data in zip(own, originals):
            t.data = data


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike], name: str = "default") -> Path:
    """Write the adapter as PEFT does: a reader of `directory` sees the old adapter whole, the new one whole, or (in
    place, see write_adapter_files) for a moment no adapter, never new weights with an old config.

    Raises:
        OutputPathError: `directory` cannot be written (a file in its way, no permission, a full disk...)."""
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in adapter_state_dict(model, name).items()}
    return write_adapter_files(directory, tensors, adapter_config_dict(model, name))


def adapter_config_dict(model: nn.Module, name: str = "default") -> dict:
    """The adapter_config.json contents of adapter `name`."""
    config = get_config(model, name)
    targets = sorted(p for p, layer in adapted_layers(model)
                     if name in layer.deltas and not isinstance(layer.ops, ParameterOps))  # modules only
    data = config.to_peft_dict()
    data["target_modules"] = targets if isinstance(config.target_modules, str) else config.target_modules
    data["inference_mode"] = True
    hf_config = getattr(model, "config", None)
    if data.get("base_model_name_or_path") is None and hf_config is not None:
        data["base_model_name_or_path"] = getattr(hf_config, "_name_or_path", None) or None
    return describe_base(model, data)  # task_type (or auto_mapping) for PEFT's AutoPeftModel classes


# --- reading ------------------------------------------------------------------------------------------
def read_config(directory: Union[str, os.PathLike]):
    """The adapter config in `directory`/adapter_config.json (PEFT's or lorakit's), validated. Raises
    AdapterFormatError for a missing or unreadable file, ConfigError for a bad config."""
    d = Path(directory)
    if not d.is_dir():
        raise AdapterFormatError(f"no adapter directory at {d}")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{d} has no {CONFIG_NAME}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:  # ValueError: JSONDecodeError, an over-long integer
        raise AdapterFormatError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise AdapterFormatError(f"{path} is nested too deeply to be an adapter config") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path} must hold a JSON object")
    try:
        return config_from_peft_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def read_tensors(directory: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory: adapter_model.safetensors, else adapter_model.bin read with
    weights_only=True (never an arbitrary unpickle). Raises AdapterFormatError."""
    d = Path(directory)
    if (d / WEIGHTS_NAME).is_file():
        try:
            return safetensors.torch.load_file(d / WEIGHTS_NAME)
        except Exception as e:  # safetensors raises its own SafetensorError and OSErrors
            raise AdapterFormatError(f"{d / WEIGHTS_NAME} is truncated or corrupt: {e}") from None
    if (d / PICKLE_NAME).is_file():
        try:  # weights_only: never unpickle arbitrary objects
            data = torch.load(d / PICKLE_NAME, map_location="cpu", weights_only=True)
        except Exception as e:
            raise AdapterFormatError(f"{d / PICKLE_NAME} could not be read safely: {e}") from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapterFormatError(f"{d / PICKLE_NAME} does not hold a dict of tensors")
        return data
    raise AdapterFormatError(f"{d} has neither {WEIGHTS_NAME} nor {PICKLE_NAME}")


def weights_file(directory: Union[str, os.PathLike]) -> Path:
    """The tensor file read_tensors reads in `directory` (named in every error about its contents)."""
    d = Path(directory)
    return d / WEIGHTS_NAME if (d / WEIGHTS_NAME).is_file() else d / PICKLE_NAME


def _sort_tensors(model: nn.Module, plan: AdapterPlan, tensors: dict[str, torch.Tensor], source: Path):
    """Assign every saved tensor to a delta, a modules_to_save copy or a base bias; raise on leftovers, on one
    tensor saved twice (with and without the `base_model.model.` prefix) and on base biases the config
    says were not saved (bias="none")."""
    per_delta = {p: {} for p in plan.deltas}
    per_saved = {p: {} for p in plan.saved}
    biases, unknown, seen = {}, [], {}
    params = dict(model.named_parameters())
    for raw_key, t in tensors.items():
        key = raw_key[len(PREFIX):] if raw_key.startswith(PREFIX) else raw_key
        owner = max((p for p in plan.deltas if key.startswith(p + ".")), key=len, default=None)
        owned = owner is not None and key[len(owner) + 1:] in plan.deltas[owner].peft_tensors()
        plain = key if owned else key.replace(".base_layer.", ".")  # nested wrappers own `.base_layer.` keys
        if plain in seen:
            raise AdapterFormatError(f"{source}: {seen[plain]!r} and {raw_key!r} are the same tensor saved twice; "
                                     "which one is meant is ambiguous")
        seen[plain] = raw_key
        if owned:
            per_delta[owner][key[len(owner) + 1:]] = t
            continue
        saved = next((p for p in plan.saved if key.startswith(p + ".")), None)
        if saved is not None:
            if not _sort_saved(model, saved, key[len(saved) + 1:], t, per_saved, biases):
                unknown.append(raw_key)
            continue
        if key.endswith("bias") and (key in params or plain in params):
            biases[key] = (params[key] if key in params else params[plain], t)  # the Parameter survives wrapping
            continue
        unknown.append(raw_key)
    if unknown:
        raise AdapterFormatError(f"{source}: {len(unknown)} saved tensors match no module of this model (a different "
                                 f"base model?): {unknown[:4]}")
    if biases and plan.config.bias_mode == "none":
        raise AdapterFormatError(f"{source} holds base-model biases {sorted(biases)[:4]} but its config says bias="
                                 "'none' (no bias is saved); refusing to overwrite the model's frozen biases")
    return per_delta, per_saved, biases


def _sort_saved(model, path, rest, t, per_saved, biases) -> bool:
    """A modules_to_save tensor. PEFT with bias="all" also writes `<path>.modules_to_save.<k>` (the copy's
    tensor again) and `<path>.original_module.<k>` (the original's bias); load those as PEFT does. False for an
    `original_module` tensor that is not one of the original's biases (it would overwrite a frozen base weight)."""
    head, _, tail = rest.partition(".")
    if head == "modules_to_save":
        per_saved[path].setdefault(tail, t)
    elif head == "original_module":
        module = model.get_submodule(path)
        original = getattr(module, "original_module", module)
        param = dict(original.named_parameters()).get(tail)
        if param is None or not tail.endswith("bias"):
            return False
        biases[f"{path}.{rest}"] = (param, t)
    else:
        per_saved[path][rest] = t
    return True


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # what a saved float may be


def _check(source: Path, label: str, t: torch.Tensor, expected: torch.Tensor) -> None:
    """A saved tensor against the one it will be copied into: shape, a dtype that converts without losing
    meaning (floats for floats, exactly the same dtype otherwise), finite once cast to the model's dtype."""
    if tuple(t.shape) != tuple(expected.shape):
        raise ShapeMismatchError(f"{source}: {label}: saved shape {tuple(t.shape)} but this model needs "
                                 f"{tuple(expected.shape)} (a different base model, or r / rank_pattern changed?)")
    if expected.is_floating_point() != (t.dtype in FLOAT_DTYPES) or (
            not expected.is_floating_point() and t.dtype != expected.dtype):
        raise AdapterFormatError(f"{source}: {label} is saved as {str(t.dtype).replace('torch.', '')}, but the "
                                 f"model holds {str(expected.dtype).replace('torch.', '')} there")
    if expected.is_floating_point() and not torch.isfinite(t.to(expected.dtype)).all():
        raise AdapterFormatError(f"{source}: {label} holds NaN or inf values (in the model's "
                                 f"{str(expected.dtype).replace('torch.', '')})")


def _validate(model, plan, per_delta, per_saved, biases, source: Path) -> None:
    for path, delta in plan.deltas.items():
        missing = sorted(set(delta.peft_tensors()) - set(per_delta[path]))
        if missing:
            raise AdapterFormatError(f"{source} lacks {missing} for {path}")
        for suffix, expected in delta.peft_tensors().items():
            _check(source, f"{path}.{suffix}", per_delta[path][suffix], expected)
    for path, sd in per_saved.items():
        module = model.get_submodule(path)
        expected = getattr(module, "original_module", module).state_dict()  # not an existing SavedModule's copies
        if set(sd) != set(expected):
            raise AdapterFormatError(f"{source}: modules_to_save {path}: saved keys {sorted(sd)} but the module has "
                                     f"{sorted(expected)}")
        for key, t in sd.items():
            _check(source, f"{path}.{key}", t, expected[key])
    for key, (param, t) in biases.items():
        _check(source, key, t, param)


def sort_and_check(model: nn.Module, plan: AdapterPlan, tensors: dict[str, torch.Tensor], source: Path):
    """Assign every saved tensor to a planned delta, a modules_to_save copy or a base bias, and check each
    (dtype, shape, finite in the model's dtype); nothing in the model changes.

    Returns:
        (per_delta {path: {suffix: tensor}}, per_saved {path: state dict}, biases {key: (parameter, tensor)}).
    Raises:
        AdapterFormatError naming `source` (the weights file)."""
    per_delta, per_saved, biases = _sort_tensors(model, plan, tensors, source)
    _validate(model, plan, per_delta, per_saved, biases, source)
    return per_delta, per_saved, biases


@torch.no_grad()
def _check_effective_weights(model: nn.Module, plan: AdapterPlan, source: Path) -> None:
    """Every loaded delta's ΔW is finite in the base weight's dtype: finite factors whose product overflows
    (or overflows fp16/bf16) would give NaN outputs. The deltas are not in the model yet: a layer not yet
    adapted is viewed through a temporary AdaptedLayer that changes nothing."""
    for path, delta in plan.deltas.items():
        layer = adapted_layer_at(model, path, delta.ops) or AdaptedLayer(delta.ops.layer, delta.ops)
        dtype = layer.base_weight().dtype
        dtype = dtype if dtype in FLOAT_DTYPES else torch.float32  # a packed 4-bit base computes in its own
        if not torch.isfinite(delta.delta_weight(layer).to(dtype)).all():
            raise AdapterFormatError(f"{source}: the update for {path} is not finite in "
                                     f"{str(dtype).replace('torch.', '')} (its factors' product overflows, or its "
                                     "scale is not finite): it would give NaN or inf outputs")


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike], name: str = "default",
                 trainable: bool = False) -> nn.Module:
    """Load a PEFT or lorakit adapter directory into `model` as adapter `name` (inactive unless it is the
    model's first adapter, as in PEFT). trainable=False freezes it, like PEFT's is_trainable=False.
    Raises a LorakitError and leaves the model untouched if anything does not fit."""
    directory = atomic.readable(directory)  # the old copy, in the instant a fallback save swaps directories
    config = read_config(directory)
    tensors = read_tensors(directory)
    source = weights_file(directory)
    plan = plan_adapter(model, config, name)
    per_delta, per_saved, biases = sort_and_check(model, plan, tensors, source)
    for path, delta in plan.deltas.items():
        delta.load_peft_tensors(per_delta[path])
    _check_effective_weights(model, plan, source)
    attach(model, plan, fresh=False)
    keep_originals(model, name, [param for param, _ in biases.values()])
    with torch.no_grad():
        for path, sd in per_saved.items():
            model.get_submodule(path).copies[name].load_state_dict(sd)
        for param, t in biases.values():
            param.copy_(t)
    if not trainable:
        for delta in plan.deltas.values():
            delta.requires_grad_(False)
        for path in plan.saved:
            model.get_submodule(path).copies[name].requires_grad_(False)
    return model
