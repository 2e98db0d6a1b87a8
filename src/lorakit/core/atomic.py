"""Whole-directory atomic writes: a reader sees the old directory or the new one, complete, never a mix.

    with atomic_dir("out/adapter") as tmp:    # tmp = out/.adapter.tmp-h<host>-<pid>-<token>, same parent
        write files into tmp
    # on leaving the block: every file and tmp are fsynced, then tmp takes the target's place in one step

How the new directory takes the place of the old one. POSIX has no atomic "replace a non-empty directory"
(os.rename onto a directory only works when it is empty), so:

* the target does not exist: os.rename(tmp, target), atomic.
* it exists, on Linux: renameat2(RENAME_EXCHANGE) swaps the two names in one step (ext4, xfs, btrfs, tmpfs,
  overlayfs, ...); the old directory, now under the temp name, is then removed. A reader opening the target
  sees the old directory or the new one, never neither. The target stays an ordinary directory, so PEFT and
  Hugging Face load it as always (a symlink swapped with os.replace would also be atomic, but the adapter
  directory would become a symlink to a hidden sibling, which copies and uploads do not expect).
* elsewhere, or where the filesystem refuses the exchange: the old directory is renamed aside to
  `.<name>.old-<pid>-<token>`, then the new one renamed in. Between those two renames the target is absent;
  `readable(target)` (which load_adapter calls) then answers the aside copy, and the next save into the same
  parent renames an orphaned aside copy back first, so a kill at that moment loses nothing.

Temp and aside directories of saves that were killed (their process, on this host, is gone) are removed by the
next save into the same parent. A failed write (an exception in the block) removes its temp directory and leaves
the target as it was. A file in the way (the target, or a folder above it, is a file) is an OutputPathError
before anything is written, here and in write_file.

Replacing a whole directory is not always right: it cannot replace the working directory (the process would be
left in a deleted one), a mount point (EBUSY), a folder whose parent is read-only, or a folder other processes
write into meanwhile (their files would be lost). Writers that may meet those (adapter saves: core/writing.py)
write file by file with write_file instead, in an order that keeps every state a reader can see meaningful.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import Callable, Iterator, Union

from ..errors import OutputPathError

# .<name>.<kind>-h<host>-<pid>-<token>; names without the host tag are older lorakits' (taken as this host's)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<host>h[A-Za-z0-9]*)-)?(?P<pid>\d+)-[0-9a-f]+$")
# A pid means something only on its own host (and in its own pid namespace, which the host name tells apart for
# containers): leftovers of another host's saves are never taken for stale.
_HOST = "h" + re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:40]
_RENAME_EXCHANGE = 2  # linux/fs.h


def is_temp_name(name: str) -> bool:
    """Whether `name` is a save's temp or aside name (temp_name's)."""
    return _TEMP.match(name) is not None


def temp_name(name: str, kind: str = "tmp") -> str:
    """The hidden sibling name of a save in progress (kind "tmp") or of an old copy set aside ("old")."""
    return f".{name}.{kind}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def atomic_dir(target: Union[str, os.PathLike], carry: bool = False, drop: tuple[str, ...] = (),
               replace_ok: Callable[[Path], bool] = lambda old: True) -> Iterator[Path]:
    """Yield an empty temp directory next to `target`; when the block ends without an exception, make it
    `target` in one step (see the module docstring).

    Args:
        carry: after the block, hard-link (or copy) the entries of an existing target that the writer did not
            write, and that are not named in `drop`, into the new directory: other files survive a save.
        replace_ok: asked with an existing target before anything is written; False refuses to replace it.
    Raises:
        OutputPathError: the target exists and is not a directory, or replace_ok refused it."""
    target = Path(os.path.realpath(target))  # a symlinked target: replace the directory it points to
    parent = target.parent
    check_parents(target)
    parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    clean_stale(parent)
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"{target} exists and is not a directory")
    if target.is_dir() and not replace_ok(target):
        raise OutputPathError(f"{target} exists and does not look like an earlier output; pick a new path")
    tmp = parent / temp_name(target.name)
    tmp.mkdir()
    try:
        _match_mode(tmp, target)
        yield tmp
        if carry and target.is_dir():
            _carry(target, tmp, drop)  # after the writer: a linked file must never be written through
        fsync_tree(tmp)
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_parents(path: Union[str, os.PathLike]) -> None:
    """Raise OutputPathError when `path` cannot become a directory or hold a file because the nearest existing
    folder above it is a file (mkdir would raise NotADirectoryError or FileExistsError halfway)."""
    path = Path(path)
    existing = next((p for p in path.parents if os.path.lexists(p)), None)
    if existing is not None and not existing.is_dir():
        raise OutputPathError(f"cannot write {path}: {existing} exists and is not a directory")


def swap_in(tmp: Path, target: Path) -> None:
    """Make the complete directory `tmp` (same parent) the `target`, then remove the old target."""
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    if _exchange(tmp, target):  # tmp now holds the old directory
        fsync_dir(target.parent)
        remove_dir(tmp)
        return
    aside = target.parent / temp_name(target.name, "old")
    os.rename(target, aside)  # from here until the next rename the target is absent: see readable()
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(aside, target)  # put the old one back; the caller removes tmp
        raise
    fsync_dir(target.parent)
    remove_dir(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux renameat2); False where that is not available."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # this filesystem can't: fall back
        return False
    raise OSError(err, os.strerror(err), str(b))


def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway leaves no half-deleted directory under its name: it is
    renamed to a temp name first (removed by the next save if the kill comes during the rmtree)."""
    path = Path(path)
    if not path.exists():
        return
    if not _TEMP.match(path.name):
        hidden = path.parent / temp_name(path.name)
        os.rename(path, hidden)
        path = hidden
    shutil.rmtree(path, ignore_errors=True)


