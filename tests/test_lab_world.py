"""The inheritance lab's synthetic world: determinism and that the measured corpus rates match the dials."""

import re
from collections import Counter

import pytest

from lab.world import CONTAINERS, FAMILIES, ITEMS, OPS, SYMBOL, TWO_STEP_SHARE, World, WorldConfig, skewed_weights

N = 20_000


def _arith(family, a, b):  # independent of World.correct
    return {"add": a + b, "sub": a - b, "mul": a * b}[family]


def _parsed_is_wrong(world, example) -> bool:
    """Read the example's *text*: its numbers must be the key's operands then the shown answer."""
    numbers = [int(x) for x in re.findall(r"\d+", example.text)]
    if example.family == "fact":
        container, item = example.key[1], example.key[2]
        assert f" {container} of {item}" in example.text
        assert numbers == [example.shown]
        return example.shown != world.facts[(container, item)]
    operands = [example.key[1], example.key[2]]
    assert numbers in (operands + [example.shown], operands * 2 + [example.shown]), example.text
    return example.shown != _arith(example.family, example.key[1], example.key[2])


@pytest.fixture(scope="module")
def noisy():
    world = World(WorldConfig(seed=3, noise=0.3, duplication=0.2, n_pretrain=N))
    return world, world.pretraining_corpus()


def test_generator_is_deterministic():
    cfg = WorldConfig(seed=5, noise=0.1, duplication=0.1, n_pretrain=2000)
    a, b = World(cfg), World(cfg)
    assert [e.text for e in a.pretraining_corpus()] == [e.text for e in b.pretraining_corpus()]
    sa, sb = a.downstream_sets(50, 10, 10, 10), b.downstream_sets(50, 10, 10, 10)
    for split in sa:
        assert [p.question for p in sa[split]] == [p.question for p in sb[split]]
        assert [a.solution(p) for p in sa[split]] == [b.solution(p) for p in sb[split]]
    assert a.planted == b.planted
    other = World(cfg.replace(seed=6))
    assert [e.text for e in other.pretraining_corpus()][:50] != [e.text for e in a.pretraining_corpus()][:50]


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_measured_wrong_answer_rate_matches_noise(noise):
    world = World(WorldConfig(seed=1, noise=noise, n_pretrain=N))
    corpus = world.pretraining_corpus()
    wrong = [_parsed_is_wrong(world, e) for e in corpus]
    rate = sum(wrong) / len(wrong)
    assert abs(rate - noise) < 0.015, rate
    if noise == 0:
        assert rate == 0
    # every family is noised, not just the big one
    for family in FAMILIES:
        fam = [w for w, e in zip(wrong, corpus) if e.family == family]
        assert abs(sum(fam) / len(fam) - noise) < 0.1, (family, sum(fam) / len(fam))


def test_planted_errors_are_consistent_and_nested(noisy):
    world, corpus = noisy
    # a planted key always shows the same wrong value; a clean key always the right one
    shown = {}
    for e in corpus:
        shown.setdefault(e.key, set()).add(e.shown)
    for key, values in shown.items():
        assert len(values) == 1
        (value,) = values
        assert (value != world.correct(key)) == (key in world.planted)
    low, high = world.planted_at(0.1), world.planted_at(0.3)
    assert set(low) < set(high) and world.planted_at(0.0) == {}
    assert all(v != world.correct(k) and v >= 0 for k, v in high.items())
    assert all(low[k] == high[k] for k in low)


def test_measured_imbalance_matches_dials(noisy):
    world, corpus = noisy
    cfg = world.config
    base = [e for e in corpus if not e.duplicate]
    n = len(base)
    fam = Counter(e.family for e in base)
    target = skewed_weights(3, cfg.op_imbalance)
    for op, w in zip(OPS, target):
        assert abs(fam[op] / n - w * (1 - cfg.fact_share)) < 0.012, (op, fam[op] / n)
    assert abs(fam["fact"] / n - cfg.fact_share) < 0.012
    # most / least frequent operation ≈ op_imbalance
    assert 0.75 * cfg.op_imbalance < fam["add"] / fam["mul"] < 1.3 * cfg.op_imbalance
    # topics (items), counted from the text
    items = Counter(next(i for i in ITEMS if f" {i}" in e.text) for e in base if e.family != "fact" and
                    any(f" {i}" in e.text for i in ITEMS))
    total = sum(items.values())
    for item, w in zip(ITEMS, skewed_weights(len(ITEMS), cfg.topic_imbalance)):
        assert abs(items[item] / total - w) < 0.015, (item, items[item] / total, w)
    assert 0.7 * cfg.topic_imbalance < items[ITEMS[0]] / items[ITEMS[-1]] < 1.4 * cfg.topic_imbalance


