"""Where `lorakit train` puts things in its output directory, for the commands that read a run back
(eval, merge, info, export, serve): kept apart from the training code so that they import nothing heavy."""

from __future__ import annotations

from pathlib import Path

from ..errors import AdapterFormatError

ADAPTER_DIR = "adapter"  # the adapter inside a run's output directory


def adapter_dir(path: str) -> Path:
    """An adapter directory, or a `lorakit train` output directory holding one in adapter/.

    Args:
        path: either directory.

    Returns:
        The directory holding adapter_config.json. Raises AdapterFormatError when neither does.
    """
    p = Path(path)
    for candidate in (p, p / ADAPTER_DIR):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise AdapterFormatError(f"{p} is not an adapter directory (no adapter_config.json in it or in {p / ADAPTER_DIR})")
