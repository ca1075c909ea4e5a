"""Turn questions (and earlier turns) into model input exactly as the model was trained to read them.

Priority: the ``prompt_template.json`` saved beside the model by training (:class:`balora_trl.prompts.PromptTemplate`);
else the tokenizer's chat template; else the bare question. A prompt is either a string (fed as-is) or a list of
chat messages (rendered by the backend's tokenizer, or sent to a chat endpoint).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from balora_trl.prompts import PLACEHOLDER, PromptTemplate

Prompt = str | list[dict]


class PromptFormatter:
    """``mode`` is 'template' (saved non-chat template), 'chat' (messages) or 'raw' (the question itself)."""

    def __init__(self, template: PromptTemplate | None, has_chat_template: bool):
        self.template = template
        if template is not None:
            self.mode = "chat" if template.is_chat else "template"
        else:
            self.mode = "chat" if has_chat_template else "raw"

    @classmethod
    def for_model(cls, model_dir: str | None, tokenizer=None, assume_chat: bool = False) -> "PromptFormatter":
        """``assume_chat``: no tokenizer here (a remote server) — let the server's chat template do it."""
        template = PromptTemplate.load(model_dir) if model_dir else None
        has_chat = assume_chat if tokenizer is None else getattr(tokenizer, "chat_template", None) is not None
        return cls(template, has_chat)

    def build(self, turns: Sequence[str], answers: Sequence[str] = (), suffix: str = "") -> Prompt:
        """The prompt for the last of ``turns``, given the model's ``answers`` to the earlier ones.

        Template mode concatenates rendered turns, each earlier one followed by its answer and a blank line: the
        training format only defines one turn, and this is its natural continuation. ``suffix`` is appended to the
        text prompt (the authors' "### Response: Let's think step by step."); a chat prompt has no text to extend.
        """
        if len(answers) != len(turns) - 1:
            raise ValueError("Need exactly one answer per earlier turn.")
        if suffix and self.mode == "chat":
            raise ValueError(f"This protocol appends {suffix.strip()!r} to a text prompt, but this model is prompted "
                             f"through a chat template; use the default protocol.")
        if self.mode == "chat":
            messages = []
            for i, turn in enumerate(turns):
                messages.append({"role": "user", "content": turn})
                if i < len(answers):
                    messages.append({"role": "assistant", "content": answers[i]})
            return messages
        render = self.template.render if self.mode == "template" else (lambda q: q)
        text = ""
        for i, turn in enumerate(turns):
            text += render(turn)
            if i < len(answers):
                text += answers[i] + "\n\n"
        return text + suffix

    def stop_strings(self) -> list[str]:
        """Template mode: the header line that opens a new instruction (Alpaca: '### Instruction:') ends an answer."""
        if self.mode != "template":
            return []
        header = self.template.template.split(PLACEHOLDER)[0].rstrip("\n").rsplit("\n", 1)[-1].strip()
        return ["\n" + header] if header else []

    def describe(self) -> dict:
        if self.template is not None:
            return {"mode": self.mode, "name": self.template.name, "template": self.template.template}
        return {"mode": self.mode}


def display(prompt: Prompt, tokenizer=None) -> str:
    """The prompt as text, for the per-sample log."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is not None and getattr(tokenizer, "chat_template", None) is not None:
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return json.dumps(prompt, ensure_ascii=False)
