"""The prompt template a model was trained with, saved beside it so evaluation prompts it the same way.

Saved as ``prompt_template.json`` in the adapter / merged-model folder:

    {"name": "alpaca", "template": "Below is an instruction ...{instruction}...### Response:"}

``template`` holds ``{instruction}`` exactly once. ``name == "chat"`` (template null) means the model was trained
on conversations and is prompted through the tokenizer's chat template.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

FILENAME = "prompt_template.json"
PLACEHOLDER = "{instruction}"

# The instruction format of the PiSSA / BA-LoRA releases (Alpaca's, without input).
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# Alpaca's variant for rows that carry an extra input.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    template: str | None = None

    def __post_init__(self):
        if self.name != "chat" and (self.template is None or self.template.count(PLACEHOLDER) != 1):
            raise ValueError(f"Prompt template {self.name!r} must contain {PLACEHOLDER} exactly once.")

    @property
    def is_chat(self) -> bool:
        return self.name == "chat"

    def render(self, instruction: str, tokenizer=None) -> str:
        """The prompt text for one instruction (no completion)."""
        if self.is_chat:
            if tokenizer is None or tokenizer.chat_template is None:
                raise ValueError("This model was trained on conversations: rendering needs a tokenizer with a chat template.")
            return tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
            )
        # str.replace, not str.format: instructions and templates may hold literal braces (code, LaTeX).
        return self.template.replace(PLACEHOLDER, instruction)

    def save(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, FILENAME)
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)
        return path

    @classmethod
    def load(cls, directory: str) -> "PromptTemplate | None":
        """The template saved in ``directory``, or None if the folder has none."""
        path = os.path.join(directory, FILENAME)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            data = json.load(f)
        return cls(name=data["name"], template=data.get("template"))


DEFAULT = PromptTemplate("alpaca", ALPACA)
CHAT = PromptTemplate("chat", None)
