"""balora-trl: BA-LoRA (Bias-Alleviating Low-Rank Adaptation, arXiv 2408.04556) for TRL.

    from balora_trl import BALoraConfig, BALoraSFTTrainer

used exactly like TRL's ``SFTConfig`` / ``SFTTrainer``. Names are imported on first use (PEP 562), so tools that
need only a small part of the package (the evaluation harness, ``balora --help``) do not pay for TRL's import.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "BALoraConfig": ".config",
    "BALoraNLUConfig": ".config",
    "BALoraSFTTrainer": ".trainer",
    "BALoraTrainer": ".nlu",
    "merge": ".merging",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'balora_trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
