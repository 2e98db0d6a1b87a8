"""lorakit's own exception types, all in one place. Every user-facing failure raises one of these."""


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A config that is invalid, or asks for something lorakit does not support."""


class TargetError(LorakitError, ValueError):
    """target_modules match no module, or match a module type that cannot be adapted."""


class AdapterNameError(LorakitError, ValueError):
    """An adapter name that is unknown, already taken, or not a valid name."""


class AdapterFormatError(LorakitError, ValueError):
    """An adapter directory or file that is missing, corrupt, or does not fit the model."""


class ShapeMismatchError(AdapterFormatError):
    """Saved tensors whose shapes do not fit the model (usually: a different base model)."""


class QuantizedBaseError(ConfigError):
    """An operation that would write a quantized (4-bit) base weight, which lorakit does not do silently."""


class MixedBatchError(LorakitError, ValueError):
    """A mixed batch lorakit cannot run as asked (merged adapters, a batch that does not fit the names...)."""


class HotSwapError(LorakitError, ValueError):
    """An adapter that cannot replace the loaded one in place (see lorakit.hot_swap)."""


class DataError(LorakitError, ValueError):
    """A training or evaluation data file that cannot be read as asked; the message names file, line and field."""


class CheckpointError(LorakitError, ValueError):
    """A training checkpoint that is missing, corrupt, or does not fit the run that resumes from it."""


class OutputPathError(LorakitError, ValueError):
    """An output path lorakit cannot or will not write to: a file in the way, a directory holding something else, or
    a filesystem error while writing (disk full, permissions; the OSError is the __cause__)."""


class ServeError(LorakitError, ValueError):
    """`lorakit serve` cannot serve what was asked: an adapter it cannot stack (no low-rank linear form, trained
    biases, modules_to_save), no free adapter slot, a model whose attention it cannot batch, a bad option."""
