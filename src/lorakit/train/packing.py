"""Packed micro-batches: whole rows placed into fixed-token-budget micro-batches, no padding between them.

    rows (any lengths) ──best-fit decreasing──► bins of ≤ budget tokens (computed once, rows never split)
    micro-batch i ──► bin order[i] of its epoch (the bins shuffled per epoch, as MicroBatches shuffles rows)

A packed micro-batch is [P, L]: P parts (one per process of the run, 1 on one process), each the rows of
its part laid end to end and right-padded to L (= the budget on one process: a fixed shape). Every row keeps
its own positions (0, 1, ...) and its own document id; the padding tail is one more document (id -1) whose
labels are all IGNORE. A row's first label is set to IGNORE: in an unpacked batch the first token is never
a target either, and here it would otherwise be predicted from the previous row's last token.

Keys: input_ids, labels, position_ids, document_ids (all [P, L]); how the model is told where rows start is
packed_attention.py's business. The loss is the same token sum over the same targets as unpacked training
(loop.py divides by the step's targets), so only the grouping of rows into steps differs.
"""

from __future__ import annotations

import bisect
import math
from typing import Optional

import torch

from ..errors import ConfigError
from ..loading.rows import IGNORE, Example
from .batches import CUDA_PAD_MULTIPLE, MicroBatches, epoch_order
from .packed_attention import choose_path, use_varlen_attention

ROUND_TO = 64  # automatic budgets are a multiple of this (friendly shapes for the GPU kernels)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins whose sums are ≤ capacity: longest first, each into the bin
    with the least room that still fits it (a new bin when none does). Deterministic (ties by index).

    Returns:
        The bins, in the order they were opened; each lists its indices in the order they were placed.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ConfigError(f"row {too_long[0]} has {lengths[too_long[0]]} tokens, more than the packing budget "
                          f"of {capacity}: raise --pack-tokens (rows are never split)")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, bin index)
    for i in order:
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at == len(room):
            bins.append([i])
            free, b = capacity - lengths[i], len(bins) - 1
        else:
            free, b = room.pop(at)
            bins[b].append(i)
            free -= lengths[i]
        bisect.insort(room, (free, b))
    return bins


def auto_budget(examples: list[Example], batch_size: int) -> int:
    """The default token budget of a micro-batch: `batch_size` rows of the mean length (so an epoch has about
    as many steps as unpacked), rounded up to a multiple of 64, and never below the longest row."""
    lengths = [len(e.input_ids) for e in examples]
    mean = sum(lengths) / max(1, len(lengths))
    budget = ROUND_TO * math.ceil(batch_size * mean / ROUND_TO)
    return max(budget, max(lengths, default=1))


def _split_parts(examples: list[Example], parts: int) -> list[list[Example]]:
    """Longest first onto the least loaded part: every process gets about the same number of tokens."""
    if parts == 1:
        return [examples]
    groups: list[list[Example]] = [[] for _ in range(parts)]
    loads = [0] * parts
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        k = loads.index(min(loads))
        groups[k].append(e)
        loads[k] += len(e.input_ids)
    return groups


def collate_packed(examples: list[Example], pad_id: int, budget: int, parts: int = 1) -> dict[str, torch.Tensor]:
    """The rows of one bin as a packed micro-batch (see the module docstring).

    Args:
        examples: the bin's rows (their total length ≤ budget).
        pad_id: token id of the padding tail.
        budget: the bin's token budget; with parts = 1 it is the length L.
        parts: how many processes share the micro-batch (rank r trains on part r).

    Returns:
        input_ids, labels, position_ids, document_ids, each [parts, L].
    """
    groups = _split_parts(examples, parts)
    longest = max(sum(len(e.input_ids) for e in g) for g in groups)
    length = budget if parts == 1 else 8 * math.ceil(max(longest, math.ceil(budget / parts)) / 8)
    ids = torch.full((parts, length), pad_id, dtype=torch.long)
    labels = torch.full((parts, length), IGNORE, dtype=torch.long)
    positions = torch.zeros((parts, length), dtype=torch.long)
    documents = torch.full((parts, length), -1, dtype=torch.long)
    for p, group in enumerate(groups):
        at = 0
        for doc, e in enumerate(group):
            n = len(e.input_ids)
            ids[p, at:at + n] = torch.tensor(e.input_ids)
            labels[p, at:at + n] = torch.tensor(e.labels)
            labels[p, at] = IGNORE  # predicted by the previous row's last token: never a target
            positions[p, at:at + n] = torch.arange(n)
            documents[p, at:at + n] = doc
            at += n
        positions[p, at:] = torch.arange(length - at)  # the padding tail: a document of its own
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "document_ids": documents}


