"""What adapter_config.json says about the base model, so that PEFT's AutoPeftModel classes can load the directory:
PEFT's task_type inferred from the model class, else PEFT's auto_mapping (the class to build the base from)."""

from __future__ import annotations

import sys
from typing import Optional

from ..config import CLASSIFIER_HEADS

# Class-name endings → PEFT's TaskType names. ForConditionalGeneration depends on the architecture (below).
_TASK_BY_SUFFIX = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)


def is_hf_model(model) -> bool:
    """True for a transformers PreTrainedModel (checked without importing transformers)."""
    mixin = sys.modules.get("transformers.integrations.peft")
    return mixin is not None and isinstance(model, mixin.PeftAdapterMixin)


def task_type_of(model, modules_to_save: Optional[list] = None) -> Optional[str]:
    """PEFT's task_type for this HF model's class (CausalLM → CAUSAL_LM, SequenceClassification → SEQ_CLS, a bare
    encoder → FEATURE_EXTRACTION, ...); None for other models. SEQ_CLS only when the classifier head is saved with
    the adapter: reading SEQ_CLS makes PEFT and lorakit expect the head's tensors in the file."""
    if not is_hf_model(model):
        return None
    name = type(model).__name__
    for suffix, task in _TASK_BY_SUFFIX:
        if name.endswith(suffix):
            if task == "SEQ_CLS" and not set(modules_to_save or ()) & set(CLASSIFIER_HEADS):
                return None
            return task
    if name.endswith("ForConditionalGeneration"):
        return "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM"
    if name.endswith("Model") and "For" not in name:
        return "FEATURE_EXTRACTION"
    return None


def describe_base(model, data: dict) -> dict:
    """Fill adapter_config.json's task_type (when the config has none) and, failing that, PEFT's auto_mapping for an
    HF model. Returns `data`, changed in place."""
    if data.get("task_type") is None:
        data["task_type"] = task_type_of(model, data.get("modules_to_save"))
    if data.get("task_type") is None and data.get("auto_mapping") is None and is_hf_model(model):
        data["auto_mapping"] = {"base_model_class": type(model).__name__, "parent_library": type(model).__module__}
    return data
