"""MBPP+ scored as EvalPlus scores it: the shipped 399-task file, canonical solutions passing base and plus through
the sandbox (every task with a special oracle, a tolerance, a builtin-named entry point or an unusual output type),
and a constructed set of candidates whose verdicts must equal those of EvalPlus's own ``check_correctness``, run
outside the sandbox as the independent reference."""

import gzip
import hashlib
import os
from importlib import resources

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

evalplus_evaluate = pytest.importorskip("evalplus.evaluate", reason="balora-trl[eval] + evalplus (see the README)")
from evalplus.eval._special_oracle import MBPP_OUTPUT_NOT_NONE_TASKS, MBPP_OUTPUT_SET_EQ_TASKS  # noqa: E402

from eval.tasks.code import MBPPPlus, solution  # noqa: E402

pytestmark = pytest.mark.skipif(not os.uname().sysname == "Linux", reason="the sandbox is Linux-only")

# sha256 of EvalPlus's MbppPlus.jsonl at commit 767efcc, as eval/data/LICENSE records it.
MBPP_PLUS_SHA256 = "08405a4e8764a4941cfe0945d25a956355a0454f364ea902c4020a44e7057973"
SPECIAL_ORACLE_TASKS = {"Mbpp/164", "Mbpp/295", "Mbpp/558", "Mbpp/581"}  # EvalPlus's per-task oracles
# Canonical solutions checked through the sandbox: every task EvalPlus treats specially, every tolerance task, the
# builtin-named entry point (Mbpp/126 `sum`), the Counter output (Mbpp/88), the empty plus set (Mbpp/793), tuple and
# list float outputs, and ordinary tasks. The slowest canonical solutions (seconds per input) are left to
# benchmarks/mbpp_plus_canonical.py, which runs all 399.
ORDINARY = ["Mbpp/3", "Mbpp/4", "Mbpp/17", "Mbpp/18", "Mbpp/20", "Mbpp/56", "Mbpp/88", "Mbpp/126", "Mbpp/261",
            "Mbpp/615", "Mbpp/783", "Mbpp/793"]


@pytest.fixture(scope="module")
def mbpp_plus():
    task = MBPPPlus(workers=2)
    samples = {s["id"]: s for s in task.load()}
    return task, samples


def test_the_shipped_file_is_evalplus_own_399_tasks_unchanged(mbpp_plus):
    path = resources.files("eval") / "data" / "mbpp_plus.jsonl.gz"
    with gzip.open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == MBPP_PLUS_SHA256
    license_text = (resources.files("eval") / "data" / "LICENSE").read_text()
    assert "mbpp_plus.jsonl.gz" in license_text and MBPP_PLUS_SHA256 in license_text and "Apache License" in license_text
    _, samples = mbpp_plus
    assert len(samples) == 399
    # EvalPlus's own input conversion was applied (Mbpp/2 takes tuples).
    assert all(isinstance(a, tuple) for a in samples["Mbpp/2"]["base_input"][0])


def _special(samples) -> list[str]:
    ids = sorted(t for t, s in samples.items()
                 if s["entry_point"] in MBPP_OUTPUT_NOT_NONE_TASKS + MBPP_OUTPUT_SET_EQ_TASKS or s["atol"])
    return ids + sorted(SPECIAL_ORACLE_TASKS) + ORDINARY


@pytest.mark.slow
def test_canonical_solutions_pass_base_and_plus_on_every_special_task(mbpp_plus):
    task, samples = mbpp_plus
    picked = [samples[t] for t in dict.fromkeys(_special(samples))]
    assert len(picked) >= 40
    assert {"Mbpp/737", "Mbpp/787", "Mbpp/794", "Mbpp/2", "Mbpp/769"} <= {s["id"] for s in picked}
    records = task.score(picked, [s["canonical_solution"] for s in picked])
    failed = [(s["id"], r["verdict"], r["error"]) for s, r in zip(picked, records) if not r["passed"]]
    assert failed == []
    assert all(r["passed_base"] for r in records)


