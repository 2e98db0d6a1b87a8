"""Batching tokenized Examples: the shuffled micro-batches of training and the ordered batches of evaluation."""

from __future__ import annotations

from typing import Iterator

import torch

from ..errors import ConfigError
from ..loading.rows import IGNORE, Example


# Padded training batches on CUDA round their length up to a multiple of 64. Every new [B, T] makes cuDNN's
# attention build a new execution plan on the host (measured on an H200, Llama-3.2-1B shape, 8-row micro-batches
# of alpaca rows: 4.5 ms of CPU per attention call, a quarter of the step); rounding caps the distinct lengths
# at T_max / 64, at the price of up to 63 padding tokens a row.
CUDA_PAD_MULTIPLE = 64


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A permutation that depends only on (seed, epoch): a resumed run sees the same batches."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


class MicroBatches:
    """The i-th micro-batch of training, for any i: epoch = i // per_epoch, shuffled per epoch.

    Args:
        examples: the training Examples.
        batch_size: Examples per micro-batch (the last partial batch of an epoch is dropped).
        seed: seed of the per-epoch order.
        pad_id: token id of the right padding.
        task: 'causal' (labels per token) or 'classify' (one label per row).
        pad_multiple: pad each micro-batch's length up to a multiple of this (see CUDA_PAD_MULTIPLE).
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, pad_id: int, task: str,
                 pad_multiple: int = 1):
        if not examples:
            raise ConfigError("no training examples")
        self.examples, self.batch_size, self.seed, self.pad_id, self.task = examples, batch_size, seed, pad_id, task
        self.pad_multiple = pad_multiple
        self.per_epoch = max(1, len(examples) // batch_size)  # drop the last partial batch
        self._order: tuple[int, list[int]] = (-1, [])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(i, self.per_epoch)
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.examples), self.seed, epoch))
        idx = self._order[1][pos * self.batch_size:(pos + 1) * self.batch_size]
        return collate([self.examples[j] for j in idx], self.pad_id, self.task, self.pad_multiple)


def collate(examples: list[Example], pad_id: int, task: str, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded tensors of a list of Examples, T = the longest row rounded up to a multiple of `pad_multiple`.

    Returns:
        input_ids and attention_mask [B, T]; labels [B, T] (causal, IGNORE on padding) or [B] (classify).
    """
    longest = max(len(e.input_ids) for e in examples)
    length = -(-longest // pad_multiple) * pad_multiple
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        if task == "causal":
            labels[row, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = torch.tensor([e.label for e in examples]) if task == "classify" else labels
    return batch


def eval_batches(examples: list[Example], batch_size: int, pad_id: int, task: str) -> Iterator[dict]:
    """The Examples in order, `batch_size` at a time, collated (the last batch may be smaller)."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start:start + batch_size], pad_id, task)
