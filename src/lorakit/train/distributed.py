"""Training on several processes with torch.distributed: DDP, or FSDP2 (`fully_shard`) of the frozen base.

    torchrun --nproc-per-node 2 -m lorakit.cli train --data train.jsonl ...   # or: lorakit train --nproc 2 ...

A process started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK in its environment) joins the process group
(gloo on CPU, nccl on GPU) and trains one replica. The data split keeps the run a function of the options
alone, whatever the number of processes:

    every rank builds the SAME micro-batches (same seed, same order, same padding) and counts the step's
    labelled targets over all of their rows; rank r runs forward/backward on rows r::N only, with
        loss_r = (summed loss of its rows) / (targets of the step) * N
    DDP/FSDP average the gradients over the N ranks:  mean_r(grad loss_r) = grad(sum over all rows / targets),
    the 1-process gradient. So --batch-size is the GLOBAL micro-batch; each process takes batch_size / N rows.

`Distributed()` (world size 1) is the single-process case: every method is the identity, so the loop calls
them unconditionally. Only rank 0 prints, draws the progress bar and writes files; every rank runs the same
forwards (FSDP all-gathers inside each one) including evaluation.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..core import files
from ..core.api import active_adapters, training_hooks
from ..core.blocks import repeated_blocks
from ..core.patching import pack_parameters
from ..errors import ConfigError
from ..loading.models import pick_device
from .fields import given_fields

LAUNCH_FILE = "launch.json"  # the options a --nproc run hands to its torchrun workers


@dataclass
class Distributed:
    """This process's place in the run, and the wrapped model once `wrap_model` has run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    in_group: bool = False  # started by torchrun: in a process group (even of one process)
    strategy: str = "none"  # "ddp" | "fsdp" after wrap_model
    owns_group: bool = False  # we initialized the process group (so we destroy it)
    wrapped: Optional[nn.Module] = field(default=None, repr=False)  # DDP wrapper or the fully_shard'ed model

    @property
    def enabled(self) -> bool:
        """Whether this process is one of a torch.distributed run (collectives are real)."""
        return self.in_group

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    def shards_model(self, strategy: str) -> bool:
        """Whether `strategy` shards the model over this run's processes (FSDP under torchrun): the model is
        then loaded on the CPU and fully_shard moves each rank's shard to its device."""
        return self.enabled and strategy == "fsdp"

    # --- the loop's calls (identities on one process) ---------------------------------------------------
    def forward_model(self, model: nn.Module) -> nn.Module:
        """What training forwards go through: the DDP wrapper (it syncs gradients) or the model itself."""
        return self.wrapped if self.wrapped is not None else model

    def own_rows(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rows rank::world_size of a micro-batch (all tensors are [B, ...]). Right padding is kept as is:
        a row's outputs do not depend on the other rows of its batch, so the loss of each row is unchanged."""
        if self.world_size == 1:
            return batch
        return {k: v[self.rank::self.world_size] for k, v in batch.items()}

    def grad_sync(self, last: bool):
        """Context for one micro-batch's forward+backward: gradients are reduced across ranks only on the
        last micro-batch of a step (gradient accumulation without a reduction per micro-batch)."""
        if self.strategy == "ddp" and not last:
            return self.wrapped.no_sync()
        if self.strategy == "fsdp":
            self.wrapped.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def all_sum(self, *values: float) -> tuple[float, ...]:
        """Sums of per-rank numbers (the step's loss parts, tokens) over all ranks."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        tdist.all_reduce(t)
        return tuple(t.tolist())

    def gather_objects(self, obj: Any) -> list[Any]:
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects, e.g. RNG states)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing on one process)."""
        if self.enabled:
            tdist.barrier()

    def _collective_device(self) -> torch.device:
        nccl = tdist.get_backend() == "nccl"
        return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def close(self) -> None:
        """Leave the process group if this process created it."""
        if self.owns_group:
            tdist.destroy_process_group()
            self.owns_group = False


# --- setup --------------------------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """Whether torchrun started this process (its rank variables are set)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def setup(device_name: str = "auto") -> tuple[Distributed, torch.device]:
    """(this process's Distributed, its device). Joins the process group when torchrun started us; else the
    single-process Distributed() and the device the option names."""
    if not launched_by_torchrun():
        return Distributed(), pick_device(device_name)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(device_name)
    if device.type == "cuda":  # one GPU per process: the local rank's
        if local >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local} has no GPU: {torch.cuda.device_count()} visible; "
                              "start at most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not tdist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        tdist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Distributed(rank, world, local, in_group=True, owns_group=owns), device


