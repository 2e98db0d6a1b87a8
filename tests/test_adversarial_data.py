"""Bad training data fails with a DataError naming file, line (or row) and field, before any model loads, with
the output directory untouched; on the command line: exit code 2 and one line on stderr. Good-but-unusual
files (BOM, blank lines, CRLF, optional fields left out) read as the rows they hold."""

from __future__ import annotations

import json

import pytest

import lorakit
from lorakit.errors import DataError
from lorakit.loading import rows as D
from test_cli import run_cli
from test_train_support import one_thread  # noqa: F401

GOOD = {"prompt": "copy: red =>", "completion": " red"}
ALPACA = {"instruction": "Name a color.", "input": "", "output": "teal"}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def jsonl(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def chat(*messages) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}

# (id, file name, content, where the error is, the field it names (None: a file-level error), extra options)
CASES = [
    ("jsonl-malformed-line-50", "train.jsonl", jsonl(*[GOOD] * 49, '{"prompt": "x", "completion": "y",, }'),
     "line 50 column 35", None, {}),
    ("jsonl-line-is-a-list", "train.jsonl", jsonl(GOOD, [1, 2]), "line 2", None, {}),
    ("jsonl-line-is-null", "train.jsonl", jsonl(GOOD, GOOD, "null"), "line 3", None, {}),
    ("null-completion", "train.jsonl", jsonl(GOOD, GOOD, {"prompt": "p", "completion": None}), "line 3",
     "completion", {}),
    ("number-completion", "train.jsonl", jsonl(GOOD, {"prompt": "2+2=", "completion": 4}), "line 2", "completion", {}),
    ("list-completion", "train.jsonl", jsonl({"prompt": "p", "completion": ["a"]}), "line 1", "completion", {}),
    ("dict-prompt", "train.jsonl", jsonl(GOOD, {"prompt": {"t": 1}, "completion": "c"}), "line 2", "prompt", {}),
    ("bool-text", "train.jsonl", jsonl({"text": "fine"}, {"text": True}), "line 2", "text", {}),
    ("empty-completion", "train.jsonl", jsonl(GOOD, GOOD, GOOD, {"prompt": "p", "completion": ""}), "line 4",
     "completion", {}),
    ("blank-completion", "train.jsonl", jsonl({"prompt": "p", "completion": "  \n"}, GOOD), "line 1",
     "completion", {}),
    ("misspelled-field", "train.jsonl", jsonl(GOOD, {"prompt": "p", "completon": "c"}), "line 2", "completion", {}),
    ("unknown-fields", "train.jsonl", jsonl({"question": "q", "answer": "a"}), "line 1", "question", {}),
    ("mixed-formats", "train.jsonl", jsonl(GOOD, GOOD, {"text": "plain"}), "line 3", "text", {}),
    ("text-null", "train.jsonl", jsonl({"text": None}), "line 1", "text", {}),
    ("alpaca-null-output", "train.jsonl", jsonl(ALPACA, {"instruction": "i", "output": None}), "line 2", "output", {}),
    ("alpaca-input-list", "train.jsonl", jsonl({"instruction": "i", "input": ["x"], "output": "o"}), "line 1",
     "input", {}),
    ("alpaca-empty-instruction", "train.jsonl", jsonl(ALPACA, ALPACA, {"instruction": "", "output": "o"}),
     "line 3", "instruction", {}),
    ("messages-string", "train.jsonl", jsonl(CHAT, {"messages": "user: hi\nassistant: hello"}), "line 2",
     "messages", {}),
    ("messages-object", "train.jsonl", jsonl({"messages": {"role": "user", "content": "hi"}}), "line 1",
     "messages", {}),
    ("messages-empty", "train.jsonl", jsonl(CHAT, {"messages": []}), "line 2", "messages", {}),
    ("messages-item-string", "train.jsonl", jsonl(chat("hi", BOT)), "line 1", "messages[0]", {}),
    ("messages-missing-role", "train.jsonl", jsonl(CHAT, chat(USER, {"content": "x"})), "line 2",
     "messages[1].role", {}),
    ("messages-unknown-role", "train.jsonl", jsonl(chat({"role": "human", "content": "hi"}, BOT)), "line 1",
     "messages[0].role", {}),
    ("messages-sharegpt", "train.jsonl", jsonl(chat({"from": "human", "value": "hi"})), "line 1",
     "messages[0].role", {}),
    ("messages-null-content", "train.jsonl", jsonl(CHAT, CHAT, chat(USER, {"role": "assistant", "content": None})),
     "line 3", "messages[1].content", {}),
    ("messages-empty-answer", "train.jsonl", jsonl(chat(USER, {"role": "assistant", "content": ""})), "line 1",
     "messages[1].content", {}),
    ("messages-no-assistant", "train.jsonl", jsonl(CHAT, chat(USER)), "line 2", "messages", {}),
    ("blank-lines-keep-numbers", "train.jsonl", jsonl(GOOD) + "\n\n" + jsonl({"prompt": "p", "completion": None}),
     "line 4", "completion", {}),
    ("bom-then-bad-row", "train.jsonl", "\ufeff" + jsonl(GOOD, {"prompt": "p", "completion": 1.5}), "line 2",
     "completion", {}),
    ("crlf-then-bad-row", "train.jsonl", jsonl(GOOD).replace("\n", "\r\n") + '{"prompt": 1, "completion": "c"}\r\n',
     "line 2", "prompt", {}),
    ("non-utf8", "train.jsonl", jsonl(GOOD).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n', "line 2",
     None, {}),
    ("empty-file", "train.jsonl", "", "empty", None, {}),
    ("only-blank-lines", "train.jsonl", "\n  \n\n", "no rows", None, {}),
    ("unknown-extension", "train.txt", jsonl(GOOD), ".txt", None, {}),
    ("json-syntax", "train.json", '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "c" "completion": "d"}\n]',
     "line 3 column", None, {}),
    ("json-holding-jsonl", "train.json", jsonl(GOOD, GOOD), "line 2", None, {}),
    ("json-object-without-rows", "train.json", json.dumps({"prompt": "p", "completion": "c"}), "list", None, {}),
    ("json-item-not-object", "train.json", json.dumps([GOOD, "just text"]), "row 2", None, {}),
    ("json-null-completion", "train.json", json.dumps({"data": [GOOD, GOOD, {"prompt": "p", "completion": None}]}),
     "row 3", "completion", {}),
    ("csv-short-row", "train.csv", "prompt,completion\na,b\nc\n", "line 3", "completion", {}),
    ("csv-long-row", "train.csv", "prompt,completion\na,b\nc,d,e\n", "line 3", "completion", {}),
    ("csv-empty-completion", "train.csv", "prompt,completion\na,b\nc,\n", "line 3", "completion", {}),
    ("csv-bom-bad-row", "train.csv", "\ufeffprompt,completion\na,b\n,  \n", "line 3", "completion", {}),
    ("csv-duplicate-header", "train.csv", "prompt,prompt\na,b\n", "line 1", "prompt", {}),
    ("csv-header-only", "train.csv", "prompt,completion\n", "no rows", None, {}),
    ("tsv-short-row", "train.tsv", "sentence\tlabel\ngood film\t1\nbad film\n", "line 3", "label",
     {"task": "classify"}),
    ("classify-missing-label", "train.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b"}), "line 2", "label",
     {"task": "classify"}),
    ("classify-null-label", "train.jsonl", jsonl({"text": "a", "label": 1}, {"text": "b", "label": None}), "line 2",
     "label", {"task": "classify"}),
    ("classify-fractional-label", "train.jsonl", jsonl({"text": "a", "label": 0.5}), "line 1", "label",
     {"task": "classify"}),
    ("classify-too-many-labels", "train.jsonl", jsonl(*({"text": t, "label": t} for t in "abc")), "train.jsonl",
     "label", {"task": "classify", "num_labels": 2, "eval_data": "EVAL"}),
]

