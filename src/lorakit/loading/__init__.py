"""Loading what a run works on, for every command (`train`, `eval`, `generate`, `merge`, `compose`, `analyze`):

- models.py: Hugging Face models and tokenizers, GGUF files and the bundled model (converted once, cached);
- reading.py: data rows from JSONL/JSON/CSV/TSV files, each remembering its file and line (Row);
- checks.py: every row's format and fields checked before a model loads (DataError names file, line, field);
- rows.py: prompt formats and tokens with loss masks (Encoder); re-exports reading and checks.
"""

from .models import BUILTIN_MODEL, load_model, load_pretrained, load_tokenizer, pick_device, resolve_model
from .rows import (IGNORE, Encoder, Example, check_messages, check_rows, detect_format, encode_rows, label_names_of,
                   read_rows, render_prompt)

__all__ = ["BUILTIN_MODEL", "resolve_model", "load_tokenizer", "load_model", "load_pretrained", "pick_device",
           "IGNORE", "Example", "Encoder", "read_rows", "detect_format", "encode_rows", "label_names_of",
           "check_rows", "check_messages", "render_prompt"]
