"""Killed saves: an adapter directory, a training checkpoint and a merged model each read as exactly the old
version or exactly the new one, never a mix, and the next save leaves no temp litter.

A forked child saves and is killed (os._exit, as abrupt as kill -9 for the files) right before its k-th
filesystem step (mkdir, each file written, fsync, link, chmod, rename / exchange, each unlink and rmdir of the
old copy), for every k until the save completes; the exchange-less fallback is run the same way. Separately,
children that save over and over are killed with SIGKILL at random moments.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import signal
import time

import pytest
import safetensors.torch
import torch
from torch import nn

import lorakit
from lorakit.core import atomic
from test_train_support import one_thread, save_tiny_llama  # noqa: F401

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked children")

KILLED = 77
FILESYSTEM_STEPS = [(os, "mkdir"), (os, "rename"), (os, "replace"), (os, "fsync"), (os, "link"), (os, "chmod"), (os, "unlink"),
                    (os, "rmdir"), (atomic, "_exchange"), (safetensors.torch, "save_file"), (pathlib.Path, "write_text")]


@pytest.fixture(autouse=True)
def no_disk_flush(monkeypatch):
    """fsync stays a kill point but flushes nothing: a killed process's writes survive in the page cache (only
    a power cut loses them, which no test here can cause), and the flushes would make each save 10x slower."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def _arm(kill_at: int, fallback: bool) -> None:
    """In the child: die right before the kill_at-th filesystem step."""
    count = [0]
    if fallback:
        atomic._exchange = lambda a, b: False

    def wrap(fn):
        def step(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os._exit(KILLED)
            return fn(*args, **kwargs)
        return step

    for owner, name in FILESYSTEM_STEPS:
        setattr(owner, name, wrap(getattr(owner, name)))


def _in_child(fn, kill_at: int = 0, fallback: bool = False) -> int:
    """Run fn() in a forked child killed before step `kill_at` (0: never); its exit code (KILLED when killed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _arm(kill_at, fallback)
            fn()
            code = 0
        finally:
            os._exit(code)
    return _wait(pid)


def _wait(pid: int, limit_s: float = 120.0) -> int:
    """The child's exit code; a child stuck after fork (never expected) is killed and fails the test."""
    deadline = time.monotonic() + limit_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("a forked child hung")
        time.sleep(0.005)


def _kill_at_every_step(prepare, save, check, fallback: bool) -> set[str]:
    """For k = 1, 2, ...: prepare() a fresh target, kill a child's save() before step k, check() what a reader
    sees ("old" or "new"); until the save completes. Returns the outcomes seen."""
    seen, k = set(), 0
    while True:
        k += 1
        target = prepare(k)
        code = _in_child(lambda: save(target), kill_at=k, fallback=fallback)
        assert code in (0, KILLED), f"the child failed at step {k}"
        seen.add(check(target))
        if code == 0:
            assert k > 5, "the save did not go through its steps"
            return seen


def _kill_at_random(target, save_forever, check, rounds: int = 12) -> set[str]:
    seen = set()
    for _ in range(rounds):
        pid = os.fork()
        if pid == 0:
            try:
                save_forever(target)
            finally:
                os._exit(1)
        time.sleep(random.uniform(0.0, 0.25))  # a save takes ~10-100 ms: most kills land inside one
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(check(target))
    return seen


# --- adapters --------------------------------------------------------------------------------------------
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def _adapter(seed: int, alpha: float):
    """Old and new adapters share shapes: a mix would load silently as a wrong adapter."""
    model = _net()
    torch.manual_seed(seed)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=alpha, target_modules=["0", "2"],
                                                  init_lora_weights=False))
    return model


OLD, NEW = _adapter(1, 8), _adapter(2, 16)


def _which_adapter(directory) -> str:
    loaded = lorakit.load_adapter(_net(), directory)
    alpha = lorakit.get_config(loaded, "default").lora_alpha
    got = lorakit.adapter_state_dict(loaded)
    for label, model in (("old", OLD), ("new", NEW)):
        want = lorakit.adapter_state_dict(model)
        if alpha == lorakit.get_config(model, "default").lora_alpha and all(torch.equal(got[k], want[k]) for k in want):
            return label
    raise AssertionError(f"{directory} holds neither the old nor the new adapter (alpha {alpha})")


def _assert_no_litter_after_next_save(target, allowed):
    lorakit.save_adapter(NEW, target) if allowed == {target.name} else None
    assert {p.name for p in target.parent.iterdir()} == allowed


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "rename-aside"])
def test_adapter_save_killed_at_every_step(tmp_path, fallback):
    def prepare(k):
        target = tmp_path / str(k) / "adapter"
        lorakit.save_adapter(OLD, target)
        (target / "README.md").write_text("kept\n")  # a file the save does not write: carried over
        return target

    def check(target):
        label = _which_adapter(target)
        assert (atomic.readable(target) / "README.md").read_text() == "kept\n"
        lorakit.save_adapter(NEW, target)  # the next save recovers, cleans up, and still carries the README
        assert {p.name for p in target.parent.iterdir()} == {"adapter"}
        assert sorted(p.name for p in target.iterdir()) == ["README.md", "adapter_config.json",
                                                            "adapter_model.safetensors"]
        return label

    assert _kill_at_every_step(prepare, lambda t: lorakit.save_adapter(NEW, t), check, fallback) == {"old", "new"}


def test_adapter_saves_killed_at_random_moments(tmp_path):
    target = tmp_path / "adapter"
    lorakit.save_adapter(OLD, target)

    def save_forever(t):
        while True:
            for model in (NEW, OLD):
                lorakit.save_adapter(model, t)

    def check(t):
        label = _which_adapter(t)
        lorakit.save_adapter(OLD, t)
        assert {p.name for p in t.parent.iterdir()} == {"adapter"}
        return label

    assert _kill_at_random(target, save_forever, check) <= {"old", "new"}


