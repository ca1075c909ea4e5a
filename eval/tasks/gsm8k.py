"""GSM8K accuracy under two named protocols, both computed on every generation.

``default`` (lenient, clean): the prompt is the model's training prompt; the answer is MetaMath's "The answer is: N"
(the format BA-LoRA/PiSSA models are trained on), else GSM8K's "#### N", else the last number in the text; it is
compared exactly over rationals, so "1,000" == "1000", "0.50" == "1/2" == "\\frac{1}{2}", "$18.00" == "18".

``authors``: the BA-LoRA release's own evaluation pipeline, the one its run script ``scripts/ba-lora.sh`` chains
after training (github.com/llm172/BA-LoRA, ``utils/gen_vllm.py`` then ``utils/test_acc.py`` at commit 2829797):
the training prompt as it is ("### Response:", no suffix), 1024 new tokens, no stop strings, greedy; only text after
the last "The answer is: " counts, its first number (``[-+]?\d*[.,/]?\d+``) is rounded to an integer (Python's
``round``: 17.6 counts for 18, 2.5 for 2) and must equal the gold number exactly (``test_acc.py``).

``authors_inference``: the release's other GSM8K script, ``inference/gsm8k_inference.py`` (MetaMath's): the prompt
ends with "### Response: Let's think step by step.", 1024 new tokens, stops at "Instruction:", "Instruction",
"Response:", "Response"; same extraction, but a prediction also counts when ``grader.math_equal`` accepts it: for
numbers, within a relative 1e-4 of the gold, of gold / 100 or of gold x 100 (:func:`math_equal_numbers`).

The protocol chosen for a run sets the prompt and the headline number; the other protocol's extraction is applied to
the same generations too, so both accuracies are in the summary.

Data: the GSM8K test split (1,319 problems, MIT) ships in ``eval/data/gsm8k_test.jsonl``: no download.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from ..benchmark_rows import limit_rows, packaged, read_rows
from .base import Task

PACKAGED = "gsm8k_test.jsonl"

_UNSIGNED = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
NUMBER = re.compile(rf"-?(?:{_UNSIGNED})(?:\s*/\s*(?:{_UNSIGNED}))?")
_MARKERS = (re.compile(r"The answer is:?", re.IGNORECASE), re.compile(r"####"))
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")
AUTHORS_MARKER = "The answer is: "
_AUTHORS_NUMBER = re.compile(r"[-+]?\d*[.,/]?\d+")


def _clean(text: str) -> str:
    text = _FRAC.sub(r"\1/\2", text)
    return re.sub(r"(?<=\d)\s*\\?%", "", text).replace("$", "").replace("\\!", "")


def extract_answer(text: str) -> str | None:
    """The answer string of a solution under the default protocol, or None when it holds no number."""
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


def authors_extract(text: str) -> int | None:
    """The authors' ``extract_answer_number``: the rounded first number after the last "The answer is: ".

    A fraction a/b is a/b rounded (a/0 gives round(a)); commas are dropped ("1,000" -> 1000, but their pattern
    stops "1,234,567" at "1,234"); no marker, no number or an infinite one gives None.
    """
    parts = text.split(AUTHORS_MARKER)
    if len(parts) < 2:
        return None
    match = _AUTHORS_NUMBER.search(parts[-1].strip())
    if match is None:
        return None
    number = match.group(0)
    if "/" in number:  # the pattern allows one of [.,/]: an integer over an integer
        numerator, denominator = number.split("/")
        if not numerator.lstrip("+-"):
            return None
        if int(denominator) == 0:
            return round(float(numerator))
        return round(int(numerator) / int(denominator))
    value = float(number.replace(",", ""))
    if value in (float("inf"), float("-inf")):
        return None
    return round(value)


def authors_is_correct(prediction: int | None, gold: str) -> bool:
    expected = to_number(gold)
    return prediction is not None and expected is not None and Fraction(prediction) == expected


def math_equal_numbers(prediction: int | None, gold: str) -> bool:
    """``gsm8k_inference.py``'s verdict: ``float(pred) == float(gold) or math_equal(pred, gold)``, where the
    release's ``grader.math_equal`` (ToRA's), for two numbers, accepts the prediction within ``math.isclose``'s
    relative 1e-4 of gold / 100, gold or gold x 100 (its ``include_percentage``). GSM8K's golds are numbers, so its
    symbolic branch (sympy) is never reached here; a non-numeric gold is compared exactly."""
    if prediction is None:
        return False
    try:
        reference = float(gold.replace(",", ""))
    except ValueError:
        return authors_is_correct(prediction, gold)
    return any(math.isclose(candidate, float(prediction), rel_tol=1e-4)
               for candidate in (reference / 100, reference, reference * 100))


def gold_answer(solution: str) -> str:
    """The number after '####' in a GSM8K reference solution."""
    return solution.split("####")[-1].strip()


class GSM8K(Task):
    name = "gsm8k"
    max_new_tokens = 512
    protocols = {
        "default": dict(max_new_tokens=512),
        "authors": dict(max_new_tokens=1024, template_stop=False),
        "authors_inference": dict(max_new_tokens=1024, prompt_suffix=" Let's think step by step.",
                                  stop=("Instruction:", "Instruction", "Response:", "Response")),
    }

    def load(self):
        rows = read_rows(self.data_file) if self.data_file else (
            self.hub_rows(self.dataset, "main", "test") if self.dataset else read_rows(packaged(PACKAGED)))
        samples = []
        for i, row in enumerate(rows):
            question = row.get("question") or row.get("query") or row.get("problem")
            if question is None or row.get("answer") is None:
                raise ValueError(f"{self.data_file or PACKAGED}: row {i + 1} has no 'question' (or 'query'/'problem') "
                                 f"and 'answer' fields.")
            answer = str(row["answer"])
            samples.append({"id": str(row.get("id", i)), "question": question,
                            "gold": gold_answer(answer) if "####" in answer else answer})
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        return sample["question"]

    def score(self, samples, generations):
        records = []
        for sample, generation in zip(samples, generations):
            default = extract_answer(generation)
            authors = authors_extract(generation)
            by_protocol = {"default": {"extracted": default, "correct": is_correct(default, sample["gold"])},
                           "authors": {"extracted": authors, "correct": authors_is_correct(authors, sample["gold"])},
                           "authors_inference": {"extracted": authors,
                                                 "correct": math_equal_numbers(authors, sample["gold"])}}
            chosen = by_protocol[self.protocol]
            records.append({"extracted": chosen["extracted"], "gold": sample["gold"], "correct": chosen["correct"],
                            "verdict": "correct" if chosen["correct"] else "wrong", "by_protocol": by_protocol})
        return records