# --- readers and leftovers ------------------------------------------------------------------------------
def _leftovers(parent: Path, kind: str, name: str = None) -> list[Path]:
    """Temp ("tmp") or aside ("old") directories in `parent` (of `name` only, if given), newest first."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    found = []
    for p in entries:
        m = _TEMP.match(p.name)
        if m and m["kind"] == kind and (name is None or m["name"] == name):
            found.append(p)
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:  # removed meanwhile by another save
        return 0


def readable(target: Union[str, os.PathLike]) -> Path:
    """The directory a reader should open for `target`: the target itself, or, in the instant of a fallback
    swap (or after a kill in it) when the target is absent, the complete old copy set aside."""
    target = Path(target)
    if target.exists():
        return target
    aside = _leftovers(target.parent, "old", target.name)
    return aside[0] if aside else target


def recover(target: Path) -> None:
    """After a kill between the two renames of a fallback swap: put the old copy set aside back."""
    if target.exists():
        return
    for aside in _leftovers(target.parent, "old", target.name):
        if _stale(_TEMP.match(aside.name)):
            os.rename(aside, target)
            return


def clean_stale(parent: Path) -> None:
    """Remove temp and aside directories (and single-file temps, see write_file) left in `parent` by saves whose
    process is gone (killed). A pid reused by another process keeps its leftovers until that process ends too;
    another host's leftovers (a folder shared between machines or containers) are left alone."""
    for kind in ("tmp", "old"):
        for p in _leftovers(parent, kind):
            m = _TEMP.match(p.name)
            if kind == "old" and not (parent / m["name"]).exists():
                continue  # the only copy of that directory: recover() puts it back
            if _stale(m):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _stale(m: re.Match) -> bool:
    """Whether the save that named this leftover is gone: it ran on this host and its process has ended."""
    if m["host"] is not None and m["host"] != _HOST:
        return False  # os.kill cannot tell about another host's processes
    return not _alive(int(m["pid"]))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


# --- durability -----------------------------------------------------------------------------------------
def fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory bottom-up (their entries), so that a crash
    after the rename cannot expose a directory whose files are still empty. Other entries (symlinks, a dangling
    one included, FIFOs, sockets) are not opened: they hold no data of ours, and opening a FIFO would block."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for f in filenames:
            path = os.path.join(dirpath, f)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _fsync_path(path, os.O_RDONLY)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
    """fsync a directory's entries (where the platform allows opening a directory)."""
    if hasattr(os, "O_DIRECTORY"):
        _fsync_path(str(path), os.O_RDONLY | os.O_DIRECTORY)


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _match_mode(tmp: Path, target: Path) -> None:
    # mkdir honours the umask already; keep an existing target's own permissions
    if target.is_dir():
        os.chmod(tmp, target.stat().st_mode & 0o7777)


def _carry(old: Path, new: Path, drop: tuple[str, ...]) -> None:
    """Entries of `old` missing from `new` as hard links (no data copied), or copies where links are refused."""
    for entry in old.iterdir():
        dest = new / entry.name
        if entry.name in drop or os.path.lexists(dest):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, dest, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src, dst) -> None:
    try:
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        else:
            os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --- single files ----------------------------------------------------------------------------------------
def write_file(path: Union[str, os.PathLike], write: Callable[[Path], None]) -> Path:
    """Write one file whole: `write(tmp)` fills a hidden temp file in the same directory, which is fsynced and
    renamed onto `path` (os.replace is atomic for files). A reader sees the old file or the new one."""
    path = Path(path)
    check_parents(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write the file {path}: a directory of that name exists")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    tmp = path.parent / temp_name(path.name)
    try:
        write(tmp)
        _fsync_path(str(tmp), os.O_RDONLY)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_text(path: Union[str, os.PathLike], text: str) -> Path:
    """`write_file` for a UTF-8 text (metrics.json, options.json, reports)."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