class PackedBatches:
    """The i-th packed micro-batch of training, for any i (the MicroBatches interface: `per_epoch`, [i]).

    Args:
        examples: the training Examples (causal).
        budget: tokens per micro-batch (all processes together).
        seed: seed of the per-epoch order of the bins.
        pad_id: token id of the padding tail.
        parts: processes that share each micro-batch.
    """

    packed = True

    def __init__(self, examples: list[Example], budget: int, seed: int, pad_id: int, parts: int = 1):
        if not examples:
            raise ConfigError("no training examples")
        self.examples, self.budget, self.seed, self.pad_id, self.parts = examples, budget, seed, pad_id, parts
        self.bins = best_fit_decreasing([len(e.input_ids) for e in examples], budget)
        self.per_epoch = len(self.bins)
        self._order: tuple[int, list[int]] = (-1, [])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(i, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.per_epoch, self.seed, epoch))
        rows = [self.examples[j] for j in self.bins[self._order[1][pos]]]
        return collate_packed(rows, self.pad_id, self.budget, self.parts)

    def padding_fraction(self) -> float:
        """Share of the computed token slots of one epoch that are padding."""
        real = sum(len(e.input_ids) for e in self.examples)
        return 1.0 - real / (self.per_epoch * self.budget)


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of a micro-batch that are data (not padding), packed or padded."""
    if "document_ids" in batch:
        return int((batch["document_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def padded_fraction(examples: list[Example], batch_size: int) -> float:
    """Share of padding when `examples` are right-padded `batch_size` rows at a time in this order."""
    slots = real = 0
    for start in range(0, len(examples) - batch_size + 1, batch_size):
        lengths = [len(e.input_ids) for e in examples[start:start + batch_size]]
        slots += max(lengths) * len(lengths)
        real += sum(lengths)
    return 1.0 - real / max(1, slots)


# --- what a run trains on -----------------------------------------------------------------------------------
def packing_by_default(model) -> bool:
    """Whether a causal model packs by default: only where torch's varlen attention keeps packed rows apart (the
    "varlen" path, CUDA, checked by packed_attention's probe). Elsewhere transformers separates packed rows with a
    [T, T] mask over the whole pack, whose cost grows with the square of the budget: on CPU the built-in task
    (SmolLM2-135M, 320 rows, 768-token packs) trained at 111 real tokens/s packed against about 230 padded."""
    try:
        return choose_path(model) == "varlen"
    except (ConfigError, AttributeError):
        return False


def check_packing_options(options) -> None:
    """ConfigError for packing options that cannot run (checked before the model loads)."""
    if options.pack_tokens < 0:
        raise ConfigError(f"--pack-tokens must be >= 0 (0: automatic), got {options.pack_tokens}")
    if options.task != "causal" and options.packing:
        raise ConfigError("--packing is for --task causal: a classifier reads one row per sequence")


def training_batches(options, examples: list[Example], pad_id: int, model, parts: int, device: torch.device,
                     log=print, compute_dtype: Optional[torch.dtype] = None):
    """The run's micro-batches: PackedBatches when packing is on (asked, or by default where it is exact),
    else MicroBatches of `options.batch_size` right-padded rows.

    Args:
        options: the run's TrainOptions (task, packing, pack_tokens, batch_size, seed).
        examples: the training Examples.
        pad_id: the tokenizer's padding id.
        model: the loaded model (its packed-attention path is chosen here, once).
        parts: processes of the run (each micro-batch is split into that many parts).
        device: where the model trains (CUDA: torch's varlen attention where it is exact).
        log: where the one summary line goes.
        compute_dtype: the autocast dtype the run trains in (None: off), for the varlen attention's probe.
    """
    check_packing_options(options)
    packing = options.packing if options.task == "causal" else False
    if packing is not False and device.type == "cuda":
        use_varlen_attention(model, compute_dtype)
    if packing is None:
        packing = packing_by_default(model)
    elif packing:
        choose_path(model)  # ConfigError when no path keeps the rows apart
    if not packing:
        return MicroBatches(examples, options.batch_size, options.seed, pad_id=pad_id, task=options.task,
                            pad_multiple=CUDA_PAD_MULTIPLE if device.type == "cuda" else 1)
    budget = options.pack_tokens or auto_budget(examples, options.batch_size)
    batches = PackedBatches(examples, budget, options.seed, pad_id, parts)
    log(f"packing: {len(examples)} rows into {batches.per_epoch} micro-batches of {budget} tokens "
        f"({100 * batches.padding_fraction():.1f}% padding; attention: {choose_path(model)})")
    return batches
