"""Scores: held-out loss and perplexity, classification accuracy, greedy generation with exact match or BLEU."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..loading.rows import Example
from .batches import eval_batches
from .loop import causal_loss_sum, classify_loss_sum


@torch.no_grad()
def heldout_loss(model, examples: list[Example], pad_id: int, batch_size: int = 16,
                 device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Mean next-token loss over the labelled tokens and its perplexity (causal LM)."""
    total, count = 0.0, 0
    for batch in eval_batches(examples, batch_size, pad_id, "causal"):
        loss, n = causal_loss_sum(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + float(loss), count + n
    mean = total / max(1, count)
    return {"eval_loss": mean, "perplexity": math.exp(min(mean, 50.0))}


@torch.no_grad()
def classify_scores(model, examples: list[Example], pad_id: int, batch_size: int = 32,
                    device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Accuracy and mean loss per example of a sequence classifier."""
    correct = total_loss = 0.0
    for batch in eval_batches(examples, batch_size, pad_id, "classify"):
        batch = {k: v.to(device) for k, v in batch.items()}
        loss, _ = classify_loss_sum(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += float((logits.argmax(-1) == batch["labels"]).sum())
        total_loss += float(loss)
    n = max(1, len(examples))
    return {"accuracy": correct / n, "eval_loss": total_loss / n}


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every end token the model's generation config or the tokenizer names (chat models often have two)."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return sorted(ids)


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int = 64, batch_size: int = 16,
             device: torch.device = torch.device("cpu")) -> list[str]:
    """Greedy continuations of token-id prompts (left-padded batches, KV cache), decoded without specials."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_token_ids(model, tokenizer)[0]
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start:start + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             num_beams=1, eos_token_id=stop_token_ids(model, tokenizer), pad_token_id=pad,
                             use_cache=True)
        outputs += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    model.train(was_training)
    return outputs


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Share of predictions equal to their reference (surrounding whitespace ignored)."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu, default 13a tokenization) with any number of references per prediction."""
    import sacrebleu

    most = max(len(r) for r in references)
    # sacrebleu takes reference streams; a prediction with fewer references gets None in the extra streams.
    streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(most)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def generation_scores(predictions: Sequence[str], references: Sequence[str], kind: str,
                      grouped: Optional[Sequence[Sequence[str]]] = None) -> dict[str, float]:
    """{"bleu": ...} (kind 'bleu', against `grouped` references where given) or {"exact_match": ...}."""
    if kind == "bleu":
        return {"bleu": bleu(predictions, grouped or [[r] for r in references])}
    return {"exact_match": exact_match(predictions, references)}