# --- checkpoints --------------------------------------------------------------------------------------------
def _trainer(seed: int):
    from lorakit.train.checkpoint import save_checkpoint

    model = _adapter(seed, 8)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(torch.randn(4, 16)).sum().backward()
    optimizer.step()
    scheduler.step()
    return lambda out_dir, step: save_checkpoint(out_dir, step, model, optimizer, scheduler, [{"step": step}], [])


def test_checkpoint_save_killed_at_every_step(tmp_path):
    from lorakit.train.checkpoint import latest_checkpoint, read_state

    save_old, save_new = _trainer(1), _trainer(2)
    save_old(tmp_path / "template", 1)
    save_old(tmp_path / "template", 2)

    def prepare(k):
        return shutil.copytree(tmp_path / "template", tmp_path / str(k))

    def check(out):
        root = out / "checkpoints"
        steps = [p.name for p in sorted(root.glob("step-*"))]
        for name in steps:  # every checkpoint under its final name is complete
            read_state(root / name)
        label = {"step-0000002": "old", "step-0000004": "new"}[latest_checkpoint(out).name]
        save_new(out, 6)
        assert sorted(p.name for p in root.iterdir()) == ["step-0000004", "step-0000006"] if label == "new" else \
            sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000006"]
        return label

    assert _kill_at_every_step(prepare, lambda out: save_new(out, 4), check, fallback=False) == {"old", "new"}


def test_checkpoint_saves_killed_at_random_moments(tmp_path):
    from lorakit.train.checkpoint import read_state

    save = _trainer(1)
    out = tmp_path / "run"
    save(out, 1)

    def save_forever(o):
        step = 2
        while True:
            save(o, step)
            step += 1

    def check(o):
        root = o / "checkpoints"
        for p in root.glob("step-*"):
            read_state(p)  # complete
        save(o, 10_000)
        names = sorted(p.name for p in root.iterdir())
        assert len(names) == 2 and all(n.startswith("step-") for n in names) and names[-1] == "step-0010000"
        return "ok"

    assert _kill_at_random(out, save_forever, check, rounds=8) == {"ok"}


# --- merge output -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merged_pair(tmp_path_factory):
    """(base model dir, old merged model, new merged model) in memory, with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("merge")
    base = save_tiny_llama(root / "base")
    out = []
    for seed in (1, 2):
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(seed)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        out.append(lorakit.unload(model, merge=True))
    return base, AutoTokenizer.from_pretrained(base), out[0], out[1]


def test_merge_output_killed_at_every_step(tmp_path, merged_pair):
    from transformers import AutoModelForCausalLM

    from lorakit.cli.commands import write_merged

    _, tokenizer, old, new = merged_pair
    weights = {label: {k: v.clone() for k, v in m.state_dict().items()} for label, m in (("old", old), ("new", new))}

    template = write_merged(old, tokenizer, tmp_path / "template" / "merged")

    def prepare(k):
        return shutil.copytree(template, tmp_path / str(k) / "merged")

    def check(target):
        got = AutoModelForCausalLM.from_pretrained(atomic.readable(target)).state_dict()
        labels = [label for label, want in weights.items() if all(torch.equal(got[k], want[k]) for k in want)]
        assert len(labels) == 1, "the merged directory is a mix"
        write_merged(new, tokenizer, target)
        assert [p.name for p in target.parent.iterdir()] == ["merged"]
        return labels[0]

    assert _kill_at_every_step(prepare, lambda t: write_merged(new, tokenizer, t), check, fallback=False) == \
        {"old", "new"}


def test_merge_output_killed_at_random_moments(tmp_path, merged_pair):
    from transformers import AutoModelForCausalLM

    from lorakit.cli.commands import write_merged

    _, tokenizer, old, new = merged_pair
    weights = [{k: v.clone() for k, v in m.state_dict().items()} for m in (old, new)]
    target = write_merged(old, tokenizer, tmp_path / "merged")

    def save_forever(t):
        while True:
            for model in (new, old):
                write_merged(model, tokenizer, t)

    def check(t):
        got = AutoModelForCausalLM.from_pretrained(atomic.readable(t)).state_dict()
        assert sum(all(torch.equal(got[k], w[k]) for k in w) for w in weights) == 1, "the merged directory is a mix"
        write_merged(old, tokenizer, t)
        assert [p.name for p in t.parent.iterdir()] == ["merged"]
        return "ok"

    assert _kill_at_random(target, save_forever, check, rounds=8) == {"ok"}


def test_merge_never_replaces_a_directory_of_other_files(tmp_path, merged_pair):
    from lorakit.cli.commands import write_merged
    from lorakit.errors import OutputPathError

    _, tokenizer, old, _ = merged_pair
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine\n")
    with pytest.raises(OutputPathError, match="does not look like an earlier output"):
        write_merged(old, tokenizer, mine)
    assert [p.name for p in mine.iterdir()] == ["todo.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_a_stale_pickle_and_old_temp_files_are_dropped_other_files_kept(tmp_path):
    target = lorakit.save_adapter(OLD, tmp_path / "a")
    torch.save({"x": torch.zeros(1)}, target / "adapter_model.bin")
    (target / ".adapter_model.safetensors.k3j2.tmp").write_bytes(b"\0" * 64)  # an older lorakit's killed save
    (target / "sub").mkdir()
    (target / "sub" / "notes.txt").write_text("n\n")
    lorakit.save_adapter(NEW, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "sub"]
    assert (target / "sub" / "notes.txt").read_text() == "n\n"
    assert json.loads((target / "adapter_config.json").read_text())["lora_alpha"] == 16
    shutil.rmtree(target)