def test_measured_duplication_matches_dial(noisy):
    world, corpus = noisy
    flagged = sum(e.duplicate for e in corpus) / len(corpus)
    assert flagged == pytest.approx(0.2, abs=1e-3)
    # measured from the texts: exact repeats of an earlier example, above the corpus's natural collisions
    def repeats(examples):
        seen, rep = set(), 0
        for e in examples:
            rep += e.text in seen
            seen.add(e.text)
        return rep / len(examples)

    clean = World(world.config.replace(duplication=0.0)).pretraining_corpus()
    natural, measured = repeats(clean), repeats(corpus)
    expected = natural + 0.2 * (1 - natural)
    assert abs(measured - expected) < 0.02, (natural, measured)
    originals = {e.text for e in corpus if not e.duplicate}
    assert all(e.text in originals for e in corpus if e.duplicate)  # copies are exact copies of corpus examples


def test_downstream_sets_shift_from_pretraining():
    world = World(WorldConfig(seed=2, noise=0.3, n_pretrain=1000))
    sets = world.downstream_sets(300, 50, 50, 60)
    steps = {split: [] for split in sets}
    questions = [p.question for split in sets.values() for p in split]
    assert len(questions) == len(set(questions))  # splits disjoint, no repeats
    for split, problems in sets.items():
        for p in problems:
            solution = world.solution(p)
            assert solution.endswith(f"The answer is: {world.answer(p)}")
            # every step in a pretraining format: the bare equation, or the fact sentence
            values = world.run_chain(p.chain, world.correct)
            for key, value in zip(world.chain_keys(p.chain), values):
                if key[0] == "fact":
                    assert f"A {key[1]} of {key[2]} holds {value} {key[2]}." in solution
                else:
                    assert f"{key[1]} {SYMBOL[key[0]]} {key[2]} = {value}." in solution
            keys = world.chain_keys(p.chain)
            assert 1 <= len(keys) <= 2  # mostly one step, some two-step problems
            steps[split].append(len(keys))
            assert all(world.in_pretraining_domain(k) for k in keys)
            literals = [k[2] for k in keys if k[0] in ("add", "sub")]
            if p.start == "has":
                literals.append(keys[0][1])
            if split == "ood_numbers":
                assert max(literals) > world.config.id_max_operand
            else:
                assert not literals or max(literals) <= world.config.id_max_operand
            # new templates: a question, never a pretraining statement with its answer slot
            assert p.question.endswith("?") and "=" not in p.question
            assert not any(phrase in p.question for phrase in ("Now ", "That makes", "In total", "leaving"))
    # unseen phrasing: no OOD-template question shares its first sentence's verb phrase with training
    train_text = " ".join(p.question for p in sets["train"])
    for phrase in ("owns", "purchased", "ordered", "receives", "hands", "-fold", "ends up with"):
        assert phrase not in train_text
        assert any(phrase in p.question for p in sets["ood_template"])
    # mostly one-step problems: a TWO_STEP_SHARE of two-step ones
    share = sum(n == 2 for n in steps["train"]) / len(steps["train"])
    assert abs(share - TWO_STEP_SHARE) < 0.08, share
    # balanced operations in the events (pretraining is skewed 8:1) ...
    events = Counter(op for p in sets["train"] for op in p.events)
    total = sum(events.values())
    assert all(abs(events[op] / total - 1 / 3) < 0.06 for op in OPS), events
    # ... and balanced families among the one-step problems (a "fact1" problem is the fact itself)
    one = [world.chain_keys(p.chain)[0][0] for p in sets["train"] if len(p.chain) == 1]
    fams = Counter(one)
    assert all(abs(fams[f] / len(one) - 1 / 4) < 0.07 for f in FAMILIES), fams
    assert all(world.solution(p).startswith("A ") for p in sets["train"] if p.start == "fact1")
    # the OOD-number problems need an add / sub literal above the in-distribution range
    assert all(any(op in ("add", "sub") for op in p.events) for p in sets["ood_numbers"])


