"""Trainer checkpoints of an adapted HF model are adapter-only (model.save_pretrained writes the adapter); this
module makes transformers' Trainer read them back. transformers only reloads adapter-only checkpoints for a
`PeftModel`: for any other model, resume_from_checkpoint looks for a full or sharded model and fails, and
load_best_model_at_end looks for pytorch_model.bin. Trainer's two loaders are wrapped once (a class-level patch of
transformers.Trainer, made when it is imported, or at once if it already is): for a model with lorakit adapters
and a checkpoint that holds adapter files and no model weights they restore the adapters in place (same Parameters,
so the optimizer state loaded next still lines up); everything else goes to transformers' own code.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
from pathlib import Path

import torch

from ... import errors
from .. import api, files

_MODULE = "transformers.trainer"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                 "pytorch_model.bin.index.json")


def ensure_trainer_patched() -> None:
    """Wrap Trainer's checkpoint loaders now if transformers.trainer is imported, else as soon as it is."""
    module = sys.modules.get(_MODULE)
    if module is not None and hasattr(module, "Trainer"):
        _patch(module.Trainer)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds transformers.trainer through the other finders and patches Trainer right after the module runs."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODULE:
            return None
        sys.meta_path.remove(self)  # once; also keeps the lookup below from finding this finder again
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                run = spec.loader.exec_module

                def exec_and_patch(module, run=run):
                    run(module)
                    _patch(module.Trainer)

                spec.loader.exec_module = exec_and_patch
                return spec
        return None


def _patch(trainer_cls) -> None:
    if getattr(trainer_cls, "_lorakit_patched", False):
        return
    resume, best = trainer_cls._load_from_checkpoint, trainer_cls._load_best_model

    @functools.wraps(resume)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        target = _adapted(self, model if model is not None else self.model)
        if target is None or not is_adapter_checkpoint(resume_from_checkpoint):
            return resume(self, resume_from_checkpoint, model)
        restore_adapters(target, resume_from_checkpoint)

    @functools.wraps(best)
    def _load_best_model(self):
        target = _adapted(self, self.model)
        if target is None or not is_adapter_checkpoint(self.state.best_model_checkpoint):
            return best(self)
        restore_adapters(target, self.state.best_model_checkpoint)

    trainer_cls._load_from_checkpoint = _load_from_checkpoint
    trainer_cls._load_best_model = _load_best_model
    trainer_cls._lorakit_patched = True


def _adapted(trainer, model):
    """The model under the trainer's wrappers if it holds lorakit adapters, else None."""
    unwrapped = trainer.accelerator.unwrap_model(model) if getattr(trainer, "accelerator", None) else model
    return unwrapped if api.list_adapters(unwrapped) else None


def is_adapter_checkpoint(directory) -> bool:
    """An adapter file in the directory and no model weights (what an adapted model's save_pretrained writes)."""
    d = Path(directory)
    return (d / files.WEIGHTS_NAME).is_file() and not any((d / f).exists() for f in _WEIGHT_FILES)


def restore_adapters(model, directory) -> None:
    """Copy a checkpoint's adapters into the model's existing ones, in place: the root directory's into the active
    adapter (else the first), `directory/<name>`'s into adapter `name` (what save_pretrained wrote). Every file is
    read and checked (keys, shapes, finite values) before any tensor is copied. Raises CheckpointError."""
    names = api.list_adapters(model)
    root = next(iter(api.active_adapters(model) or names))
    sources = [(Path(directory), root)] + [(Path(directory) / n, n) for n in names
                                           if n != root and (Path(directory) / n / files.WEIGHTS_NAME).is_file()]
    pairs = [pair for d, name in sources for pair in _matched(model, name, d)]
    with torch.no_grad():
        for live, saved in pairs:
            live.copy_(saved)


def _matched(model, name: str, directory: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(live tensor, saved tensor) for every tensor of adapter `name`, checked against the file in `directory`."""
    try:
        saved = files.read_tensors(directory)
    except errors.AdapterFormatError as e:
        raise errors.CheckpointError(f"checkpoint {directory}: {e}") from None
    live = files.adapter_state_dict(model, name)
    storages = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    if set(saved) != set(live):
        raise errors.CheckpointError(
            f"checkpoint {directory} does not hold adapter {name!r} of this model: missing "
            f"{sorted(set(live) - set(saved))[:4]}, unexpected {sorted(set(saved) - set(live))[:4]}")
    for key, t in live.items():
        if tuple(saved[key].shape) != tuple(t.shape):
            raise errors.CheckpointError(f"checkpoint {directory}: {key} has shape {tuple(saved[key].shape)}, "
                                         f"adapter {name!r} needs {tuple(t.shape)}")
        if saved[key].is_floating_point() and not torch.isfinite(saved[key]).all():
            raise errors.CheckpointError(f"checkpoint {directory}: {key} holds NaN or inf values")
        if t.data_ptr() not in storages:  # a tensor built at save time (pruned ranks left out), not a parameter
            raise errors.CheckpointError(f"adapter {name!r}: {key} is not stored as saved (pruned ranks?); "
                                         "it cannot be restored in place")
    return [(t, saved[key].to(t.device, t.dtype)) for key, t in live.items()]
