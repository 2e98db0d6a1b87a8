"""Training checkpoints: tensors in safetensors, everything else in JSON; never a pickle.

    out_dir/checkpoints/step-0000008/
        adapter/                      the adapter at that step (a PEFT directory, usable on its own)
        trainer_state.json            plain data: step, schedule, history, optimizer groups, RNG states, the
                                      run's options; every tensor in it is a reference {"__tensor__": "t12"}
        trainer_state.safetensors     the tensors: trainable parameters, optimizer moments, RNG byte states

A checkpoint directory is written whole (core/atomic.py), so one under its final name is complete; the two
newest are kept. Reading it never runs code: JSON and safetensors hold data only, and every value is checked
against the run (names, shapes, finiteness) before anything is loaded; a damaged or foreign checkpoint is a
CheckpointError naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Any, Optional

import safetensors.torch
import torch

from ..core import atomic, files, writing
from ..core.api import active_adapters
from ..errors import CheckpointError, ConfigError
from .distributed import (Distributed, gather_adapter, gather_train_state, load_train_state, optimizer_names,
                          own_rng_state)

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_STATE = "trainer_state.pt"  # pickled by lorakit before this format; never read
FORMAT = "lorakit-checkpoint/1"

# Options that may differ on --resume: where files go (and whether an earlier run's may be replaced), what is printed or evaluated, on which device and how
# many processes. Every other option changes the run's math (data, model, adapter, optimizer, schedule), so a
# resumed run that changed it would silently train on the checkpoint's values: it is refused instead.
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "resume", "overwrite", "quiet", "device", "nproc", "strategy", "gradient_checkpointing", "checkpoint",
    "cuda_graphs", "eval_every",
    "eval_examples", "checkpoint_every", "log_every", "max_new_tokens", "score", "samples"})
# Automatic values the run resolves once the model is loaded (runs record the resolved ones): an automatic value
# on either side matches, and the run checks again with its resolved values before training.
RESOLVED_LATER = {"packing": None, "pack_tokens": 0}


# --- plain data <-> JSON + tensors --------------------------------------------------------------------------
def to_plain(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able copy of nested dicts/lists/tuples/numbers/strings whose tensors (and numpy arrays) are moved
    into `tensors` and replaced by references. Anything else is a TypeError (a checkpoint holds data only)."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if type(obj).__module__ == "numpy" and hasattr(obj, "dtype") and hasattr(obj, "shape"):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.astype("float64" if obj.dtype.kind == "f" else "int64"))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_plain(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [to_plain(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: to_plain(v, tensors) for k, v in obj.items()}
        return {"__items__": [[to_plain(k, tensors), to_plain(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"a checkpoint holds plain data and tensors, not {type(obj).__name__}")


def from_plain(obj: Any, tensors: dict[str, torch.Tensor], source: Path) -> Any:
    """Inverse of to_plain. A reference to a tensor the file lacks is a CheckpointError."""
    if isinstance(obj, list):
        return [from_plain(v, tensors, source) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj or "__ndarray__" in obj:
        key = obj.get("__tensor__", obj.get("__ndarray__"))
        if key not in tensors:
            raise CheckpointError(f"{source} refers to tensor {key!r}, which {source.with_name(STATE_TENSORS)} lacks")
        if "__tensor__" in obj:
            return tensors[key]
        return tensors[key].numpy().astype(obj["dtype"])
    if "__tuple__" in obj:
        return tuple(from_plain(v, tensors, source) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(from_plain(k, tensors, source)): from_plain(v, tensors, source) for k, v in obj["__items__"]}
    return {k: from_plain(v, tensors, source) for k, v in obj.items()}


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# --- RNG --------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The whole process's generators (torch, python, numpy, every GPU): what a resumed run continues from."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ------------------------------------------------------------------------------------------------
def save_checkpoint(out_dir: Path, step: int, model, optimizer, scheduler, history, hooks, options=None,
                    keep: int = 2, dist: Distributed = Distributed(), progress: Optional[dict] = None) -> Path:
    """Write out_dir/checkpoints/step-NNNNNNN as a whole, then drop all but the `keep` newest. Collective under
    torch.distributed: the tensors are gathered whole (any world size can resume) and rank 0 writes them with
    every rank's RNG state. `progress`: the loop's running counts ({"tokens", "slots", "recent"}), so a resumed
    run's metrics cover the whole run."""
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step:07d}"
    params, optim = gather_train_state(model, optimizer, dist)
    rng = dist.gather_objects(rng_state())
    name = active_adapters(model)[0]
    adapter = gather_adapter(model, name)  # collective under FSDP
    if dist.is_main:
        state = {"format": FORMAT, "step": step, "params": params, "optimizer": optim,
                 "scheduler": scheduler.state_dict(), "rng_ranks": rng, "history": history,
                 "hooks": [h.state_dict() for h in hooks if hasattr(h, "state_dict")], "progress": progress or {},
                 "options": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else None}
        tensors: dict[str, torch.Tensor] = {}
        plain = to_plain(state, tensors)
        with atomic.atomic_dir(final) as tmp:
            (tmp / "adapter").mkdir()
            writing.write_adapter_into(tmp / "adapter", adapter, files.adapter_config_dict(model, name))
            safetensors.torch.save_file(tensors, tmp / STATE_TENSORS)
            (tmp / STATE_JSON).write_text(json.dumps(plain) + "\n")
        for old in sorted(root.glob("step-*"))[:-keep]:
            atomic.remove_dir(old)
    dist.barrier()
    return final