def check_options(options, dist: Distributed) -> None:
    """Refuse options this run's processes cannot split (a global micro-batch smaller than the world)."""
    if options.batch_size < dist.world_size:
        raise ConfigError(f"--batch-size {options.batch_size} is the global micro-batch, split across "
                          f"{dist.world_size} processes: it must be at least {dist.world_size}")


def decorrelate_rng(dist: Distributed, seed: int) -> None:
    """Each rank's own dropout masks (rank 0 keeps the single-process stream). Call after the adapter's init,
    which must be the same on every rank."""
    if dist.rank > 0:
        torch.manual_seed(seed + 104_729 * dist.rank)


# --- wrapping -----------------------------------------------------------------------------------------
def wrap_model(model: nn.Module, dist: Distributed, strategy: str, device: torch.device, bf16: bool) -> nn.Module:
    """Wrap the adapted model for training on every rank; returns what training forwards go through.

    ddp: a replica per rank; only the adapter's gradients are all-reduced (frozen parameters have none).
    fsdp: FSDP2 shards every decoder layer, then the root (embeddings, head); parameters are all-gathered
    per layer in forward and resharded after it. With bf16 the frozen base is stored in bf16 (half the
    memory) and computed in bf16; the adapter keeps fp32 master weights and fp32 gradient reduction.
    """
    if not dist.enabled:
        return model
    if strategy == "fsdp":
        if training_hooks(model):
            raise ConfigError("--strategy fsdp does not support adapters with training hooks (their schedules "
                              "read whole parameters); use --strategy ddp")
        _fully_shard(model, dist, device, bf16)
        dist.wrapped = model
    elif strategy == "ddp":
        dist.wrapped = _ddp(model, device)
    else:
        raise ConfigError(f"unknown --strategy {strategy!r}: use ddp or fsdp")
    dist.strategy = strategy
    return dist.wrapped


def _ddp(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    # Every rank loaded the same base and seeded the same adapter init: sync only the trainable tensors
    # (init_sync=False skips broadcasting the whole frozen base from rank 0).
    for p in model.parameters():
        if p.requires_grad:
            tdist.broadcast(p.data, src=0)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, init_sync=False, gradient_as_bucket_view=True)


def _fully_shard(model: nn.Module, dist: Distributed, device: torch.device, bf16: bool) -> None:
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:
        raise ConfigError("--strategy fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from None
    pack_parameters(model)  # fully_shard takes contiguous parameters only (optimize(wide=True) widens some)
    if bf16:
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)  # the frozen base: all-gathered and stored in bf16
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    mesh = init_device_mesh(device.type, (dist.world_size,))
    blocks = list(repeated_blocks(model, no_split_classes=True))  # HF's unit of sharding, else the layers
    # Each block is resharded after its forward (the default): kept gathered, an evaluation forward with no
    # backward after it would leave a stale gathered copy for the next training step.
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embeddings, final norm, head
    _prefetch_neighbours(blocks)
    # transformers' generate() keeps sharded ranks in step (synced_gpus) when it sees this flag
    model._is_fsdp_managed_module = True


def _prefetch_neighbours(blocks: list[nn.Module]) -> None:
    """Each block's all-gather starts while its neighbour computes (the next one in forward, the previous one in
    backward). FSDP2 otherwise issues it when the host reaches the block: a fused LoRA step keeps the host only a
    little ahead of the device, so the gathers ran exposed (two H200s scaled 1.52× before)."""
    for i, block in enumerate(blocks):
        if i + 1 < len(blocks):
            block.set_modules_to_forward_prefetch([blocks[i + 1]])
        if i > 0:
            block.set_modules_to_backward_prefetch([blocks[i - 1]])


# --- gathering and saving -------------------------------------------------------------------------------
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor shard → the whole tensor (a collective: every rank must call it, in the same order)."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_adapter(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys, whole and on CPU, on every rank (collective under FSDP)."""
    return {k: full_tensor(v.detach()).to("cpu", copy=True).contiguous()
            for k, v in files.adapter_state_dict(model, name).items()}


