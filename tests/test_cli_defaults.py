"""`lorakit train` / `generate` / `eval` on the user's own data: defaults and outputs a user expects (the default
learning rate, generations.md, one loss definition, no silent overwrite, prompt formats in generate, prompts
files, help texts, QLoRA from the command line)."""

from __future__ import annotations

import json
import re

import pytest

import lorakit
from lorakit.loading.models import load_tokenizer
from lorakit.loading.rows import render_prompt
from lorakit.train.options import TrainOptions
from lorakit.train.run import resolve_options
from test_cli import run_cli
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401

ALPACA_ROWS = [{"instruction": "Name the first color.", "input": " ".join(r["prompt"].split()[1:4]),
                "output": r["completion"].strip()} for r in copy_task_rows(48)]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    model = save_tiny_llama(root / "tiny")
    write_jsonl(root / "train.jsonl", copy_task_rows(64))
    write_jsonl(root / "eval.jsonl", copy_task_rows(8, seed=1))
    write_jsonl(root / "alpaca.jsonl", ALPACA_ROWS)
    return root, str(model)


def _train_args(ws, out, *extra) -> list[str]:
    root, model = ws
    return ["train", "--model", model, "--data", str(root / "train.jsonl"), "--eval-data", str(root / "eval.jsonl"),
            "--max-steps", "12", "--lr", "0.02", "--max-new-tokens", "3", "--output-dir", str(out), *extra]


def test_default_learning_rate_for_user_data(capsys):
    opts, _ = resolve_options(data="mine.jsonl")
    assert opts.lr == TrainOptions().lr == 1e-3  # 5x PEFT/TRL's 2e-4: lorakit's default runs are one epoch
    assert resolve_options()[0].lr == 2e-3  # the built-in demo's recipe is unchanged
    code, out, _ = run_cli(capsys, "train", "--help")
    assert code == 0 and "(default: 0.001)" in " ".join(out.split())


def test_generations_md_is_written_without_a_score(ws, tmp_path):
    root, model = ws
    result = lorakit.train(model=model, data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"),
                           max_steps=4, max_new_tokens=3, samples=3, quiet=True, output_dir=str(tmp_path / "run"))
    assert result.metrics["options"]["score"] == "auto" and "exact_match" not in result.metrics["after"]
    text = (tmp_path / "run" / "generations.md").read_text()
    assert text.count("## Example") == 3 and text.count("- before:") == 3 and text.count("- after:") == 3
    assert "copy:" in text  # the held-out prompts are shown


def test_progress_bar_shows_final_loss(capsys, ws, tmp_path):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, *_train_args(ws, out, "--score", "none"))
    assert code == 0, err
    shown = re.findall(r"loss=(\d+\.\d+)", err)
    metrics = json.loads((out / "metrics.json").read_text())
    assert shown and shown[-1] == f"{metrics['train']['final_loss']:.3f}"


def test_final_loss_is_the_mean_of_the_last_steps(ws, tmp_path):
    root, model = ws
    losses = []
    result = lorakit.train(model=model, data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"),
                           max_steps=14, lr=0.02, quiet=True, score="none", samples=0, log_every=5,
                           output_dir=str(tmp_path / "run"), on_step=lambda step, rec: losses.append(rec["loss"]))
    assert len(losses) == 14 and len(set(losses)) > 1
    assert result.metrics["train"]["final_loss"] == pytest.approx(sum(losses[-10:]) / 10, rel=1e-9)
    assert result.metrics["train"]["final_loss"] != pytest.approx(losses[-1], rel=1e-9)


