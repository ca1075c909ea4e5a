"""MATH accuracy: the model's final answer, checked for mathematical equivalence by ``math-verify``.

The answer is the last ``\\boxed{...}`` (``\\fbox``) of the generation, else MetaMath's "The answer is: X", else
whatever math-verify finds in the whole text. The gold answer is the dataset's ``answer`` field or the last boxed
expression of its reference ``solution``. Default data: the 5,000-problem MATH test set (EleutherAI/hendrycks_math,
all seven subjects); ``--dataset HuggingFaceH4/MATH-500`` or ``--data_file`` for others.
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

from ..data import hub_rows, limit_rows, read_rows
from .base import Task

HUB = "EleutherAI/hendrycks_math"
SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
            "prealgebra", "precalculus")
_ANSWER_IS = re.compile(r"The answer is:?\s*(.+)", re.IGNORECASE)


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces respected), or ``\\boxed 5``."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if i < len(text) and text[i] == " ":  # \boxed 5
        match = re.match(r" +([^\s$]+)", text[i:])
        return match.group(1) if match else None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None  # unbalanced: cut off by the token limit


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hits = _ANSWER_IS.findall(text)
    if hits:
        return hits[-1].strip().rstrip(".").strip("$ ")
    return None


def _timeouts() -> dict:
    # math-verify's timeouts use SIGALRM, which only the main thread may set.
    if threading.current_thread() is threading.main_thread():
        return {}
    return {"parse": {"parsing_timeout": None}, "verify": {"timeout_seconds": None}}


def is_equivalent(prediction: str | None, gold: str, generation: str = "") -> bool:
    kw = _timeouts()
    gold_parsed = parse(f"${gold}$", **kw.get("parse", {}))
    target = parse(f"${prediction}$" if prediction is not None else generation, **kw.get("parse", {}))
    return bool(gold_parsed) and bool(target) and verify(gold_parsed, target, **kw.get("verify", {}))


class MATH(Task):
    name = "math"
    max_new_tokens = 1024

    def load(self):
        if self.data_file:
            rows = read_rows(self.data_file)
        elif self.dataset:
            rows = hub_rows(self.dataset, split="test")
        else:
            rows = [row for subject in SUBJECTS for row in hub_rows(HUB, subject, "test")]
        samples = []
        for i, row in enumerate(rows):
            gold = row.get("answer")
            if gold is None:
                gold = last_boxed(row["solution"])
            if gold is None:
                raise ValueError(f"MATH row {i} has no 'answer' and no boxed answer in its 'solution'.")
            sample_id = row.get("unique_id") or row.get("id") or i
            samples.append({"id": str(sample_id), "problem": row["problem"], "gold": str(gold).strip(),
                            "level": row.get("level"), "type": row.get("type") or row.get("subject")})
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        return sample["problem"]

    def score(self, samples, generations):
        records = []
        for sample, generation in zip(samples, generations):
            extracted = extract_answer(generation)
            correct = is_equivalent(extracted, sample["gold"], generation)
            records.append({"extracted": extracted, "gold": sample["gold"], "correct": correct,
                            "verdict": "correct" if correct else "wrong", "type": sample["type"],
                            "level": sample["level"]})
        return records
