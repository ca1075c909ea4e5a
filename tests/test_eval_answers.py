"""GSM8K and MATH answer extraction and comparison."""

import json
import os
from fractions import Fraction
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from eval.tasks.gsm8k import GSM8K, extract_answer, gold_answer, is_correct, to_number
from eval.tasks.math import MATH, extract_answer as math_extract, is_equivalent, last_boxed

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def gsm8k_test_rows():
    with open(SHARED_DATA / "gsm8k" / "test.jsonl") as f:
        return [json.loads(line) for line in f]


def test_gsm8k_gold_solutions_score_100_percent_and_wrong_numbers_are_rejected():
    rows = gsm8k_test_rows()
    assert len(rows) == 1319
    task = GSM8K(data_file=str(SHARED_DATA / "gsm8k" / "test.jsonl"))
    samples = task.load()
    records = task.score(samples, [r["answer"] for r in rows])  # the reference solutions as generations
    assert sum(r["correct"] for r in records) == 1319
    summary, table = task.summarize([{**r, "id": s["id"]} for r, s in zip(records, samples)])
    assert summary["accuracy"] == 100.0 and "| gsm8k | 1319 | 1319 | 100.00 |" in table
    for row in rows:
        gold = gold_answer(row["answer"])
        wrong = to_number(gold) + 1
        assert not is_correct(str(wrong), gold)
        assert not is_correct(str(to_number(gold) * 10), gold) or to_number(gold) == 0
        # The same solution with a wrong final line is wrong even though the right number appears earlier.
        body = row["answer"].rsplit("####", 1)[0]
        assert not is_correct(extract_answer(body + f"#### {wrong}"), gold)


@pytest.mark.parametrize("generation, expected", [
    ("Janet has 16 - 3 - 4 = 9 eggs.\nThe answer is: 18", "18"),  # MetaMath, beats earlier numbers
    ("so 9 * 2 = 18\n#### 18", "18"),  # GSM8K
    ("She makes 9 * 2 = $18 every day.", "18"),  # last-number fallback
    ("The answer is: 1,000", "1,000"),
    ("The answer is: $18.00.", "18.00"),
    ("The answer is: -3", "-3"),
    ("The answer is: 3/4", "3/4"),
    ("The answer is: \\frac{3}{4}", "3/4"),
    ("The answer is: 25%", "25"),
    ("The answer is: .5", ".5"),
    ("#### 5\nThe answer is: 7", "7"),  # MetaMath's marker wins
    ("no digits here", None),
])
def test_gsm8k_extraction_formats(generation, expected):
    assert extract_answer(generation) == expected


@pytest.mark.parametrize("prediction, gold, same", [
    ("1,000", "1000", True), ("18.00", "18", True), ("0.5", "1/2", True), ("3/4", "0.75", True),
    ("-3", "-3", True), ("1000", "100", False), ("18.5", "18", False), (None, "18", False), ("1/0", "0", False),
])
def test_gsm8k_numeric_comparison(prediction, gold, same):
    assert is_correct(prediction, gold) is same


def test_to_number_is_exact():
    assert to_number("1,234.5") == Fraction(24690, 20)
    assert to_number("abc") is None


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("first \\boxed{1} then \\boxed{ {x}+1 }", " {x}+1 "),  # the last one, nested braces kept
    ("\\fbox{3}", "3"),
    ("$\\boxed 5$", "5"),
    ("\\boxed{cut off by the token lim", None),
    ("no box", None),
])
def test_last_boxed(text, boxed):
    assert last_boxed(text) == boxed


@pytest.mark.parametrize("generation, gold, correct", [
    ("Thus $x = \\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("The answer is: \\frac{3}{4}", "\\frac34", True),  # MetaMath format, unbraced gold
    ("\\boxed{\\sqrt 2}", "\\sqrt{2}", True),
    ("\\boxed{(1, 2)}", "(1,2)", True),
    ("\\boxed{1+x^2}", "x^2+1", True),
    ("\\boxed{6}", "5", False),
    ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", False),
    ("we conclude it is 7", "7", True),  # no box, no marker: math-verify reads the text
    ("we conclude it is 8", "7", False),
])
def test_math_equivalence(generation, gold, correct):
    assert is_equivalent(math_extract(generation), gold, generation) is correct


def test_math_local_file_uses_answer_field_or_boxed_solution(tmp_path):
    rows = [
        {"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"},
        {"problem": "Half?", "solution": "...", "answer": "\\frac{1}{2}", "unique_id": "test/x/1.json"},
    ]
    path = tmp_path / "math.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = MATH(data_file=str(path))
    samples = task.load()
    assert [s["gold"] for s in samples] == ["2", "\\frac{1}{2}"]
    assert [s["id"] for s in samples] == ["0", "test/x/1.json"]
    records = task.score(samples, ["The answer is: 2", "so \\boxed{0.5}"])
    assert [r["correct"] for r in records] == [True, True]
    assert [r["verdict"] for r in task.score(samples, ["\\boxed{3}", "\\boxed{0.25}"])] == ["wrong", "wrong"]
