"""Writing an adapter directory (PEFT's adapter_config.json + adapter_model.safetensors), whole: by a directory swap
where that loses nothing, else file by file in an order a reader can never misread (see write_adapter_files)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Union

import safetensors.torch
import torch

from ..errors import OutputPathError
from . import atomic

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
# What lorakit itself writes into an adapter directory; subfolders holding only these are other adapters' (the
# layout save_pretrained writes for several adapters).
OWN_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, PICKLE_NAME, "README.md"})


def write_adapter_files(directory: Union[str, os.PathLike], tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write PEFT's two files from CPU tensors (PEFT keys) and the config dict (e.g. gathered from a sharded model).
    An old adapter_model.bin is dropped (it would contradict the new weights); every other file is kept.

    Two ways, chosen per save:

    * a whole-directory swap (core/atomic.py: a reader sees the old directory or the new one) when `directory`
      does not exist yet or holds nothing but what lorakit writes (OWN_FILES, other adapters' subfolders);
    * in place, file by file, when it holds anything else (a Trainer checkpoint whose other ranks write into it
      meanwhile), is the working directory (or holds it), is a mount point, or its parent is not writable:
      the old adapter_config.json is removed first, then the weights and then the config are each written whole
      (atomic.write_file). A reader sees the old adapter whole, no adapter (no config: a clean
      AdapterFormatError), or the new one whole.

    Raises:
        OutputPathError: naming `directory`, for a file in the way or any error of the filesystem."""
    out = Path(directory)
    try:
        if _swap_allowed(out):
            # not carried: an old pickle, and the per-file temp files that an interrupted save of older lorakits left
            litter = [p.name for p in out.glob(".adapter_*.tmp")] if out.is_dir() else []
            with atomic.atomic_dir(out, carry=True, drop=(PICKLE_NAME, *litter)) as tmp:
                write_adapter_into(tmp, tensors, config)
        else:
            _write_in_place(out, tensors, config)
    except OutputPathError:
        raise
    except OSError as e:
        raise OutputPathError(f"cannot save the adapter into {out}: {e}") from e
    return out


def _swap_allowed(out: Path) -> bool:
    """Whether replacing the whole directory `out` loses nothing and breaks nothing (see write_adapter_files)."""
    if not os.path.lexists(out):
        return True
    real = Path(os.path.realpath(out))
    if not real.is_dir():
        return True  # atomic_dir refuses it with OutputPathError
    cwd = Path(os.getcwd())
    if real == cwd or real in cwd.parents or os.path.ismount(real):
        return False
    if not os.access(real.parent, os.W_OK | os.X_OK):
        return False
    return _only_own_files(real, nested=True)


def _only_own_files(d: Path, nested: bool) -> bool:
    for entry in d.iterdir():
        if entry.is_symlink():
            return False
        if entry.name in OWN_FILES and entry.is_file():
            continue
        if atomic.is_temp_name(entry.name) or (entry.name.startswith(".adapter_") and entry.name.endswith(".tmp")):
            continue  # a killed save's leftovers
        if nested and entry.is_dir() and _only_own_files(entry, nested=False):
            continue
        return False
    return True


def _write_in_place(out: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """PEFT's files written into the existing directory `out`, each whole, config removed first and written last."""
    atomic.check_parents(out / CONFIG_NAME)
    for litter in out.glob(".adapter_*.tmp"):
        litter.unlink(missing_ok=True)
    (out / CONFIG_NAME).unlink(missing_ok=True)  # from here until the last step a reader finds no adapter
    atomic.fsync_dir(out)
    (out / PICKLE_NAME).unlink(missing_ok=True)
    atomic.write_file(out / WEIGHTS_NAME, lambda tmp: _write_weights(tmp, tensors))
    atomic.write_text(out / CONFIG_NAME, _config_text(config))


def write_adapter_into(directory: Path, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """PEFT's two files written straight into `directory` (a temp directory that is swapped in as a whole)."""
    _write_weights(directory / WEIGHTS_NAME, tensors)
    (directory / CONFIG_NAME).write_text(_config_text(config))


def _file_mode() -> int:
    """0o666 less the process umask, read once: toggling os.umask during a save would race other threads."""
    try:
        with open("/proc/self/status") as f:
            return 0o666 & ~int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)  # once, at import; no portable way to read it otherwise
        os.umask(umask)
        return 0o666 & ~umask


_FILE_MODE = _file_mode()


def _write_weights(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    os.chmod(path, _FILE_MODE)  # safetensors creates 0600; give it ordinary permissions


def _config_text(config: dict) -> str:
    return json.dumps(config, indent=2, sort_keys=True) + "\n"
