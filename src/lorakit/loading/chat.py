"""Chat rows (`messages`) → tokens through the tokenizer's chat template, the loss on assistant turns only.

This is TRL's `assistant_only_loss` / Unsloth's `train_on_responses_only`: every assistant turn of a
multi-turn conversation is learned, nothing else (system and user turns, the template's role headers).
Two ways to find the assistant tokens, the first that applies:

1. Generation markers: a template that wraps assistant output in `{% generation %} ... {% endgeneration %}`
   says itself what the model generates; transformers returns that as `assistant_masks`
   (apply_chat_template(return_assistant_tokens_mask=True)). Exact by the template author's definition.
2. Prefixes: most templates (SmolLM2's, Llama's, ...) carry no markers. The conversation is then rendered
   turn by turn: the text up to each assistant turn with the generation prompt, then with that turn; the
   difference is the turn's answer. Checked: each rendering must extend the previous one (else ConfigError).
   The answer is supervised up to and including its last end-of-turn (EOS) token; what a template adds after
   it (ChatML's newline) is glue the model never generates, so it carries no loss.
In both, the tokens before the last assistant turn are the generation prompt at inference.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from ..errors import ConfigError

IGNORE = -100  # the same value as rows.IGNORE (rows imports this module)
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


class ChatTokens(NamedTuple):
    """A conversation's tokens with their labels (IGNORE where no loss), the generation prompt of its last
    assistant turn and that turn's text."""

    ids: list[int]
    labels: list[int]
    prompt_ids: list[int]
    reference: str


def has_generation_markers(tokenizer) -> bool:
    """Whether the tokenizer's chat template marks assistant output with {% generation %}."""
    return bool(_GENERATION_TAG.search(getattr(tokenizer, "chat_template", None) or ""))


def encode_chat(tokenizer, messages: list[dict[str, Any]]) -> ChatTokens:
    """Tokens and assistant-only labels of a conversation (see the module docstring for how).

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        messages: [{"role": ..., "content": ...}, ...] with at least one assistant turn.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("this tokenizer has no chat template: use prompt/completion data or --prompt-format raw")
    if not any(m.get("role") == "assistant" for m in messages):
        raise ConfigError("a chat row has no assistant message to learn")
    if has_generation_markers(tokenizer):
        return _by_markers(tokenizer, messages)
    return _by_prefixes(tokenizer, messages)


def _last_answer(messages: list[dict[str, Any]]) -> str:
    return str([m for m in messages if m.get("role") == "assistant"][-1].get("content", ""))


def _by_markers(tokenizer, messages: list[dict[str, Any]]) -> ChatTokens:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise ConfigError("the chat template's {% generation %} markers enclose no assistant token")
    labels = [t if m else IGNORE for t, m in zip(ids, mask)]
    last_start = max(i for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    return ChatTokens(ids, labels, ids[:last_start], _last_answer(messages))


def _by_prefixes(tokenizer, messages: list[dict[str, Any]]) -> ChatTokens:
    """Turn by turn, so that the tokens before each answer are exactly the generation prompt at inference."""
    ids: list[int] = []
    labels: list[int] = []
    rendered, prompt_ids = "", []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not before.startswith(rendered) or not upto.startswith(before):
            raise ConfigError("the tokenizer's chat template does not render turns as prefixes of each other")
        context = _ids(tokenizer, before[len(rendered):])  # templates carry their own BOS
        answer = _ids(tokenizer, upto[len(before):])
        ids += context
        labels += [IGNORE] * len(context)
        prompt_ids = list(ids)
        ids += answer
        labels += _supervised(answer, tokenizer.eos_token_id)
        rendered = upto
    return ChatTokens(ids, labels, prompt_ids, _last_answer(messages))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _supervised(answer: list[int], eos_id) -> list[int]:
    """The answer's labels: its tokens up to and including its last EOS; template glue after it ignored."""
    if eos_id not in answer:
        return list(answer)
    end = len(answer) - answer[::-1].index(eos_id)
    return answer[:end] + [IGNORE] * (len(answer) - end)
