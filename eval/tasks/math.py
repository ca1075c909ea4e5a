"""MATH accuracy under two named protocols, both computed on every generation.

``default``: the model's final answer, checked for mathematical equivalence by ``math-verify``. The answer is the
last ``\\boxed{...}`` (``\\fbox``) of the generation, else MetaMath's "The answer is: X", else whatever math-verify
finds in the whole text.

``authors``: the BA-LoRA release's own evaluation pipeline, the one its run script ``scripts/ba-lora.sh`` chains after
training (github.com/llm172/BA-LoRA, ``utils/gen_vllm.py`` then ``utils/test_acc.py`` at commit 2829797): the training
prompt as it is ("### Response:", no suffix), 1024 new tokens, no stop strings, greedy; the answer is the text after
the last "The answer is: " up to the first ".\n", without a final "."; it must equal the gold answer after Hendrycks
et al.'s string normalisation (:func:`hendrycks_normalize`). No marker: wrong. Stricter than math-verify: "0.5"
matches "\frac12" but "(1, 2)" vs "(1,2)" only through the space rule, "x^2+1" never matches "1+x^2".

Not reproduced: the release's other MATH script, ``inference/math_inference.py`` (MetaMath's): "Let's think step by
step." suffix, 2048 tokens, stops at Question/USER/ASSISTANT/Instruction/Response (with and without ":"), sympy's
``grader.math_equal`` beside the string rule, and golds through ``remove_boxed``, which only reads "\boxed{...}": a
reference ending in "\fbox{...}" or "\boxed 5" has no gold there and counts as wrong whatever the model says.

The gold answer is the dataset's ``answer`` field (what ``test_acc.py`` compares with: the release's data carries it)
or, for files without one, the last boxed expression of the reference ``solution`` (``\boxed{...}``, ``\fbox{...}``
or ``\boxed 5``).
Default data: the 5,000-problem MATH test set (EleutherAI/hendrycks_math, all seven subjects) from the Hub;
``--dataset HuggingFaceH4/MATH-500`` or ``--data_file`` for others (offline: ``--data_file``).
"""

from __future__ import annotations

import re
import threading

from math_verify import parse, verify

from ..benchmark_rows import limit_rows, read_rows
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


class _Unnormalizable(Exception):
    """The authors' normaliser raised: their comparison falls back to the raw strings."""


def _sqrt_braces(text: str) -> str:
    pieces = text.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if not piece:
            raise _Unnormalizable
        out += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
    return out


def _frac_braces(text: str) -> str:
    pieces = text.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if not piece:
            raise _Unnormalizable
        if piece[0] == "{":
            out += piece
        elif len(piece) < 2:
            return text  # "\\frac1": left as it was
        elif piece[1] != "{":
            out += "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            out += "{" + piece[0] + "}" + piece[1:]
    return out


def _slash_to_frac(text: str) -> str:
    parts = text.split("/")
    if len(parts) != 2:
        return text
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        raise _Unnormalizable from None
    return f"\\frac{{{a}}}{{{b}}}" if text == f"{a}/{b}" else text


def hendrycks_normalize(text: str) -> str:
    """Hendrycks et al.'s MATH answer normalisation, as the authors' ``test_acc.py`` applies it (re-implemented here;
    no maintained package ships it). In order: drop newlines, ``\\!``, ``\\left``/``\\right``, degrees, ``\\$``,
    ``\\%`` and a trailing ``\\text{ unit}``; ``\\\\`` -> ``\\``; tfrac/dfrac -> frac; leading "." -> "0.";
    "k = 3" -> "3" (left side of at most 2 characters); ``\\sqrt3`` -> ``\\sqrt{3}``; spaces removed;
    ``\\frac12`` -> ``\\frac{1}{2}``; "0.5" -> ``\\frac{1}{2}``; "a/b" (integers) -> ``\\frac{a}{b}``.
    Raises :class:`_Unnormalizable` where theirs raises."""
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\$", "")
    if "\\text{ " in text:
        parts = text.split("\\text{ ")
        if len(parts) != 2:
            raise _Unnormalizable
        text = parts[0]
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    if text[0] == ".":
        text = "0" + text
    sides = text.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        text = sides[1]
    text = _frac_braces(_sqrt_braces(text).replace(" ", ""))
    if text == "0.5":
        text = "\\frac{1}{2}"
    return _slash_to_frac(text)


def authors_extract(text: str) -> str | None:
    """The authors' answer: after the last "The answer is: ", up to the first ".\\n", stripped, one final "." cut."""
    parts = text.split("The answer is: ")
    if len(parts) < 2:
        return None
    answer = parts[-1].split(".\n")[0].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()


def authors_is_equivalent(prediction: str | None, gold: str | None) -> bool:
    """``is_equiv`` of the authors' ``test_acc.py``: normalised strings equal (raw strings where normalising fails)."""
    if prediction is None or gold is None:
        return prediction is None and gold is None
    try:
        return hendrycks_normalize(prediction) == hendrycks_normalize(gold)
    except _Unnormalizable:
        return prediction == gold


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
    protocols = {
        "default": dict(max_new_tokens=1024),
        "authors": dict(max_new_tokens=1024, template_stop=False),
    }
    hub_hint = "a .jsonl with 'problem' and 'solution' or 'answer' fields, e.g. MATH's test split"

    def load(self):
        if self.data_file:
            rows = read_rows(self.data_file)
        elif self.dataset:
            rows = self.hub_rows(self.dataset, split="test")
        else:
            rows = [row for subject in SUBJECTS for row in self.hub_rows(HUB, subject, "test")]
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
            default = extract_answer(generation)
            authors = authors_extract(generation)
            by_protocol = {
                "default": {"extracted": default, "correct": is_equivalent(default, sample["gold"], generation)},
                "authors": {"extracted": authors,
                            "correct": authors is not None and authors_is_equivalent(authors, sample["gold"])},
            }
            chosen = by_protocol[self.protocol]
            records.append({"extracted": chosen["extracted"], "gold": sample["gold"], "correct": chosen["correct"],
                            "verdict": "correct" if chosen["correct"] else "wrong", "type": sample["type"],
                            "level": sample["level"], "by_protocol": by_protocol})
        return records