# (task, completion, base verdict, base-and-plus verdict): what EvalPlus decides, written down from its rules; the
# test checks EvalPlus agrees with these and that balora agrees with EvalPlus one for one.
CANDIDATES = [
    # set-compared outputs (MBPP_OUTPUT_SET_EQ_TASKS): any order, list or tuple
    ("Mbpp/2", "def similar_elements(a, b):\n    return sorted(set(a) & set(b), reverse=True)\n", True, True),
    ("Mbpp/2", "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))[:1]\n", False, False),
    ("Mbpp/7", "import re\ndef find_char_long(text):\n    return re.findall(r'\\b\\w{4,}\\b', text)[::-1]\n",
     True, True),
    ("Mbpp/232", "import heapq\ndef larg_nnum(xs, n):\n    return sorted(heapq.nlargest(n, xs))\n", True, True),
    ("Mbpp/769", "def Diff(a, b):\n    return list(set(b) - set(a)) + list(set(a) - set(b))\n", True, True),
    # reversed order where order matters: wrong
    ("Mbpp/4", "import heapq\ndef heap_queue_largest(nums, n):\n    return sorted(heapq.nlargest(n, nums))\n", False,
     False),
    # float tolerance (atol 1e-4) with EvalPlus's type check
    ("Mbpp/82", "import math\ndef volume_sphere(r):\n    return 4 * math.pi * r ** 3 / 3\n", True, True),
    ("Mbpp/82", "def volume_sphere(r):\n    return 4 / 3 * 3.1416 * r ** 3\n", False, False),
    ("Mbpp/82", "import math\ndef volume_sphere(r):\n    return round(4 / 3 * math.pi * r ** 3)\n", False, False),
    ("Mbpp/82", "def volume_sphere(r):\n    return float('nan')\n", False, False),
    ("Mbpp/82", "import math\ndef volume_sphere(r):\n    return str(4 / 3 * math.pi * r ** 3)\n", False, False),
    # a numpy float64 equal to the float passes exactly; off by 1e-12 it takes the tolerance path, where its type
    # (numpy.float64, not float) fails EvalPlus's check
    ("Mbpp/82", "import math, numpy\ndef volume_sphere(r):\n    return numpy.float64((4. / 3.) * math.pi * (r ** 3))\n",
     True, True),
    ("Mbpp/82", "import math, numpy\ndef volume_sphere(r):\n"
                "    return numpy.float64((4. / 3.) * math.pi * (r ** 3) * (1 + 1e-12))\n", False, False),
    # atol 0 with float outputs: EvalPlus uses 1e-6
    ("Mbpp/14", "def find_Volume(l, b, h):\n    return l * b * h / 2 + 1e-9\n", True, True),
    ("Mbpp/14", "def find_Volume(l, b, h):\n    return l * b * h / 2 + 1e-3\n", False, False),
    # a tuple of floats expected: a list with the same values fails the type check, a tuple 1e-9 off passes
    ("Mbpp/261", "def division_elements(a, b):\n    return [x / y for x, y in zip(a, b)]\n", False, False),
    ("Mbpp/261", "def division_elements(a, b):\n    return tuple(x / y + 1e-9 for x, y in zip(a, b))\n", True, True),
    # "output not None" tasks: a bool, a re.Match, or any non-None object
    ("Mbpp/737", "import re\ndef check_str(s):\n    return bool(re.match(r'^[aeiouAEIOU][A-Za-z0-9_]*', s))\n", True,
     True),
    ("Mbpp/737", "import re\ndef check_str(s):\n    return re.match(r'^[aeiouAEIOU][A-Za-z0-9_]*', s)\n",
     True, True),
    ("Mbpp/737", "def check_str(s):\n    return 'Valid' if s[:1] in 'aeiouAEIOU' else 'Invalid'\n", False, False),
    ("Mbpp/787", "import re\ndef text_match_three(text):\n    return re.search('abbb', text) is not None\n",
     True, True),
    # a numpy.bool_ is not a bool for EvalPlus: compared as "not None", so a False fails
    ("Mbpp/794", "import re, numpy\ndef text_starta_endb(text):\n"
                 "    return numpy.bool_(re.search('a.*?b$', text) is not None)\n", False, False),
    # Counter expected: a dict or a Counter
    ("Mbpp/88", "def freq_count(xs):\n    out = {}\n    for x in xs:\n        out[x] = out.get(x, 0) + 1\n"
                "    return out\n", True, True),
    ("Mbpp/88", "from collections import Counter\ndef freq_count(xs):\n    return Counter(xs)\n", True, True),
    ("Mbpp/88", "def freq_count(xs):\n    return sorted((x, xs.count(x)) for x in set(xs))\n", False, False),
    # an entry point named like a builtin (Mbpp/126 `sum`); not defining it fails
    ("Mbpp/126", "import math\ndef sum(a, b):\n    n = math.gcd(a, b)\n    total = 0\n    i = 1\n"
                 "    while i * i <= n:\n        if n % i == 0:\n            total += i\n"
                 "            if n // i != i:\n                total += n / i\n        i += 1\n    return total\n",
     True, True),
    ("Mbpp/126", "import math\ndef sum(a, b):\n    return math.gcd(a, b)\n", False, False),
    ("Mbpp/126", "def common_divisor_sum(a, b):\n    return 0\n", False, False),
    # EvalPlus's per-task oracles: Mbpp/164 accepts anything, Mbpp/295 accepts 0, Mbpp/581 and Mbpp/558 accept
    # their alternative readings
    ("Mbpp/164", "def are_equivalent(a, b):\n    return None\n", True, True),
    ("Mbpp/295", "def sum_div(n):\n    return 0\n", True, True),
    ("Mbpp/581", "import math\ndef surface_Area(b, h):\n"
                 "    return round(b * b + 2 * b * math.sqrt((b / 2) ** 2 + h * h))\n", True, True),
    ("Mbpp/558", "def digit_distance_nums(a, b):\n    x, y = str(a), str(b)\n    w = max(len(x), len(y))\n"
                 "    return sum(abs(int(p) - int(q)) for p, q in zip(x.zfill(w), y.zfill(w)))\n", True, True),
    # time: an endless loop, and a program slow only on the plus inputs (EvalPlus's per-input limit)
    ("Mbpp/17", "def square_perimeter(a):\n    while True:\n        pass\n", False, False),
    ("Mbpp/17", "import time\ndef square_perimeter(a):\n    if a > 20:\n        time.sleep(5)\n    return 4 * a\n",
     True, False),
    # right on base, wrong on plus; exceptions; broken programs; 1 == True
    ("Mbpp/17", "def square_perimeter(a):\n    return 4 * a if isinstance(a, int) else 0\n", True, False),
    ("Mbpp/17", "def square_perimeter(a):\n    raise ValueError(a)\n", False, False),
    ("Mbpp/17", "def square_perimeter(a)\n    return 4 * a\n", False, False),
    ("Mbpp/17", "exit(0)\ndef square_perimeter(a):\n    return 4 * a\n", False, False),
    ("Mbpp/17", "def square_perimeter(a):\n    print('x' * 10000)\n    return a + a + a + a\n", True, True),
    ("Mbpp/3", "def is_not_prime(n):\n"
               "    return int(n < 2 or any(n % i == 0 for i in range(2, int(n ** 0.5) + 1)))\n", True, True),
    ("Mbpp/793", "def last(arr, x):\n    return max(i for i, v in enumerate(arr) if v == x)\n", True, True),
]


