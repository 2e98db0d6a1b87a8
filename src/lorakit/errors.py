"""lorakit's own exception types. Every user-facing failure raises one of these."""


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
