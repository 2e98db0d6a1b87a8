"""`lorakit export`: an adapter as a merged GGUF model, as a llama.cpp LoRA GGUF, or checked and converted for
vLLM / SGLang. Every input is checked before anything heavy loads; every output appears whole (core/atomic.py).

    lorakit export run/ --format gguf --outtype q8_0 --output model.gguf      # llama.cpp / Ollama
    lorakit export run/ --format gguf-adapter --output adapter.gguf           # llama-cli -m base.gguf --lora ...
    lorakit export run/ --for vllm --output vllm-adapter/                     # vLLM's LoRA loader rules
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from ..core.atomic import write_file
from ..core.files import read_config
from ..errors import ConfigError
from .gguf_model import BYTES_PER_WEIGHT, check_gguf_output, copy_tokenizer_fields, family_of, fill_writer, write_gguf
from .gguf_vocab import add_vocab
from ..train.layout import adapter_dir
from .merged import base_config, merged_model, source_gguf


@dataclass
class ExportOptions:
    """Options of `lorakit export`."""

    adapter: Optional[str] = field(default=None, metadata={"positional": True})
    """Adapter directory (or a `lorakit train` output directory) to export."""
    format: Literal["gguf", "gguf-adapter"] = "gguf"
    """gguf: the adapter merged into its base, one GGUF file for llama.cpp / Ollama (an NF4-trained run is merged
    onto the NF4 base it trained on, dequantised). gguf-adapter: the adapter alone, as llama.cpp's
    convert_lora_to_gguf.py writes it (llama-cli --lora). Ignored with --for."""
    for_engine: Optional[Literal["vllm", "sglang"]] = field(default=None, metadata={"flag": "--for"})
    """Check and convert the adapter for a serving engine's LoRA loader instead (a PEFT directory at --output):
    DoRA and other variants become a plain LoRA fitted by SVD, ranks above --max-rank are truncated (errors
    reported), target_modules become leaf names; modules_to_save are refused unless --drop-modules-to-save."""
    model: Optional[str] = None
    """Base model: a Hugging Face directory, a .gguf file, a bundled model name or a hub name. Default: the
    adapter's base_model_name_or_path, else the bundled SmolLM2."""
    outtype: Literal["f32", "f16", "bf16", "q8_0"] = "f16"
    """GGUF tensor type of the 2-D weights (norms and biases stay f32; rows q8_0 cannot block fall back to f16)."""
    output: Optional[str] = None
    """The .gguf file to write (--format), or the adapter directory to write (--for)."""
    max_rank: int = 0
    """--for: the largest rank the engine is started with (vLLM --max-lora-rank, SGLang --max-lora-rank); 0: the
    engine's default (vLLM: 16; SGLang: no limit)."""
    drop_modules_to_save: bool = False
    """--for: leave modules_to_save (whole trained copies of layers such as lm_head) out of the converted
    adapter instead of refusing; the report says what the output then lacks."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_export(options: ExportOptions) -> int:
    """`lorakit export`: see the module docstring."""
    if not options.adapter:
        raise ConfigError("give the adapter directory: lorakit export ADAPTER_DIR --output FILE")
    if not options.output:
        raise ConfigError("give --output (a .gguf file, or a directory with --for)")
    adapter = adapter_dir(options.adapter)
    read_config(adapter)  # a bad config fails here, before any model loads
    if options.for_engine:
        from .engines import convert_for_engine

        report = convert_for_engine(adapter, options.for_engine, Path(options.output), max_rank=options.max_rank,
                                    drop_modules_to_save=options.drop_modules_to_save, model=options.model, log=_log)
        print(report.describe())
        return 0
    if options.format == "gguf-adapter":
        from .gguf_adapter import export_adapter_gguf

        out, count = export_adapter_gguf(adapter, Path(options.output), model=options.model,
                                         outtype=options.outtype, log=_log)
        print(f"wrote {out}: {count} LoRA tensors (llama.cpp adapter GGUF; use with llama-cli --lora {out.name})")
        return 0
    out, count = export_merged_gguf(adapter, Path(options.output), options.model, options.outtype)
    print(f"wrote {out}: {count} tensors, {options.outtype} (merged model GGUF for llama.cpp / Ollama)")
    return 0


def export_merged_gguf(adapter: Path, output: Path, model: Optional[str], outtype: str,
                       log=_log) -> tuple[Path, int]:
    """Merge `adapter` into its base and write one GGUF file, atomically.

    Args:
        adapter: the adapter directory (an NF4-trained run's adapter merges onto its dequantised NF4 base).
        output: the .gguf file.
        model: the base model (None: the adapter's base_model_name_or_path, else the bundled SmolLM2).
        outtype: f32, f16, bf16 or q8_0.
        log: where the memory line and progress go.

    Returns:
        (the written path, the number of tensors).
    """
    check_gguf_output(output)
    base_config(adapter, model, log)  # an unsupported architecture fails before any weight loads
    merged, tokenizer, base_path, base_name, _ = merged_model(adapter, model, log,
                                                              output_bytes=BYTES_PER_WEIGHT[outtype])
    label = adapter.parent.name if adapter.name == "adapter" else adapter.name
    return write_merged_gguf(merged, tokenizer, base_path, base_name, output, outtype,
                             name=f"{Path(str(base_name)).name} + {label}")


def write_merged_gguf(merged, tokenizer, base_path: str, base_name: str, output: Path, outtype: str,
                      name: str) -> tuple[Path, int]:
    """Write a merged (plain Hugging Face) model as one GGUF file, atomically; its tokenizer comes from the
    base's GGUF file where the base was loaded from one, else from `tokenizer` and the files in `base_path`.

    Args:
        merged: the model (llama / mistral / qwen2 / qwen3 architecture), no lorakit modules left in it.
        tokenizer: its Hugging Face tokenizer.
        base_path: the base model's local directory (tokenizer.json, tokenizer_config.json, chat template).
        base_name: the base as named by the user (a bundled name or a .gguf path selects the GGUF's tokenizer).
        output: the .gguf file.
        outtype: f32, f16, bf16 or q8_0.
        name: general.name.

    Returns:
        (the written path, the number of tensors).
    """
    import gguf

    check_gguf_output(output)
    family = family_of(merged.config)
    source = source_gguf(base_name)

    def add_tokenizer(writer) -> None:
        if source is not None:  # the base came from a GGUF: its tokenizer fields as llama.cpp wrote them
            copy_tokenizer_fields(source, writer)
        else:
            add_vocab(writer, tokenizer, Path(base_path), merged.config.model_type, merged.config.vocab_size,
                      llama_arch=family.arch == "LLAMA")

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, family.arch)])
    count = fill_writer(writer, merged, outtype, name, add_tokenizer)
    return write_file(output, lambda tmp: write_gguf(writer, tmp)), count