# --- reading ------------------------------------------------------------------------------------------------
def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The newest checkpoint directory under `out_dir` (complete: they are written whole), or None."""
    found = [p for p in sorted((Path(out_dir) / CHECKPOINTS).glob("step-*")) if p.is_dir()]
    return found[-1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's state (plain data with its tensors in place). CheckpointError naming the file for a
    missing, truncated, garbage or pickled (older lorakit) state."""
    source, tensor_file = path / STATE_JSON, path / STATE_TENSORS
    if not source.is_file():
        old = " (written by an older lorakit as a pickle, which is never loaded: start the run again)"
        raise CheckpointError(f"{source} is missing{old if (path / LEGACY_STATE).exists() else ''}")
    try:
        plain = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{source} is truncated or not JSON: {e}") from None
    if not isinstance(plain, dict) or plain.get("format") != FORMAT:
        raise CheckpointError(f"{source} is not a lorakit checkpoint state ({FORMAT})")
    try:
        tensors = safetensors.torch.load_file(tensor_file)
    except Exception as e:  # safetensors raises its own SafetensorError, and OSError for a missing file
        raise CheckpointError(f"{tensor_file} is missing, truncated or corrupt: {e}") from None
    try:
        return from_plain(plain, tensors, source)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:  # valid JSON, broken references
        raise CheckpointError(f"{source} is damaged (a malformed tensor, array or item reference): "
                              f"{type(e).__name__}: {e}") from None


def check_fits(state: dict[str, Any], path: Path, named: dict[str, torch.Tensor]) -> None:
    """CheckpointError unless the saved parameters and optimizer moments have exactly the run's trainable names
    and shapes, and are finite. `named`: the run's trainable parameters by name."""
    source = path / STATE_JSON
    params = state.get("params")
    if not isinstance(params, dict) or not all(isinstance(v, torch.Tensor) for v in params.values()):
        raise CheckpointError(f"{source} has no trainable parameters")
    if set(params) != set(named):
        extra, missing = sorted(set(params) - set(named)), sorted(set(named) - set(params))
        raise CheckpointError(f"{source} does not fit this model/adapter (other target modules or adapter?): "
                              f"saved but not trained now {extra[:3]}, trained now but not saved {missing[:3]}")
    for n, p in named.items():
        if tuple(params[n].shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: {n} was saved with shape {tuple(params[n].shape)} but this run's is "
                                  f"{tuple(p.shape)} (was r or another adapter option changed?)")
        if params[n].is_floating_point() and not torch.isfinite(params[n]).all():
            raise CheckpointError(f"{source}: {n} holds NaN or inf values")
    _check_optimizer(state.get("optimizer"), source, named)
    for key in ("step", "scheduler", "rng_ranks", "history", "hooks"):
        if key not in state:
            raise CheckpointError(f"{source} lacks {key!r}")
    step, history, ranks = state["step"], state["history"], state["rng_ranks"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{source}: step is {step!r}, not a count of steps")
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{source}: history is not a list of records")
    if not isinstance(ranks, list) or not ranks or not all(isinstance(r, dict) for r in ranks):
        raise CheckpointError(f"{source}: rng_ranks is not a non-empty list of RNG states")
    if not isinstance(state["scheduler"], dict) or not isinstance(state["hooks"], list):
        raise CheckpointError(f"{source}: the scheduler or hook states are not what lorakit writes")
    _check_progress(state.get("progress", {}), source)


def _check_progress(progress: Any, source: Path) -> None:
    """The loop's running counts: {"tokens": int, "slots": int, "recent": [losses]} (absent keys: none yet)."""
    if not isinstance(progress, dict):
        raise CheckpointError(f"{source}: progress is not a record of the loop's counts")
    for key in ("tokens", "slots"):
        value = progress.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"{source}: progress {key} is {value!r}, not a count")
    recent = progress.get("recent", [])
    if not isinstance(recent, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in recent):
        raise CheckpointError(f"{source}: progress recent is not a list of losses")


