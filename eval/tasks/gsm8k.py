"""GSM8K accuracy: the final number of a solution, compared as a number.

Extraction, first that matches: MetaMath's "The answer is: N" (the format BA-LoRA/PiSSA models are trained on),
GSM8K's "#### N", else the last number in the text. Comparison is exact over rationals, so "1,000" == "1000",
"0.50" == "1/2" == "\\frac{1}{2}", "$18.00" == "18".
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..data import hub_rows, limit_rows, read_rows
from .base import Task

HUB = ("openai/gsm8k", "main", "test")

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER = re.compile(rf"-?(?:{_UNSIGNED})(?:\s*/\s*(?:{_UNSIGNED}))?")
_MARKERS = (re.compile(r"The answer is:?", re.IGNORECASE), re.compile(r"####"))
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")


def _clean(text: str) -> str:
    text = _FRAC.sub(r"\1/\2", text)
    return re.sub(r"(?<=\d)\s*\\?%", "", text).replace("$", "").replace("\\!", "")


def extract_answer(text: str) -> str | None:
    """The answer string of a solution (see module docstring), or None when it holds no number."""
    text = _clean(text)
    for marker in _MARKERS:
        hits = list(marker.finditer(text))
        if hits:
            tail = text[hits[-1].end():]
            match = NUMBER.search(tail.split("\n\n")[0])
            if match:
                return match.group(0)
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else None


def to_number(text: str | None) -> Fraction | None:
    if text is None:
        return None
    text = text.replace(",", "").replace(" ", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def is_correct(prediction: str | None, gold: str) -> bool:
    predicted, expected = to_number(prediction), to_number(gold)
    return predicted is not None and expected is not None and predicted == expected


def gold_answer(solution: str) -> str:
    """The number after '####' in a GSM8K reference solution."""
    return solution.split("####")[-1].strip()


class GSM8K(Task):
    name = "gsm8k"
    max_new_tokens = 512

    def load(self):
        rows = read_rows(self.data_file) if self.data_file else hub_rows(self.dataset or HUB[0], *HUB[1:])
        samples = []
        for i, row in enumerate(rows):
            question = row.get("question") or row.get("query") or row["problem"]
            answer = str(row["answer"])
            samples.append({"id": str(row.get("id", i)), "question": question,
                            "gold": gold_answer(answer) if "####" in answer else answer})
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        return sample["question"]

    def score(self, samples, generations):
        records = []
        for sample, generation in zip(samples, generations):
            extracted = extract_answer(generation)
            correct = is_correct(extracted, sample["gold"])
            records.append({"extracted": extracted, "gold": sample["gold"], "correct": correct,
                            "verdict": "correct" if correct else "wrong"})
        return records