def save_adapter(model: nn.Module, directory, dist: Distributed, name: Optional[str] = None) -> Path:
    """files.save_adapter for a sharded or replicated model: every rank gathers, rank 0 writes."""
    name = name or active_adapters(model)[0]
    if not dist.enabled:
        return files.save_adapter(model, directory, name=name)
    tensors = gather_adapter(model, name)
    if dist.is_main:
        files.write_adapter_files(directory, tensors, files.adapter_config_dict(model, name))
    dist.barrier()
    return Path(directory)


# --- checkpoint state -----------------------------------------------------------------------------------
def optimizer_names(model: nn.Module, optimizer) -> list[list[str]]:
    """The names of the optimizer's parameters, group by group in its own order (LoRA+ groups put every B after
    every A, so this is not named_parameters order)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def gather_train_state(model: nn.Module, optimizer, dist: Distributed) -> tuple[dict, dict]:
    """(adapter parameters by name, optimizer state keyed by parameter NAME) as whole CPU tensors: one format
    for any number of processes and any group order, so a checkpoint resumes on any number of processes.
    Collective; rank 0 gets the tensors, the other ranks ({}, {})."""
    if not dist.enabled:
        names = [n for group in optimizer_names(model, optimizer) for n in group]
        return ({n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad},
                _keyed_by_name(optimizer.state_dict(), names))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    # Parameter by parameter, not get_state_dict(ignore_frozen_params=True): that one walks the whole model's
    # state_dict, where lorakit shows base weights under their original keys (q_proj.weight).
    params = {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                cpu_offload=True))
    if not dist.is_main:
        return {}, {}
    return params, optim  # torch keys the full state dict by parameter name already


def load_train_state(model: nn.Module, optimizer, params: dict, optim_state: dict, dist: Distributed) -> None:
    """Inverse of gather_train_state on every rank (each has read the whole checkpoint): shards it under FSDP.
    `optim_state` is keyed by parameter name; its groups must list the optimizer's own names."""
    if not dist.enabled:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(params[n])
        names = [n for group in optimizer_names(model, optimizer) for n in group]
        optimizer.load_state_dict(_keyed_by_index(optim_state, names))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    from torch.distributed.tensor import DTensor, distribute_tensor

    # Parameter by parameter (set_state_dict would also reload the frozen base): a DTensor takes its shard.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                whole = params[n].to(p.device, p.dtype)
                p.copy_(distribute_tensor(whole, p.device_mesh, p.placements) if isinstance(p, DTensor) else whole)
    set_optimizer_state_dict(model, optimizer, optim_state, options=StateDictOptions(full_state_dict=True))


def _keyed_by_index(optim: dict, names: list[str]) -> dict:
    """Name-keyed optimizer state → torch's index-keyed form for an optimizer whose parameters are `names`."""
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in optim["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in optim["param_groups"]]}


def _keyed_by_name(optim: dict, names: list[str]) -> dict:
    """torch's index-keyed optimizer state (indices in `names` order) → keyed by parameter name."""
    return {"state": {names[i]: s for i, s in optim["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in optim["param_groups"]]}


def own_rng_state(state: dict, dist: Distributed) -> dict:
    """This rank's RNG state from a checkpoint: its own when the world size matches, else rank 0's."""
    per_rank = state.get("rng_ranks")
    if per_rank and len(per_rank) == dist.world_size:
        return per_rank[dist.rank]
    return state["rng"]


# --- --nproc: relaunch under torchrun ---------------------------------------------------------------------
def launch_command(config_file: Path, nproc: int) -> list[str]:
    """The torchrun command line that runs `lorakit train --config config_file` on `nproc` processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorakit.cli", "train", "--config", str(config_file)]


def launch(options, out_dir: Path, log=print) -> int:
    """Run `lorakit train` with these options on `options.nproc` local processes (torchrun); returns its exit
    code. The options go through a config file in the output directory (all set fields, less --nproc)."""
    gpus = torch.cuda.device_count()
    if pick_device(options.device).type == "cuda" and gpus < options.nproc:
        raise ConfigError(f"--nproc {options.nproc} runs one process per GPU but {gpus} are visible "
                          "(use --device cpu for processes on the CPU)")
    settings = {k: v for k, v in given_fields(options).items() if k != "nproc"}
    out_dir.mkdir(parents=True, exist_ok=True)
    config = out_dir / LAUNCH_FILE
    config.write_text(json.dumps(settings, indent=2) + "\n")
    command = launch_command(config, options.nproc)
    log("launching: " + " ".join(command))
    return subprocess.run(command).returncode
