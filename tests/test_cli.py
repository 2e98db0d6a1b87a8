"""The `lorakit` command line: help from docstrings, config files, plugins, and every command end to end on a
tiny model (train → info → eval → generate side by side → merge → from_pretrained)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from lorakit.cli import app as cli
from lorakit.train.fields import field_docs
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = cli.main(list(argv))
    except SystemExit as e:  # argparse's --help / usage errors
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("command", sorted(["train", "eval", "generate", "merge", "info", "estimate"]))
def test_help_documents_every_option(capsys, command):
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    options_cls, _ = cli.COMMANDS[command].resolve()
    docs = field_docs(options_cls)
    flat = " ".join(out.split())
    for f in dataclasses.fields(options_cls):
        assert f.name in docs, f"{options_cls.__name__}.{f.name} has no docstring"
        shown = f.name if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
        assert shown in out, shown
        assert " ".join(docs[f.name].split()[:4]) in flat, f.name
    assert "--config" in out


def test_top_level_help_lists_commands(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("train", "eval", "generate", "merge", "info", "estimate"):
        assert name in out


def test_plugin_command_with_config_file_and_flag_override(capsys, tmp_path, monkeypatch):
    @dataclasses.dataclass
    class HelloOptions:
        name: str = "world"
        """Who to greet."""
        times: int = 1
        """How often."""
        loud: bool = False
        """Shout."""
        tags: list[str] = dataclasses.field(default_factory=list)
        """Labels."""

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "hello", cli.Command(HelloOptions, seen.append, "Say hello."))
    cfg = tmp_path / "hello.yaml"
    cfg.write_text("name: file\ntimes: 3\nloud: true\n")
    code, _, _ = run_cli(capsys, "hello", "--config", str(cfg), "--times", "5", "--tags", "a,b", "c")
    assert code == 0
    assert seen == [HelloOptions(name="file", times=5, loud=True, tags=["a", "b", "c"])]
    code, _, err = run_cli(capsys, "hello", "--times", "many")
    assert code == 2 and "must be a number" in err
    cfg.write_text("nmae: typo\n")
    code, _, err = run_cli(capsys, "hello", "--config", str(cfg))
    assert code == 2 and "did you mean 'name'" in err


def test_cli_errors_are_clear_and_touch_nothing(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", "--data", str(tmp_path / "missing.jsonl"),
                           "--output-dir", str(tmp_path / "out"))
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "info", str(tmp_path))
    assert code == 2 and "not an adapter directory" in err


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_llama(root / "tiny")
    write_jsonl(root / "train.jsonl", copy_task_rows(96))
    write_jsonl(root / "eval.jsonl", copy_task_rows(16, seed=1))
    return root, model


def test_every_command_end_to_end(capsys, workspace):
    from transformers import AutoModelForCausalLM

    import lorakit

    root, model = workspace
    cfg = root / "run.yaml"
    cfg.write_text(f"model: {model}\ndata: {root / 'train.jsonl'}\neval-data: {root / 'eval.jsonl'}\n"
                   "max_steps: 30\nlr: 0.02\nbatch_size: 8\nr: 8\nmax-new-tokens: 4\nwarmup: 2\n")
    for name, extra in (("run-a", []), ("run-b", ["--r", "4", "--target-modules", "q_proj,v_proj"])):
        code, _, err = run_cli(capsys, "train", "--config", str(cfg), "--output-dir", str(root / name), "--quiet",
                               "--score", "exact", *extra)
        assert code == 0, err
    metrics = json.loads((root / "run-a" / "metrics.json").read_text())
    assert metrics["options"]["lr"] == 0.02 and metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]

    code, out, _ = run_cli(capsys, "info", str(root / "run-b"))
    assert code == 0
    assert "lora" in out and "q_proj" in out and "v_proj" in out
    info = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}
    assert info["rank"] == "4" and info["base_model"] == str(model)
    assert int(info["parameters"].replace(",", "")) == 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers, q and v

    code, out, _ = run_cli(capsys, "eval", "--model", str(model), "--adapter", str(root / "run-a"), "--data",
                           str(root / "eval.jsonl"), "--max-new-tokens", "4", "--metric", "exact")
    assert code == 0
    scores = json.loads(out.strip().splitlines()[-1])
    assert abs(scores["eval_loss"] - metrics["after"]["eval_loss"]) < 1e-4
    assert scores["exact_match"] == metrics["after"]["exact_match"]

    code, out, _ = run_cli(capsys, "generate", "--model", str(model), "--adapter", str(root / "run-a"),
                           str(root / "run-b"), "--prompt", "copy: red blue gold =>", "--max-new-tokens", "3")
    assert code == 0
    assert out.count("--- ") == 3 and "--- base" in out and str(root / "run-b") in out

    code, out, err = run_cli(capsys, "merge", str(root / "run-a"), "--model", str(model), "--output",
                             str(root / "merged"))
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(root / "merged")
    adapted = AutoModelForCausalLM.from_pretrained(model)
    lorakit.load_adapter(adapted, root / "run-a" / "adapter")
    ids = torch.tensor([[5, 9, 33, 71, 2]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())


def test_resume_from_the_command_line(capsys, workspace):
    import shutil

    from safetensors.torch import load_file

    root, model = workspace
    args = ["train", "--model", str(model), "--data", str(root / "train.jsonl"), "--max-steps", "6",
            "--checkpoint-every", "3", "--quiet", "--score", "none", "--lr", "0.01", "--lora-dropout", "0.1"]
    assert run_cli(capsys, *args, "--output-dir", str(root / "whole"))[0] == 0
    # a run that was killed after its step-3 checkpoint: only the checkpoint is left; --resume finishes it
    shutil.copytree(root / "whole" / "checkpoints", root / "killed" / "checkpoints")
    assert run_cli(capsys, *args, "--output-dir", str(root / "killed"), "--resume")[0] == 0
    a = load_file(root / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(root / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classify_train_then_eval_from_the_command_line(capsys, minilm_path, tmp_path):
    rows = [{"sentence": f"a {w} film", "label": int(w in ("great", "superb", "lovely"))}
            for w in ("great", "awful", "superb", "bad", "lovely", "boring") * 8]
    data = tmp_path / "cls.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"{r['sentence']}\t{r['label']}\n" for r in rows))
    code, _, err = run_cli(capsys, "train", "--model", minilm_path, "--data", str(data), "--eval-data", str(data),
                           "--task", "classify", "--target-modules", "query", "value", "--max-steps", "8",
                           "--lr", "5e-3", "--batch-size", "16", "--quiet", "--output-dir", str(tmp_path / "run"))
    assert code == 0, err
    trained = json.loads((tmp_path / "run" / "metrics.json").read_text())["after"]["accuracy"]
    code, out, err = run_cli(capsys, "eval", "--model", minilm_path, "--adapter", str(tmp_path / "run"), "--data",
                             str(data), "--task", "classify")
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["accuracy"] == trained


@pytest.mark.parametrize("variant,peft_type", [("dora", "LORA"), ("loha", "LOHA"), ("lokr", "LOKR"),
                                               ("adalora", "ADALORA")])
def test_train_every_variant_from_the_command_line(capsys, workspace, variant, peft_type):
    root, model = workspace
    out = root / f"variant-{variant}"
    code, _, err = run_cli(capsys, "train", "--model", str(model), "--data", str(root / "train.jsonl"), "--eval-data",
                           str(root / "eval.jsonl"), "--adapter", variant, "--max-steps", "8", "--lr", "0.01",
                           "--score", "none", "--quiet", "--output-dir", str(out))
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config.get("use_dora", False) == (variant == "dora")
    code, stdout, _ = run_cli(capsys, "info", str(out / "adapter"))  # all-linear: 7 module names × 2 layers
    assert code == 0 and "14 modules: down_proj ×2, gate_proj ×2, k_proj ×2" in stdout
    if variant == "adalora":  # the schedule spans the run's 8 steps and pruned down to the target budget
        assert config["total_step"] == 8 and config["init_r"] == 12
        kept = [sum(mask) for mask in config["rank_pattern"].values()]
        assert sum(kept) <= config["target_r"] * len(kept) < 12 * len(kept)
    # the directory loads back onto a fresh base and gives the trained model's held-out loss
    code, stdout, err = run_cli(capsys, "eval", "--model", str(model), "--adapter", str(out / "adapter"), "--data",
                                str(root / "eval.jsonl"), "--metric", "perplexity")
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["eval_loss"] == pytest.approx(metrics["after"]["eval_loss"],
                                                                                     rel=1e-4)
