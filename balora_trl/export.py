"""The adapter lifecycle, re-exported from the modules that implement it (the names importable from here before).

Three forms of a trained BA-LoRA model exist on disk:

* **Checkpoints** (``checkpoint-N/``): the trained parameterisation plus the frozen initial adapter, so training
  resumes exactly — :mod:`balora_trl.checkpoints` (the trainers' save mix-in, atomic folders).
* **The final output** (``trainer.save_model(dir)``, ``trainer.push_to_hub()``): a standard PEFT adapter for the
  *original* base; PiSSA/OLoRA converted to a rank-2r LoRA — :mod:`balora_trl.conversion`; its
  ``balora_config.json`` and model card — :mod:`balora_trl.model_card`.
* **Merged checkpoints** (``balora merge`` / :func:`merge`): plain sharded safetensors for transformers and
  ``vllm serve`` — :mod:`balora_trl.merging`.
"""

from .checkpoints import BALoraSaveMixin, atomic_directory
from .conversion import (
    ADAPTER_BIN_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BALORA_CONFIG_FILE,
    DETERMINISTIC_RESIDUAL_INITS,
    INITIAL_ADAPTER_FILE,
    RESIDUAL_INITS,
    TRAINER_STATE_FILE,
    initial_adapter_from_dir,
    residual_to_lora,
    rewrites_base_weights,
    standard_adapter_from_dir,
    write_adapter,
)
from .merging import DTYPES, chat_template_from_prompt, merge, merge_cli, push_folder, validate_base
from .model_card import BALORA_PAPER, ExportInfo, balora_card_section, balora_metadata, build_model_card

__all__ = [
    "ADAPTER_BIN_FILE", "ADAPTER_CONFIG_FILE", "ADAPTER_WEIGHTS_FILE", "BALORA_CONFIG_FILE", "BALORA_PAPER",
    "DETERMINISTIC_RESIDUAL_INITS", "DTYPES", "INITIAL_ADAPTER_FILE", "RESIDUAL_INITS", "TRAINER_STATE_FILE",
    "BALoraSaveMixin", "ExportInfo", "atomic_directory", "balora_card_section", "balora_metadata", "build_model_card",
    "chat_template_from_prompt", "initial_adapter_from_dir", "merge", "merge_cli", "push_folder", "residual_to_lora",
    "rewrites_base_weights", "standard_adapter_from_dir", "validate_base", "write_adapter",
]