EVAL_CASES = [  # a good training file, a bad held-out file: the error names the held-out file
    ("eval-null-completion", jsonl(GOOD, {"prompt": "p", "completion": None}), "line 2", "completion", {}),
    ("eval-label-not-in-training-labels", jsonl({"text": "a", "label": "pos"}, {"text": "b", "label": "neutral"}),
     "line 2", "label", {"task": "classify"}),
]
TRAIN_FOR_EVAL = {"causal": jsonl(GOOD, GOOD), "classify": jsonl({"text": "a", "label": "pos"},
                                                                 {"text": "b", "label": "neg"})}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (or its weights) fails the test: every data error must come first."""
    import importlib

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    for module, name in (("lorakit.loading.models", "load_model"), ("lorakit.train.run", "load_model"),
                         ("lorakit.train.run", "resolve_model"), ("lorakit.loading.models", "load_pretrained"),
                         ("lorakit.cli.commands", "load_pretrained"), ("lorakit.cli.compose", "load_pretrained")):
        monkeypatch.setattr(importlib.import_module(module), name, fail)


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def _check_message(message: str, file_name: str, where: str, field) -> None:
    assert file_name in message, message
    assert where in message, message
    if field is not None:
        assert repr(field) in message or f"'{field}'" in message or f" {field}" in message, message


def _setup(tmp_path, name, content, extra) -> tuple[str, dict]:
    data = _write(tmp_path, name, content)
    extra = dict(extra)
    if extra.get("eval_data") == "EVAL":  # a held-out file that is fine: the training file is at fault
        extra["eval_data"] = _write(tmp_path, "eval.jsonl", jsonl({"text": "a", "label": "a"}))
    return data, extra


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_train_refuses_bad_data_before_the_model(tmp_path, no_model, case):
    _, name, content, where, field, extra = case
    data, extra = _setup(tmp_path, name, content, extra)
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        lorakit.train(model="no-model-needed", data=data, output_dir=str(out), quiet=True, **extra)
    _check_message(str(info.value), name, where, field)
    assert not out.exists()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cli_train_bad_data_is_one_line_and_exit_2(capsys, tmp_path, no_model, case):
    _, name, content, where, field, extra = case
    data, extra = _setup(tmp_path, name, content, extra)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    flags = [x for k, v in extra.items() for x in ("--" + k.replace("_", "-"), str(v))]
    code, stdout, err = run_cli(capsys, "train", "--model", "no-model-needed", "--data", data, "--output-dir",
                                str(out), "--overwrite", "--quiet", *flags)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and stdout == ""
    _check_message(err, name, where, field)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("case", EVAL_CASES, ids=[c[0] for c in EVAL_CASES])
def test_bad_held_out_file_is_named(tmp_path, no_model, case):
    _, content, where, field, extra = case
    train = _write(tmp_path, "train.jsonl", TRAIN_FOR_EVAL[extra.get("task", "causal")])
    held = _write(tmp_path, "held.jsonl", content)
    with pytest.raises(DataError) as info:
        lorakit.train(model="x", data=train, eval_data=held, output_dir=str(tmp_path / "out"), **extra)
    _check_message(str(info.value), "held.jsonl", where, field)
    assert "train.jsonl" not in str(info.value) and not (tmp_path / "out").exists()


def test_one_row_without_held_out_data_is_refused(tmp_path, no_model):
    data = _write(tmp_path, "one.jsonl", jsonl(GOOD))
    with pytest.raises(DataError, match="one.jsonl holds 1 row.*--eval-data"):
        lorakit.train(model="x", data=data, output_dir=str(tmp_path / "out"))


def test_eval_and_compose_check_rows_before_loading(capsys, tmp_path, no_model):
    bad = _write(tmp_path, "bad.jsonl", jsonl(GOOD, {"prompt": "p", "completion": None}))
    code, _, err = run_cli(capsys, "eval", "--data", bad, "--adapter", str(tmp_path))
    assert code == 2 and "bad.jsonl line 2, field 'completion'" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "compose", "--adapters", f"a={tmp_path}", f"b={tmp_path}", "--data", bad, "--output",
                           str(tmp_path / "composed"))
    assert code == 2 and "bad.jsonl line 2, field 'completion'" in err and not (tmp_path / "composed").exists()
    e2e = _write(tmp_path, "e2e.jsonl", jsonl({"mr": "name[A]", "ref": "A."}, {"mr": "name[B]", "ref": None}))
    code, _, err = run_cli(capsys, "compose", "--adapters", str(tmp_path), "--data", e2e)
    assert code == 2 and "e2e.jsonl line 2, field 'ref'" in err


def test_generate_prompts_file_errors_before_loading(capsys, tmp_path, no_model):
    rows = _write(tmp_path, "prompts.jsonl", jsonl({"prompt": "a"}, {"question": "b"}))
    code, _, err = run_cli(capsys, "generate", "--prompts-file", rows)
    assert code == 2 and "prompts.jsonl line 2" in err and "'prompt'" in err
    rows = _write(tmp_path, "nulls.jsonl", jsonl({"instruction": None}))
    code, _, err = run_cli(capsys, "generate", "--prompts-file", rows)
    assert code == 2 and "nulls.jsonl line 1, field 'instruction'" in err


# --- files that are unusual but fine -----------------------------------------------------------------------
@pytest.mark.parametrize("name,content,expected", [
    ("bom.jsonl", "\ufeff" + jsonl(GOOD), [GOOD]),
    ("bom.csv", "\ufeffprompt,completion\na,b\n", [{"prompt": "a", "completion": "b"}]),
    ("crlf.csv", "prompt,completion\r\na,b\r\n", [{"prompt": "a", "completion": "b"}]),
    ("blank-lines.jsonl", "\n" + jsonl(GOOD) + "\n   \n" + jsonl(GOOD), [GOOD, GOOD]),
    ("trailing-blank.csv", "prompt,completion\na,b\n\n", [{"prompt": "a", "completion": "b"}]),
    ("quoted.csv", 'prompt,completion\n"x, y","multi\nline"\n', [{"prompt": "x, y", "completion": "multi\nline"}]),
    ("wrapped.json", json.dumps({"rows": [GOOD]}), [GOOD]),
    ("separator.jsonl", json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n",
     [{"prompt": "a\u2028b", "completion": "c"}]),
], ids=["bom-jsonl", "bom-csv", "crlf-csv", "blank-lines-jsonl", "trailing-blank-csv", "quoted-csv", "wrapped-json",
        "line-separator-in-a-string"])
def test_unusual_but_valid_files_read_as_their_rows(tmp_path, name, content, expected):
    rows = D.read_rows(_write(tmp_path, name, content))
    assert rows == expected
    D.check_rows(rows, "causal")


def test_rows_remember_their_file_and_line(tmp_path):
    path = _write(tmp_path, "t.jsonl", "\n" + jsonl(GOOD) + "\n" + jsonl(GOOD))
    assert [r.where for r in D.read_rows(path)] == [f"{path} line 2", f"{path} line 4"]
    path = _write(tmp_path, "t.csv", 'prompt,completion\n"a\nb",c\nd,e\n')
    assert [r.where for r in D.read_rows(path)] == [f"{path} line 3", f"{path} line 4"]


@pytest.mark.parametrize("row", [
    {"instruction": "i", "output": "o"}, {"instruction": "i", "input": None, "output": "o"},
    {"prompt": "", "completion": "unconditional"}, {"text": "a", "label": 1, "extra": None},
    chat({"role": "system", "content": ""}, USER, BOT, {"role": "user", "content": "bye"}),
], ids=["alpaca-no-input", "alpaca-null-input", "empty-prompt", "extra-fields", "chat-empty-system"])
def test_optional_fields_may_be_left_out(row):
    D.check_row(row, "causal", where="x.jsonl line 1")


def test_check_messages_is_callable_on_its_own():
    D.check_messages(CHAT["messages"], "chat.jsonl line 7")
    with pytest.raises(DataError, match=r"chat.jsonl line 7, field 'messages\[1\]\.content': is a number"):
        D.check_messages([USER, {"role": "assistant", "content": 3}], "chat.jsonl line 7")


def test_encoder_names_the_row_of_an_unknown_label(tmp_path):
    from test_train_support import tiny_tokenizer

    rows = D.read_rows(_write(tmp_path, "c.jsonl", jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "z"})))
    encoder = D.Encoder(tiny_tokenizer(["a b"]), "classify", label_names=["x", "y"])
    with pytest.raises(DataError, match=r"c.jsonl line 2, field 'label': 'z' is not among"):
        D.encode_rows(encoder, rows)


def test_answers_all_cut_away_fail_after_the_tokenizer_before_the_model(tmp_path, monkeypatch):
    import importlib

    from test_train_support import save_tiny_llama

    model = save_tiny_llama(tmp_path / "tiny")
    monkeypatch.setattr(importlib.import_module("lorakit.train.run"), "load_model",
                        lambda *a, **k: pytest.fail("the model was loaded"))
    data = _write(tmp_path, "long.jsonl", jsonl(*[GOOD] * 4))
    with pytest.raises(DataError, match="long.jsonl: no training example is left.*--max-length 1"):
        lorakit.train(model=str(model), data=data, eval_data=data, max_length=1, output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


REFUSED_OPTIONS = [  # options that cannot run: refused before --overwrite removes the earlier run
    ("loraplus-negative", {"loraplus_lr_ratio": -1.0}, "loraplus-lr-ratio must be >= 0"),
    ("pack-tokens-negative", {"pack_tokens": -1}, "pack-tokens must be >= 0"),
    ("packing-classify", {"packing": True, "task": "classify"}, "--packing is for --task causal"),
    ("resume-without-checkpoint", {"resume": True}, "no checkpoint"),
]


@pytest.mark.parametrize("extra,match", [c[1:] for c in REFUSED_OPTIONS], ids=[c[0] for c in REFUSED_OPTIONS])
def test_options_that_cannot_run_are_refused_before_the_output_dir_or_model(tmp_path, no_model, extra, match):
    from lorakit.errors import LorakitError

    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("an earlier run\n")  # what --overwrite would remove
    rows = jsonl({"text": "a", "label": "x"}, {"text": "b", "label": "y"}) if extra.get("task") else jsonl(GOOD, GOOD)
    data = _write(tmp_path, "d.jsonl", rows)
    overwrite = {} if extra.get("resume") else {"overwrite": True}
    with pytest.raises(LorakitError, match=match):
        lorakit.train(model="no-model-needed", data=data, output_dir=str(out), quiet=True, **overwrite, **extra)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]
    assert (out / "metrics.json").read_text() == "an earlier run\n"


def test_nproc_checks_the_data_before_launching(tmp_path, no_model, monkeypatch):
    import importlib

    monkeypatch.setattr(importlib.import_module("lorakit.train.distributed"), "launch",
                        lambda *a, **k: pytest.fail("the workers were launched"))
    data = _write(tmp_path, "bad.jsonl", jsonl(GOOD, {"prompt": "p", "completion": None}))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="bad.jsonl"):
        lorakit.train(model="no-model-needed", data=data, output_dir=str(out), quiet=True, nproc=2, device="cpu")
    assert not out.exists()
