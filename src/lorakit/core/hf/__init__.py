"""transformers integration: an adapted `PreTrainedModel` answers transformers' own adapter API.

Nothing here imports transformers or peft at import time. `model.sync` gives an adapted HF model instance (never its
class) what transformers' PEFT integration checks and calls: `save_pretrained` writes the adapter in PEFT's layout,
`set_adapter` / `active_adapters` / `disable_adapters` / `enable_adapters` / `load_adapter` / `add_adapter` /
`delete_adapter` / `get_adapter_state_dict` route to lorakit. `trainer` lets `Trainer(resume_from_checkpoint=...)`
and `load_best_model_at_end` restore adapter-only checkpoints. `describe` fills task_type / auto_mapping.
"""
