"""GSM8K and MATH answer extraction and comparison."""

"""GSM8K and MATH answer extraction and comparison, under both protocols (``default`` and ``authors``)."""

import json
import os
from fractions import Fraction

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from eval.benchmark_rows import packaged
from eval.tasks.gsm8k import GSM8K, authors_extract, authors_is_correct, extract_answer, gold_answer, is_correct, \
    math_equal_numbers, to_number
from eval.tasks.math import MATH, authors_extract as math_authors_extract, authors_is_equivalent, \
    extract_answer as math_extract, hendrycks_normalize, is_equivalent, last_boxed


def gsm8k_test_rows():
    with open(packaged("gsm8k_test.jsonl")) as f:  # shipped with the harness (MIT)
        return [json.loads(line) for line in f]


def test_gsm8k_gold_solutions_score_100_percent_and_wrong_numbers_are_rejected():
    rows = gsm8k_test_rows()
    assert len(rows) == 1319
    task = GSM8K()  # the shipped test split by default
    samples = task.load()
    records = task.score(samples, [r["answer"] for r in rows])  # the reference solutions as generations
    assert sum(r["correct"] for r in records) == 1319
    summary, table = task.summarize([{**r, "id": s["id"]} for r, s in zip(records, samples)])
    assert summary["accuracy"] == 100.0 and "| gsm8k | default | 1319 | 1319 | 100.00 |" in table
    # The reference solutions end in "#### N", not "The answer is: N": the authors' extraction finds nothing.
    assert summary["accuracy_by_protocol"]["authors"] == 0.0
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


# The authors' GSM8K protocol (utils/test_acc.py) case by case, beside the default one on the same text.
@pytest.mark.parametrize("generation, gold, default, authors", [
    ("9 * 2 = 18 dollars.\nThe answer is: 18", "18", True, True),
    ("The answer is: 17.6", "18", False, True),  # rounded: 17.6 counts for 18
    ("The answer is: 18.4", "18", False, True),
    ("The answer is: 2.5", "2", False, True),  # Python's round: half to even
    ("The answer is: 3.5", "4", False, True),
    ("The answer is 18", "18", True, False),  # no colon: the authors' marker is exactly "The answer is: "
    ("so 9 * 2 = 18\n#### 18", "18", True, False),  # GSM8K's marker: only ours
    ("She makes 9 * 2 = $18 every day.", "18", True, False),  # last-number fallback: only ours
    ("The answer is: 1,000", "1000", True, True),
    ("The answer is: 1,234,567", "1234567", True, False),  # their pattern stops at "1,234"
    ("The answer is: $18.00", "18", True, True),
    ("The answer is: -3", "-3", True, True),
    ("The answer is: 7/2", "4", False, True),  # 3.5 rounds to 4
    ("The answer is: 5/0", "5", False, True),  # a/0 is round(a) for them
    ("The answer is: 12\nThe answer is: 18", "18", True, True),  # the last marker
    ("The answer is: 18 apples, not 20", "18", True, True),
    ("The answer is: eighteen", "18", False, False),
])
def test_gsm8k_protocols_case_by_case(generation, gold, default, authors):
    assert is_correct(extract_answer(generation), gold) is default
    assert authors_is_correct(authors_extract(generation), gold) is authors


def test_gsm8k_authors_protocol_settings_and_scores_on_the_same_generations():
    task = GSM8K(protocol="authors", limit=2)
    # utils/gen_vllm.py: the training prompt as it is, 1024 tokens, no stop strings (not even the template's)
    assert task.settings == {"max_new_tokens": 1024, "prompt_suffix": "", "stop": (), "template_stop": False}
    # inference/gsm8k_inference.py: the suffix and its four stop strings
    assert GSM8K(protocol="authors_inference").settings == {
        "max_new_tokens": 1024, "prompt_suffix": " Let's think step by step.",
        "stop": ("Instruction:", "Instruction", "Response:", "Response"), "template_stop": True}
    assert GSM8K().settings["max_new_tokens"] == 512 and GSM8K().settings["prompt_suffix"] == ""
    samples = task.load()
    gens = [f"... The answer is: {int(samples[0]['gold']) + 0.4}", f"#### {samples[1]['gold']}"]
    records = task.score(samples, gens)
    assert [r["correct"] for r in records] == [True, False]  # the run's protocol: the authors'
    assert [r["by_protocol"]["default"]["correct"] for r in records] == [False, True]
    summary, table = task.summarize([{**r, "id": s["id"]} for r, s in zip(records, samples)])
    assert summary["protocol"] == "authors" and summary["accuracy"] == 50.0
    assert summary["accuracy_by_protocol"] == {"authors": 50.0, "authors_inference": 50.0, "default": 50.0}
    assert "| gsm8k | authors | 2 | 1 | 50.00 |" in table and "default (scoring only, same generations)" in table
    with pytest.raises(ValueError, match="unknown protocol"):
        GSM8K(protocol="paper")