def _evalplus_verdicts(task, sample, solution):
    """EvalPlus's own check_correctness (outside our sandbox), on the same ground truth."""
    problem = {k: sample[k] for k in ("base_input", "plus_input", "entry_point", "atol")}
    problem["task_id"] = sample["id"]
    result = evalplus_evaluate.check_correctness("mbpp", 0, problem, solution, task.ground_truth(sample),
                                                 fast_check=True)
    base = result["base"][0] == "pass"
    return base, base and result["plus"][0] == "pass"


@pytest.mark.slow
def test_verdicts_agree_with_evalplus_check_correctness_one_for_one(mbpp_plus):
    task, samples = mbpp_plus
    assert len(CANDIDATES) >= 28
    picked = [samples[t] for t, *_ in CANDIDATES]
    ours = task.score(picked, [code for _, code, *_ in CANDIDATES])
    theirs = [_evalplus_verdicts(task, s, solution(s, code)) for s, (_, code, *_) in zip(picked, CANDIDATES)]
    written = [(base, plus) for *_, base, plus in CANDIDATES]
    mismatched = [(t, w, e) for (t, *_), w, e in zip(CANDIDATES, written, theirs) if w != e]
    assert mismatched == [], "EvalPlus decides differently from the comment beside the candidate"
    disagreements = [(t, code, (r["passed_base"], r["passed"]), e, r["error"])
                     for (t, code, *_), r, e in zip(CANDIDATES, ours, theirs) if (r["passed_base"], r["passed"]) != e]
    assert disagreements == []
    summary, _ = task.summarize(ours)
    n = len(CANDIDATES)
    assert summary["pass@1_base"] == pytest.approx(100 * sum(b for b, _ in theirs) / n)
    assert summary["pass@1"] == pytest.approx(100 * sum(p for _, p in theirs) / n)


def test_another_evalplus_release_is_refused_in_one_line(monkeypatch):
    import eval.tasks.code as code

    monkeypatch.setattr(code, "_evalplus_version", lambda: "0.2.1")
    with pytest.raises(ValueError, match=r"scored by evalplus 0\.3\.1, found 0\.2\.1: pip install --no-deps"):
        MBPPPlus().load()
