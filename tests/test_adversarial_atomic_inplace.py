"""Writes other than a whole-directory swap, killed or failing: single files (metrics.json, options.json, reports)
read as the old text or the new one; an adapter saved in place (into the working directory or a folder of other
files) reads as old, absent or new, never a mix; and the writers' edge cases (links, files in the way, filesystem
errors, other hosts' leftovers, the umask). The kill helpers are test_adversarial_atomic's.
"""

from __future__ import annotations

import json
import os

import pytest

import lorakit
from lorakit.core import atomic
from test_adversarial_atomic import (KILLED, NEW, OLD, _in_child, _kill_at_every_step, _net,  # noqa: F401
                                     _which_adapter, no_disk_flush)  # no_disk_flush: autouse here too
from test_train_support import one_thread  # noqa: F401  (autouse)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="kills forked children")

# --- single files (metrics.json, options.json, reports) ----------------------------------------------------
def test_single_file_write_killed_at_every_step(tmp_path):
    """atomic.write_text: a reader sees the old text or the new one, whole; no temp file outlives the next write."""
    target = tmp_path / "metrics.json"
    old, new = json.dumps({"v": "old" * 1000}), json.dumps({"v": "new" * 1000})

    def prepare(k):
        atomic.write_text(target, old)
        return target

    def check(t):
        text = t.read_text()
        assert text in (old, new), "a half-written file"
        return "old" if text == old else "new"

    seen, k, code = set(), 0, KILLED
    while code == KILLED:  # kill before step 1, 2, ... until the write completes
        k += 1
        prepare(k)
        code = _in_child(lambda: atomic.write_text(target, new), kill_at=k)
        seen.add(check(target))
    assert code == 0 and k >= 3 and seen == {"old", "new"}
    atomic.write_text(target, old)
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # the killed writers' temp files are gone


def test_single_file_write_that_fails_leaves_the_old_file(tmp_path):
    target = tmp_path / "table.txt"
    atomic.write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic.write_file(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.txt"]


# --- saving in place: the working directory, a folder of other files -----------------------------------------
def test_save_into_the_working_directory_keeps_it(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    lorakit.save_adapter(OLD, ".")
    lorakit.save_adapter(NEW, ".")  # a directory swap would leave the process in a deleted directory
    assert os.path.samefile(os.getcwd(), work) and os.listdir(".") == os.listdir(work)
    assert _which_adapter(".") == "new"
    assert sorted(os.listdir(work)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_save_into_a_folder_of_other_files_writes_in_place(tmp_path, monkeypatch):
    target = lorakit.save_adapter(OLD, tmp_path / "ckpt")
    (target / "rng_state_1.pth").write_bytes(b"rank 1")
    inode = target.stat().st_ino
    swaps = []
    monkeypatch.setattr(atomic, "swap_in", lambda *a: swaps.append(a))
    lorakit.save_adapter(NEW, target)
    assert not swaps and target.stat().st_ino == inode  # the same directory, written file by file
    assert (target / "rng_state_1.pth").read_bytes() == b"rank 1" and _which_adapter(target) == "new"


def test_adapter_save_in_place_killed_at_every_step(tmp_path):
    """In place: a reader sees the old adapter whole, no adapter (no config: AdapterFormatError), or the new one
    whole, never new weights with an old config."""
    def prepare(k):
        target = tmp_path / str(k) / "ckpt"
        lorakit.save_adapter(OLD, target)
        (target / "optimizer.pt").write_bytes(b"another writer's file")
        return target

    def check(target):
        assert (target / "optimizer.pt").read_bytes() == b"another writer's file"
        if not (target / "adapter_config.json").exists():
            with pytest.raises(lorakit.AdapterFormatError, match="adapter_config.json"):
                lorakit.load_adapter(_net(), target)
            label = "absent"
        else:
            label = _which_adapter(target)
        lorakit.save_adapter(NEW, target)  # the next save cleans up the killed one's temp files
        assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                            "optimizer.pt"]
        return label

    assert _kill_at_every_step(prepare, lambda t: lorakit.save_adapter(NEW, t), check, False) == {"old", "absent",
                                                                                                    "new"}


def test_a_dangling_symlink_in_the_target_does_not_break_saves(tmp_path):
    target = lorakit.save_adapter(OLD, tmp_path / "a")
    os.symlink(tmp_path / "gone", target / "link")
    for model in (NEW, OLD):
        lorakit.save_adapter(model, target)
    assert os.path.islink(target / "link") and _which_adapter(target) == "old"
    atomic.fsync_tree(target)  # a link (dangling or not) is not opened


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_a_file_in_the_way_is_an_output_path_error_for_every_writer(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("keep")
    target = blocker if where == "file" else blocker / "sub" / "adapter"
    with pytest.raises(lorakit.OutputPathError, match="blocker"):
        lorakit.core.files.write_adapter_files(target, lorakit.adapter_state_dict(NEW), {"peft_type": "LORA"})
    with pytest.raises(lorakit.OutputPathError, match="blocker"):
        atomic.write_text(blocker / "x.json", "{}")
    assert blocker.read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["blocker"]


def test_an_unexpected_filesystem_error_names_the_output_path(tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lorakit.core.files.safetensors.torch, "save_file", full)
    with pytest.raises(lorakit.OutputPathError) as caught:
        lorakit.save_adapter(NEW, tmp_path / "out")
    assert str(tmp_path / "out") in str(caught.value) and "No space left" in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_only_this_hosts_leftovers_of_ended_saves_are_cleaned(tmp_path):
    """A pid means nothing on another host (a folder shared by containers or machines): its temp dirs stay."""
    ended = os.fork()
    if ended == 0:
        os._exit(0)
    os.waitpid(ended, 0)  # a pid that no process of this host has now
    ours = tmp_path / f".adapter.tmp-{atomic.temp_name('x').split('-')[1]}-{ended}-0a1b2c3d"  # this host's tag
    theirs = tmp_path / f".adapter.tmp-hotherhost-{ended}-0a1b2c3d"
    older = tmp_path / f".adapter.tmp-{ended}-0a1b2c3d"  # an older lorakit's name, without the host
    for d in (ours, theirs, older):
        d.mkdir()
    lorakit.save_adapter(NEW, tmp_path / "adapter")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["adapter", theirs.name])


def test_saves_never_toggle_the_process_umask(tmp_path, monkeypatch):
    """os.umask is process-wide: toggling it during a save races every other thread's file creation."""
    umask = os.umask(0o022)
    os.umask(umask)

    def refused(*a):
        raise AssertionError("os.umask called during a save")

    monkeypatch.setattr(os, "umask", refused)
    target = lorakit.save_adapter(NEW, tmp_path / "a")
    (target / "notes.txt").write_text("in place next time\n")
    lorakit.save_adapter(OLD, target)
    assert (target / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