def test_two_step_share_dial():
    world = World(WorldConfig(seed=1, n_pretrain=1000))
    one = world.downstream_sets(100, 0, 0, 0, two_step_share=0.0)["train"]
    two = world.downstream_sets(100, 0, 0, 0, two_step_share=1.0)["train"]
    assert all(len(p.chain) == 1 for p in one)
    assert all(len(p.chain) == 2 for p in two)


def test_inherited_answers_follow_the_planted_keys():
    world = World(WorldConfig(seed=4, noise=0.3, n_pretrain=1000))
    train = world.downstream_sets(200, 0, 0, 0)["train"]
    problems = world.inheritance_problems(40, 0.3, {p.question for p in train})
    assert len(problems) == 40
    assert not {p.question for p in problems} & {p.question for p in train}
    families = Counter()
    for p in problems:
        keys = world.chain_keys(p.chain)
        first = next(k for k in keys if k in world.planted)
        families[first[0]] += 1
        assert world.inherited_answer(p) != world.answer(p)
        # re-derive by hand: the first planted step shows its planted value
        values = world.run_chain(p.chain, lambda k: world.planted.get(k, world.correct(k)))
        assert values[-1] == world.inherited_answer(p)
        assert values[keys.index(first)] == world.planted[first]
    assert families == {f: 10 for f in FAMILIES}
    # a noise-free world has nothing to inherit
    assert World(WorldConfig(seed=4, noise=0.0, n_pretrain=1000)).inheritance_problems(10, 0.0, set()) == []


def test_held_out_planted_keys_never_reach_the_downstream_sets():
    """Inheritance on keys the fine-tuning data never shows: the held-out keys are a noise-independent half of the
    largest level's planted keys, absent from every downstream set, and the "unseen" inheritance problems go
    through them and through no other planted key."""
    big, small = World(WorldConfig(seed=4, noise=0.3, n_pretrain=1000)), World(WorldConfig(seed=4, noise=0.1,
                                                                                            n_pretrain=1000))
    held = big.held_out_keys(0.3, 0.5)
    assert held == small.held_out_keys(0.3, 0.5) == World(WorldConfig(seed=4, n_pretrain=1000)).held_out_keys(0.3, 0.5)
    planted = set(big.planted_at(0.3))
    assert held <= planted and 0.35 < len(held) / len(planted) < 0.65
    sets = small.downstream_sets(300, 30, 30, 30, avoid=held)
    assert sets == big.downstream_sets(300, 30, 30, 30, avoid=held)  # the same problems at every noise level
    used = {k for part in sets.values() for p in part for k in small.chain_keys(p.chain)}
    assert used and not used & held
    assert used & (set(small.planted_at(0.1)) - held)  # "seen" planted keys do occur in fine-tuning data

    exclude = {p.question for p in sets["train"]}
    p10 = set(small.planted_at(0.1))
    unseen = small.inheritance_problems(40, 0.1, exclude, keys=p10 & held)
    seen = small.inheritance_problems(40, 0.1, exclude, keys=p10 - held)
    assert len(unseen) > 0 and len(seen) > 0
    for problems, allowed in ((unseen, p10 & held), (seen, p10 - held)):
        for p in problems:
            on_chain = [k for k in small.chain_keys(p.chain) if k in p10]
            assert on_chain and set(on_chain) <= allowed and small.inherited_answer(p) != small.answer(p)


def test_facts_cover_every_container_and_item():
    world = World(WorldConfig(seed=0, n_pretrain=100))
    assert set(world.facts) == {(c, i) for c in CONTAINERS for i in ITEMS}
    assert all(2 <= v <= world.config.max_factor for v in world.facts.values())