def _check_optimizer(optim: Any, source: Path, named: dict[str, torch.Tensor]) -> None:
    """The optimizer state is keyed by trainable parameter name, and each moment has its parameter's shape."""
    if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict) \
            or not isinstance(optim.get("param_groups"), list):
        raise CheckpointError(f"{source} has no optimizer state")
    for name, moments in optim["state"].items():
        if name not in named or not isinstance(moments, dict):
            raise CheckpointError(f"{source}: optimizer state {name!r} belongs to no trainable parameter")
        for key, t in moments.items():
            if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(named[name].shape):
                raise CheckpointError(f"{source}: optimizer {key} of {name} has shape {tuple(t.shape)}, "
                                      f"the parameter {tuple(named[name].shape)}")


def load_checkpoint(path: Path, model, optimizer, scheduler, hooks,
                    dist: Distributed = Distributed()) -> tuple[int, list, dict]:
    """Every rank reads the whole checkpoint (written by any number of processes) and takes its part.
    Everything is checked before anything is loaded. Returns (step, history, the loop's progress counts)."""
    source = path / STATE_JSON
    state = read_state(path)
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_fits(state, path, named)
    saved_groups = [g.get("params") if isinstance(g, dict) else None for g in state["optimizer"]["param_groups"]]
    if saved_groups != optimizer_names(model, optimizer):
        raise CheckpointError(f"{source}: its optimizer groups hold other parameters than this run's "
                              "(was --loraplus-lr-ratio or the adapter changed?)")
    stateful = [h for h in hooks if hasattr(h, "load_state_dict")]
    if len(state["hooks"]) != len(stateful):
        raise CheckpointError(f"{source} holds {len(state['hooks'])} training-hook states, this run has "
                              f"{len(stateful)}")
    state["rng"] = state["rng_ranks"][0]
    try:
        load_train_state(model, optimizer, state["params"], state["optimizer"], dist)
        scheduler.load_state_dict(state["scheduler"])
        for hook, hook_state in zip(stateful, state["hooks"]):
            hook.load_state_dict(hook_state)
        set_rng_state(own_rng_state(state, dist))
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{source} does not fit this run: {e}") from None
    return state["step"], list(state["history"]), dict(state.get("progress", {}))


def check_resume_options(out_dir: Path, options) -> Path:
    """Before a resumed run writes options.json: the newest checkpoint, and a CheckpointError naming every
    option that differs from the checkpoint's run and changes the math (see RESUME_MAY_CHANGE)."""
    path = latest_checkpoint(out_dir)
    if path is None:
        raise ConfigError(f"--resume: no checkpoint in {Path(out_dir) / CHECKPOINTS}")
    saved = read_state(path).get("options")
    if not isinstance(saved, dict):
        return path
    now = dataclasses.asdict(options)
    changed = [f"--{k.replace('_', '-')} {now[k]!r} (the checkpoint's run: {saved[k]!r})"
               for k in now if k in saved and k not in RESUME_MAY_CHANGE and _differs(saved[k], now[k])
               and not (k in RESOLVED_LATER and RESOLVED_LATER[k] in (now[k], saved[k]))]
    if changed:
        raise CheckpointError(f"--resume from {path / STATE_JSON}: options that change the training differ from "
                              f"the run that wrote it: {'; '.join(changed)}. Resume with the same values, or "
                              "start a new --output-dir")
    return path


def _differs(saved: Any, now: Any) -> bool:
    # JSON gave lists for tuples and floats for whole numbers; compare as JSON sees them
    return json.loads(json.dumps(saved)) != json.loads(json.dumps(now))
