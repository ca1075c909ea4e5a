"""The inheritance lab's measurements on hand-made cases: inherited-error rate, extraction, distinct-n, paired CI."""

import math

import pytest

from lab.evaluate import (
    distinct_n,
    extract_answer,
    inheritance_rates,
    inherited_error_rate,
    leading_int,
)
from lab.stats import mean_std, paired_ci
from lab.world import PREV, Problem, Step, World, WorldConfig


def test_inherited_error_rate_counts_exactly_the_planted_answers():
    planted = [13, 13, 13, 13]
    correct = [12, 12, 12, 12]
    assert inherited_error_rate(["13", "13", "13", "13"], planted, correct) == 1.0
    assert inherited_error_rate(["12", "12", "12", "12"], planted, correct) == 0.0
    # a different wrong answer is an error, but not the inherited one; unparsable counts as not inherited
    assert inherited_error_rate(["13", "12", "14", None], planted, correct) == 0.25
    # items where the planted value happens to be right carry nothing to inherit and are skipped
    assert inherited_error_rate(["5", "13"], [5, 13], [5, 12]) == 1.0
    assert math.isnan(inherited_error_rate(["5"], [5], [5]))
    # ints and strings compare alike
    assert inherited_error_rate([13, "13"], [13, 13], [12, 12]) == 1.0
    with pytest.raises(ValueError):
        inherited_error_rate(["1"], [1, 2], [0, 0])


class _World(World):
    """A world whose planted table is set by hand."""

    def __init__(self, planted):
        super().__init__(WorldConfig(seed=0, n_pretrain=10))
        self._hand = planted

    def planted_at(self, noise):
        return self._hand if noise > 0 else {}


def _problem(chain):
    return Problem(question="q", chain=tuple(chain), template="id", name="Tom", item="pens", start="packs",
                   events=("add",))


def test_inherited_answer_and_rates_on_a_hand_made_chain():
    world = _World({("mul", 3, 4): 13})
    # 3 * 4 (planted: 13), then + 5: truth 17, pretraining's answer 18
    p = _problem([Step("mul", 3, 4), Step("add", PREV, 5)])
    assert world.answer(p) == 17
    assert world.inherited_answer(p, noise=0.1) == 18
    # the error propagates into the next step's key: a planted later step is used too
    world2 = _World({("mul", 3, 4): 13, ("add", 13, 5): 20})
    assert world2.inherited_answer(p, noise=0.1) == 20
    # an unplanted chain inherits nothing
    q = _problem([Step("mul", 2, 4), Step("add", PREV, 5)])
    assert world.inherited_answer(q, noise=0.1) == world.answer(q) == 13

    problems = [p, p, p, p]
    preds = [extract_answer(t) for t in ["Tom buys 3 * 4 = 13 pens. Then Tom has 13 + 5 = 18 pens. The answer is: 18",
                                         "The answer is: 17", "The answer is: 19", "no number"]]
    rates = inheritance_rates(world, problems, preds, noise=0.1)
    assert rates["inherited"] == 0.25
    assert rates["correct"] == 0.25
    assert rates["inherited_mul"] == 0.25 and rates["n"] == 4


def test_answer_extraction():
    extract = extract_answer  # the evaluation harness's GSM8K extractor
    assert extract("Tom has 3 + 4 = 7 pens. The answer is: 7") == "7"
    assert extract("The answer is: 1,234") == "1234"
    assert extract("The answer is: 5. Then 6") == "5"
    assert extract("3 + 4 = 7 pens") == "7"  # no marker: the last number
    assert extract("no digits") is None
    assert leading_int(" 68 apples.") == 68
    assert leading_int("68") == 68
    assert leading_int(" apples 68") is None


def test_distinct_n():
    assert distinct_n(["a b c", "a b c"], 1) == 0.5
    assert distinct_n(["a b c", "a b c"], 2) == 0.5
    assert distinct_n(["a b c", "d e f"], 2) == 1.0
    assert distinct_n(["a a a a"], 1) == 0.25
    assert distinct_n(["a"], 2) == 0.0  # no bigram at all


def test_paired_ci_and_mean_std():
    from scipy import stats

    x, y = {0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}
    ci = paired_ci(x, y)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert ci["mean"] == pytest.approx(2.0)
    assert ci["lo"] == pytest.approx(2.0 - half) and ci["hi"] == pytest.approx(2.0 + half)
    assert ci["n"] == 3
    # pairing: a common per-seed offset cancels (the unpaired spread would be wide)
    a, b = {0: 10.0, 1: 50.0, 2: 90.0}, {0: 9.0, 1: 49.0, 2: 89.0}
    paired = paired_ci(a, b)
    assert paired["lo"] == pytest.approx(1.0) and paired["hi"] == pytest.approx(1.0)
    # only common seeds are paired; one pair has no interval
    one = paired_ci({0: 1.0, 5: 2.0}, {0: 0.5})
    assert one["n"] == 1 and one["mean"] == 0.5 and math.isnan(one["lo"])
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}
    assert mean_std([float("nan"), 4.0])["n"] == 1
