"""Loading what a run works on, for every command (`train`, `eval`, `generate`, `merge`, `compose`, `analyze`):

- models.py: Hugging Face models and tokenizers, GGUF files and the bundled model (converted once, cached);
- rows.py: data rows from JSONL/JSON/CSV/TSV, their format, and their tokens with loss masks (Encoder).
"""

from .models import BUILTIN_MODEL, load_model, load_pretrained, load_tokenizer, pick_device, resolve_model
from .rows import IGNORE, Encoder, Example, detect_format, encode_rows, label_names_of, read_rows

__all__ = ["BUILTIN_MODEL", "resolve_model", "load_tokenizer", "load_model", "load_pretrained", "pick_device",
           "IGNORE", "Example", "Encoder", "read_rows", "detect_format", "encode_rows", "label_names_of"]
