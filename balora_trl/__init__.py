"""balora-trl: BA-LoRA (Bias-Alleviating Low-Rank Adaptation, arXiv 2408.04556) for TRL.

    from balora_trl import BALoraConfig, BALoraSFTTrainer

used exactly like TRL's ``SFTConfig`` / ``SFTTrainer``.
"""

from .config import BALoraConfig, BALoraNLUConfig
from .trainer import BALoraSFTTrainer

__all__ = ["BALoraConfig", "BALoraNLUConfig", "BALoraSFTTrainer"]
__version__ = "0.1.0"