@pytest.mark.parametrize("text, normalized", [
    ("\\frac12", "\\frac{1}{2}"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"), ("k = 3", "3"), ("x+y = 3", "x+y=3"), ("\\sqrt3", "\\sqrt{3}"),
    ("10\\%", "10"), ("90^\\circ", "90"), ("\\left( 1, 2 \\right)", "(1,2)"), (".25", "0.25"),
    ("5 \\text{ cm}", "5"), ("\\$18", "18"),
])
def test_hendrycks_normalization(text, normalized):
    assert hendrycks_normalize(text) == normalized


# The authors' MATH protocol: only "The answer is: X" counts, compared as normalised strings; the default protocol
# accepts a boxed answer and mathematical equivalence.
@pytest.mark.parametrize("generation, gold, default, authors", [
    ("So we get 1/2.\nThe answer is: \\frac{1}{2}", "\\frac{1}{2}", True, True),
    ("The answer is: \\frac12.", "\\frac{1}{2}", True, True),  # final "." dropped, \frac12 braced
    ("The answer is: 0.5", "\\frac{1}{2}", True, True),
    ("The answer is: (1, 2)", "(1,2)", True, True),  # spaces removed
    ("The answer is: x^2+1", "1+x^2", True, False),  # equivalent, not the same string
    ("The answer is: \\frac{2}{4}", "\\frac{1}{2}", True, False),
    ("The answer is: 2\\sqrt{2}", "\\sqrt{8}", True, False),
    ("Thus $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", True, False),  # boxed, no marker: wrong for them
    ("\\boxed{5}\nThe answer is: 5", "5", True, True),
    ("The answer is: 5.\nThe answer is: 6", "5", False, False),  # both take the last answer
    ("The answer is: 6", "5", False, False),
    ("we conclude it is 7", "7", True, False),  # math-verify reads the text; the authors need the marker
])
def test_math_protocols_case_by_case(generation, gold, default, authors):
    assert is_equivalent(math_extract(generation), gold, generation) is default
    extracted = math_authors_extract(generation)
    assert (extracted is not None and authors_is_equivalent(extracted, gold)) is authors


def test_math_authors_extraction_stops_at_the_first_sentence_end():
    assert math_authors_extract("x\nThe answer is: 3.\nBecause 1+2=3.") == "3"
    assert math_authors_extract("The answer is: 3.5") == "3.5"  # "." followed by a digit is not an end
    assert math_authors_extract("no marker") is None


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
    assert [r["by_protocol"]["authors"]["correct"] for r in records] == [True, False]
    authors = MATH(data_file=str(path), protocol="authors")
    assert [r["correct"] for r in authors.score(samples, ["The answer is: 2", "so \\boxed{0.5}"])] == [True, False]
    assert [r["verdict"] for r in task.score(samples, ["\\boxed{3}", "\\boxed{0.25}"])] == ["wrong", "wrong"]


def _tora_math_equal_numbers(prediction, reference):
    """The numeric branch of the release's ``grader.math_equal`` (ToRA's), restated as the test's reference."""
    import math

    prediction, reference = float(str(prediction).replace(",", "")), float(str(reference).replace(",", ""))
    return any(math.isclose(item, prediction, rel_tol=1e-4) for item in (reference / 100, reference, reference * 100))


# gsm8k_inference.py (exact or math_equal) against test_acc.py (exact) on the same extracted numbers.
@pytest.mark.parametrize("generation, gold, test_acc, gsm8k_inference", [
    ("The answer is: 18", "18", True, True),
    ("The answer is: 17", "18", False, False),
    ("The answer is: 50", "5000", False, True),  # gold / 100 is accepted by math_equal
    ("The answer is: 1800", "18", False, True),  # gold x 100
    ("The answer is: 100001", "100000", False, True),  # within a relative 1e-4
    ("The answer is: 100011", "100000", False, False),
    ("The answer is: 0", "0", True, True),
    ("The answer is: 0.18", "18", False, False),  # rounded to 0 before math_equal sees it
    ("The answer is: 2,500", "25", False, True),  # 2500 = 25 x 100
    ("The answer is: 1/2", "0", True, True),  # round(0.5) = 0 (banker's rounding)
    ("no marker 18", "18", False, False),
])
def test_gsm8k_inference_math_equal_against_test_acc(generation, gold, test_acc, gsm8k_inference):
    extracted = authors_extract(generation)
    assert authors_is_correct(extracted, gold) is test_acc
    assert math_equal_numbers(extracted, gold) is gsm8k_inference
    if extracted is not None:
        assert math_equal_numbers(extracted, gold) is (float(extracted) == float(gold)
                                                      or _tora_math_equal_numbers(extracted, gold))
