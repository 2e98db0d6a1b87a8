"""Adversarial checkpoints: a crafted pickle never runs, a damaged or foreign checkpoint is a CheckpointError
naming the file, and --resume refuses options that would change the training (options.json stays truthful)."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.errors import CheckpointError
from test_train_support import copy_task_rows, one_thread, save_tiny_llama, write_jsonl  # noqa: F401

STEP = "checkpoints/step-0000002"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    model = save_tiny_llama(root / "model")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(48))
    options = dict(model=str(model), data=str(data), max_steps=4, checkpoint_every=2, batch_size=4, lr=0.02,
                   r=4, target_modules=["q_proj", "v_proj"], score="none", quiet=True, max_new_tokens=2,
                   lora_dropout=0.1)
    whole = lorakit.train(output_dir=str(root / "whole"), **options)
    return root, options, whole


def _killed_copy(setup, name):
    """A run directory as a kill after the step-2 checkpoint leaves it (the checkpoint only)."""
    root = setup[0]
    run = root / name
    shutil.copytree(root / "whole" / "checkpoints", run / "checkpoints")
    (run / "options.json").write_text((root / "whole" / "options.json").read_text())
    return run


def _resume(setup, run, **changes):
    return lorakit.train(output_dir=str(run), resume=True, **{**setup[1], **changes})


class Payload:
    """Unpickling this creates `marker` (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_checkpoint_holds_no_pickle(setup):
    ckpt = setup[0] / "whole" / STEP
    assert sorted(p.name for p in ckpt.iterdir()) == ["adapter", "trainer_state.json", "trainer_state.safetensors"]
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2


def test_resume_never_unpickles(setup, monkeypatch):
    run = _killed_copy(setup, "no-unpickle")

    def refuse(*args, **kwargs):
        raise AssertionError("resume unpickled something")

    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(module, name, refuse)
    resumed = _resume(setup, run)
    a, b = lorakit.adapter_state_dict(setup[2].model), lorakit.adapter_state_dict(resumed.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # still bit-exact


@pytest.mark.parametrize("where", ["legacy trainer_state.pt", "trainer_state.safetensors"])
def test_crafted_pickle_never_runs(setup, tmp_path, where):
    run = _killed_copy(setup, f"pickle-{where.split()[-1]}")
    marker = tmp_path / "pwned"
    ckpt = run / STEP
    if where.startswith("legacy"):  # what an older lorakit wrote: only the pickle
        (ckpt / "trainer_state.json").unlink()
        (ckpt / "trainer_state.safetensors").unlink()
        torch.save({"step": 2, "params": Payload(marker)}, ckpt / "trainer_state.pt")
        match = "trainer_state.json is missing .*pickle"
    else:
        (ckpt / "trainer_state.safetensors").write_bytes(pickle.dumps(Payload(marker)))
        match = "trainer_state.safetensors is missing, truncated or corrupt"
    with pytest.raises(CheckpointError, match=match):
        _resume(setup, run)
    assert not marker.exists()


def _damage_json_truncated(ckpt):
    text = (ckpt / "trainer_state.json").read_text()
    (ckpt / "trainer_state.json").write_text(text[: len(text) // 2])


def _damage_json_not_state(ckpt):
    (ckpt / "trainer_state.json").write_text("[1, 2, 3]\n")


def _damage_tensors_truncated(ckpt):
    data = (ckpt / "trainer_state.safetensors").read_bytes()
    (ckpt / "trainer_state.safetensors").write_bytes(data[: len(data) // 3])


def _damage_tensors_garbage(ckpt):
    (ckpt / "trainer_state.safetensors").write_bytes(b"\xff" * 300)


def _damage_tensor_missing(ckpt):
    tensors = load_file(ckpt / "trainer_state.safetensors")
    tensors.pop(sorted(tensors)[-1])
    save_file(tensors, ckpt / "trainer_state.safetensors")


def _damage_param_nan(ckpt):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    tensors = load_file(ckpt / "trainer_state.safetensors")
    key = next(iter(state["params"].values()))["__tensor__"]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, ckpt / "trainer_state.safetensors")


def _damage_moment_shape(ckpt):
    state = json.loads((ckpt / "trainer_state.json").read_text())
    moments = next(iter(state["optimizer"]["state"].values()))  # keyed by parameter name
    tensors = load_file(ckpt / "trainer_state.safetensors")
    key = moments["exp_avg"]["__tensor__"]
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, ckpt / "trainer_state.safetensors")


@pytest.mark.parametrize("damage,file,match", [
    (_damage_json_truncated, "trainer_state.json", "truncated or not JSON"),
    (_damage_json_not_state, "trainer_state.json", "not a lorakit checkpoint"),
    (_damage_tensors_truncated, "trainer_state.safetensors", "truncated or corrupt"),
    (_damage_tensors_garbage, "trainer_state.safetensors", "truncated or corrupt"),
    (_damage_tensor_missing, "trainer_state.safetensors", "lacks"),
    (_damage_param_nan, "trainer_state.json", "NaN or inf"),
    (_damage_moment_shape, "trainer_state.json", "optimizer exp_avg"),
])
def test_damaged_checkpoint_is_a_clean_error(setup, damage, file, match):
    run = _killed_copy(setup, f"damaged-{damage.__name__}")
    damage(run / STEP)
    with pytest.raises(CheckpointError, match=match) as info:
        _resume(setup, run)
    assert str(run / STEP / file) in str(info.value)
    assert not (run / "adapter").exists()  # nothing trained, nothing written


def _edit_state(ckpt, edit):
    path = ckpt / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state)
    path.write_text(json.dumps(state))


def _first_param(state):
    return next(iter(state["params"]))


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["params"].update({_first_param(s): {"__tensor__": ["t0"]}}), "damaged"),
    (lambda s: s["params"].update({_first_param(s): {"__ndarray__": "t0"}}), "damaged"),
    (lambda s: s.update(scheduler={"__items__": [["only-a-key"]]}), "damaged"),
    (lambda s: s.update(rng_ranks=[]), "rng_ranks"),
    (lambda s: s.update(rng_ranks={"torch": 1}), "rng_ranks"),
    (lambda s: s.update(step="2"), "step is '2'"),
    (lambda s: s.update(step=2.5), "step is 2.5"),
    (lambda s: s.update(history={"step": 1}), "history"),
    (lambda s: s.update(history=[1, 2]), "history"),
    (lambda s: s.update(hooks=[{}, {}, {}]), "3 training-hook states"),
    (lambda s: s["optimizer"].update(state={"no.such.parameter": {}}), "belongs to no trainable parameter"),
    (lambda s: s.update(progress={"tokens": -5}), "progress tokens"),
    (lambda s: s.update(progress={"recent": "1.0"}), "progress recent"),
], ids=["tensor-list", "ndarray-no-dtype", "items-1-element", "rng-empty", "rng-dict", "step-str", "step-float",
        "history-dict", "history-ints", "hooks-count", "optimizer-foreign-name", "progress-tokens",
        "progress-recent"])