def test_an_existing_output_directory_is_refused_unless_asked(capsys, ws, tmp_path):
    out = tmp_path / "run"
    assert run_cli(capsys, *_train_args(ws, out, "--quiet", "--score", "none"))[0] == 0
    before = (out / "metrics.json").read_bytes()
    code, stdout, err = run_cli(capsys, *_train_args(ws, out, "--quiet", "--lr", "0.01"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--overwrite" in err and "Traceback" not in err
    assert (out / "metrics.json").read_bytes() == before
    (out / "notes.txt").write_text("mine")
    (out / "generations.md").write_text("stale")
    code, _, err = run_cli(capsys, *_train_args(ws, out, "--quiet", "--lr", "0.01", "--overwrite", "--samples", "0"))
    assert code == 0, err
    assert json.loads((out / "metrics.json").read_text())["options"]["lr"] == 0.01
    assert (out / "notes.txt").read_text() == "mine" and not (out / "generations.md").exists()


def test_resume_into_the_same_directory_still_works(capsys, ws, tmp_path):
    out = tmp_path / "run"
    args = _train_args(ws, out, "--quiet", "--score", "none", "--checkpoint-every", "5")
    assert run_cli(capsys, *args)[0] == 0
    assert (out / "checkpoints").is_dir()
    code, _, err = run_cli(capsys, *args, "--resume")
    assert code == 0, err


@pytest.fixture
def captured(monkeypatch):
    """lorakit generate's model calls recorded: (prompt token ids) per column; outputs are 'ok' (or as set)."""
    import lorakit.cli.generate as G

    calls = {"prompts": [], "output": "ok"}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, **kw):
        calls["prompts"].append([list(p) for p in prompts])
        return [calls["output"]] * len(prompts)

    monkeypatch.setattr(G, "generate", fake_generate)
    return calls


@pytest.fixture(scope="module")
def alpaca_run(ws, tmp_path_factory):
    root, model = ws
    out = tmp_path_factory.mktemp("alpaca") / "run"
    lorakit.train(model=model, data=str(root / "alpaca.jsonl"), max_steps=2, quiet=True, output_dir=str(out))
    return out


def test_train_records_the_prompt_format_it_used(alpaca_run):
    assert json.loads((alpaca_run / "options.json").read_text())["prompt_format"] == "alpaca"


def test_generate_renders_prompts_as_the_adapter_was_trained(capsys, ws, alpaca_run, captured):
    _, model = ws
    tok = load_tokenizer(model)
    code, out, _ = run_cli(capsys, "generate", "--model", model, "--adapter", str(alpaca_run), "--prompt", "Name one.")
    assert code == 0
    alpaca = render_prompt(tok, "alpaca", "Name one.")
    assert captured["prompts"] == [[alpaca], [alpaca]]  # the base column too, to compare like with like
    assert tok.decode(alpaca).startswith("Below is an instruction") and "[alpaca]" in out
    captured["prompts"].clear()
    code, out, _ = run_cli(capsys, "generate", "--model", model, "--adapter", str(alpaca_run), "--prompt", "Name one.",
                           "--format", "raw", "--no-with-base")
    assert code == 0 and captured["prompts"] == [[list(tok("Name one.")["input_ids"])]] and "[raw]" in out


def test_generate_without_an_adapter_uses_the_chat_template(capsys, ws, captured):
    _, model = ws
    tok = load_tokenizer(model)
    code, out, _ = run_cli(capsys, "generate", "--model", model, "--prompt", "hello world")
    assert code == 0 and "[chat]" in out
    (ids,) = captured["prompts"][0]
    assert tok.decode(ids) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"


def test_generate_hints_when_an_output_is_empty(capsys, ws, captured):
    _, model = ws
    captured["output"] = ""
    code, out, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hello", "--format", "raw")
    assert code == 0 and "--- base [raw]:" in out
    assert "empty" in err and "--format chat" in err and len(err.strip().splitlines()) == 1
    captured["output"] = "fine"
    code, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hello")
    assert code == 0 and "empty" not in err


def test_prompts_file_plain_text_or_prompt_rows(capsys, ws, captured, tmp_path):
    root, model = ws
    tok = load_tokenizer(model)
    (tmp_path / "prompts.txt").write_text("first prompt\n\n  second prompt  \nthird\n")
    code, out, _ = run_cli(capsys, "generate", "--model", model, "--prompts-file", str(tmp_path / "prompts.txt"),
                           "--format", "raw", "--limit", "2")
    assert code == 0 and "=== prompt 2 ===\nsecond prompt" in out and "prompt 3" not in out
    assert captured["prompts"][-1] == [list(tok(t)["input_ids"]) for t in ("first prompt", "second prompt")]
    write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "Add.", "input": "2 3", "output": "5"}])
    assert run_cli(capsys, "generate", "--model", model, "--prompts-file", str(tmp_path / "rows.jsonl"),
                   "--format", "alpaca")[0] == 0
    assert captured["prompts"][-1] == [render_prompt(tok, "alpaca", "Add.", "2 3")]
    assert "### Input:\n2 3" in tok.decode(captured["prompts"][-1][0])
    assert run_cli(capsys, "generate", "--model", model, "--prompts-file", str(root / "train.jsonl"),
                   "--format", "raw", "--limit", "1")[0] == 0  # a training file: its prompts, not its answers
    first = json.loads((root / "train.jsonl").read_text().splitlines()[0])["prompt"]
    assert captured["prompts"][-1] == [list(tok(first)["input_ids"])]


def test_eval_help_describes_the_data_it_scores(capsys):
    code, out, _ = run_cli(capsys, "eval", "--help")
    flat = " ".join(out.split())
    assert code == 0 and "Data to score" in flat and "Training data" not in flat
    assert "--eval-fraction" not in out and "--train-examples" not in out


def test_train_bits_4_trains_on_an_nf4_base(capsys, ws, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakit.quant.linear import NF4Linear

    root, model = ws
    result = lorakit.train(model=model, data=str(root / "train.jsonl"), eval_data=str(root / "eval.jsonl"),
                           bits=4, max_steps=16, lr=0.02, quiet=True, samples=0, output_dir=str(tmp_path / "q"))
    assert sum(isinstance(m, NF4Linear) for m in result.model.modules()) == 14  # 7 linears x 2 layers
    assert result.metrics["after"]["eval_loss"] < result.metrics["before"]["eval_loss"]
    dense = AutoModelForCausalLM.from_pretrained(model)
    lorakit.load_adapter(dense, result.adapter_dir)  # the adapter loads onto the unquantized base
    code, _, err = run_cli(capsys, *_train_args(ws, tmp_path / "cli", "--bits", "4", "--quiet", "--samples", "0",
                                                "--max-steps", "2"))
    assert code == 0, err
    assert json.loads((tmp_path / "cli" / "options.json").read_text())["bits"] == 4
    code, _, err = run_cli(capsys, *_train_args(ws, tmp_path / "bad", "--bits", "8"))
    assert code == 2 and "bits" in err and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("content", [b"[1, 2, 3]\n", b'"chat"\n', b"\xff\xfe not utf-8 \x80\n", b"{"],
                         ids=["list", "string", "not-utf8", "truncated"])
def test_a_damaged_options_json_means_format_unknown(tmp_path, content):
    from lorakit.cli.generate import trained_format

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "options.json").write_bytes(content)
    assert trained_format(str(tmp_path / "adapter")) is None