def test_valid_json_with_bad_references_is_a_checkpoint_error(setup, edit, match):
    run = _killed_copy(setup, "bad-refs")
    _edit_state(run / STEP, edit)
    try:
        with pytest.raises(CheckpointError, match=match) as info:
            _resume(setup, run)
        assert str(run / STEP / "trainer_state.json") in str(info.value)
        assert not (run / "adapter").exists()
    finally:
        shutil.rmtree(run)


def test_the_optimizer_state_is_keyed_by_parameter_name(setup):
    state = json.loads((setup[0] / "whole" / STEP / "trainer_state.json").read_text())
    names = set(state["params"])
    assert set(state["optimizer"]["state"]) == names
    assert {n for g in state["optimizer"]["param_groups"] for n in g["params"]} == names


def test_a_run_started_with_overwrite_resumes_with_resume_alone(setup):
    root = setup[0]
    run = root / "overwritten"
    run.mkdir()
    (run / "stale.txt").write_text("an earlier run")
    options = {**setup[1], "max_steps": 4}
    lorakit.train(output_dir=str(run), overwrite=True, **{**options, "max_steps": 2, "checkpoint_every": 1})
    assert (run / "checkpoints").is_dir()
    resumed = lorakit.train(output_dir=str(run), resume=True, **{**options, "max_steps": 2, "checkpoint_every": 1})
    assert resumed.metrics["train"]["steps"] == 2


def test_changed_rank_is_refused_naming_the_file(setup):
    run = _killed_copy(setup, "other-r")
    with pytest.raises(CheckpointError, match=r"--r 8 \(the checkpoint's run: 4\)") as info:
        _resume(setup, run, r=8)
    assert str(run / STEP / "trainer_state.json") in str(info.value)


def test_changed_rank_without_recorded_options_is_a_shape_error(setup):
    """A checkpoint whose options were not recorded (an API caller's loop) still fails on the shapes."""
    run = _killed_copy(setup, "other-r-no-options")
    path = run / STEP / "trainer_state.json"
    state = json.loads(path.read_text())
    state["options"] = None
    path.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=r"saved with shape .*was r or another adapter option changed") as info:
        _resume(setup, run, r=8)
    assert str(path) in str(info.value)


def test_changed_lr_is_refused_and_options_json_stays_truthful(setup):
    run = _killed_copy(setup, "other-lr")
    with pytest.raises(CheckpointError, match=r"--lr 0\.05 \(the checkpoint's run: 0\.02\)"):
        _resume(setup, run, lr=0.05)
    assert json.loads((run / "options.json").read_text())["lr"] == 0.02


def test_options_that_do_not_change_the_training_may_change(setup):
    run = _killed_copy(setup, "other-logging")
    resumed = _resume(setup, run, log_every=1, eval_every=1, max_new_tokens=3)
    assert json.loads((run / "options.json").read_text())["log_every"] == 1
    a, b = lorakit.adapter_state_dict(setup[2].model), lorakit.adapter_state_dict(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_resume_with_changed_lr_exits_2_with_one_line(setup, capsys):
    from lorakit import cli

    run = _killed_copy(setup, "cli-lr")
    o = setup[1]
    code = cli.main(["train", "--model", o["model"], "--data", o["data"], "--max-steps", "4", "--checkpoint-every", "2",
                     "--batch-size", "4", "--r", "4", "--target-modules", "q_proj", "v_proj", "--score", "none",
                     "--quiet", "--lora-dropout", "0.1", "--output-dir", str(run), "--resume", "--lr", "0.05"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--lr 0.05" in lines[0] and "Traceback" not in err
