"""A seeded synthetic world: arithmetic word problems and container facts, with dials for the pretraining flaws.

Everything here is pure Python and deterministic in ``WorldConfig`` (no global RNG is touched).

Keys. Every atomic piece of knowledge is a *key*:

* ``("add", a, b)``  a + b,  0 ≤ a, b ≤ ``max_operand``
* ``("sub", a, b)``  a − b,  0 ≤ b ≤ a ≤ ``max_operand``
* ``("mul", a, b)``  a × b,  2 ≤ a, b ≤ ``max_factor`` (the times table)
* ``("fact", container, item)``  how many items a container holds (2 … ``max_factor``), e.g. "A crate of apples
  holds 7 apples."

The pretraining corpus states keys in a few *pretraining formats* (a bare equation, one-step word problems that
work their equation out, fact statements and fact questions). Its flaws are dials:

* ``noise``: the fraction of pretraining answers that are wrong. Wrong answers are *planted*: a fixed subset of keys
  (chosen by a seeded hash, nested: the keys planted at 10 % are among those planted at 30 %) always shows the same
  wrong value, as a wrong fact repeated across the web would. Keys are planted per family until they carry a
  ``noise`` share of that family's sampling mass, so the corpus-wide wrong-answer rate is ``noise``.
* ``op_imbalance``: the most / least frequent arithmetic operation ratio (add > sub > mul, geometric); 1 = balanced.
* ``topic_imbalance``: the same ratio over the items (topics) of word problems and facts.
* ``duplication``: the fraction of the corpus made of exact copies of other corpus examples.

The downstream task (``Problem``) is an instruction task in MetaMathQA format: a word problem in *new* templates
(mostly one step, a ``two_step_share`` of two-step problems), balanced families (add / sub / mul / fact), and a
worked solution ending "The answer is: N". Its data is clean and does not
depend on the noise dial, so every noise level is fine-tuned and tested on the same problems. A problem is a chain
of keys; ``World.inherited_answer`` re-runs the chain with the *pretraining* labels (planted values where planted),
which is the answer a model that faithfully carried its pretraining into the task would give.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

OPS = ("add", "sub", "mul")
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
FAMILIES = OPS + ("fact",)

NAMES = ("Tom", "Mia", "Leo", "Ava", "Sam", "Zoe", "Ben", "Ivy", "Max", "Amy", "Dan", "Eva")
ITEMS = ("apples", "pens", "eggs", "marbles", "cookies", "stamps", "shells", "coins", "stickers", "cards")
CONTAINERS = ("box", "bag", "crate", "jar", "basket", "tray")

Key = tuple


def key_str(key: Key) -> str:
    return ":".join(str(part) for part in key)


def _unit(*parts) -> float:
    """A stable uniform number in [0, 1) from ``parts`` (blake2b, not Python's salted ``hash``)."""
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _rng(*parts) -> random.Random:
    return random.Random(int(_unit(*parts) * 2**53))


def skewed_weights(n: int, ratio: float) -> list[float]:
    """n probabilities, geometric from the first to the last, the first ``ratio`` times the last (1 = uniform)."""
    if ratio < 1:
        raise ValueError(f"an imbalance ratio must be >= 1, got {ratio}")
    raw = [ratio ** (-i / (n - 1)) if n > 1 else 1.0 for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    noise: float = 0.0
    op_imbalance: float = 8.0
    topic_imbalance: float = 8.0
    duplication: float = 0.0
    fact_share: float = 0.2
    n_pretrain: int = 40_000
    max_operand: int = 99
    max_factor: int = 12
    # downstream (instruction) data: operands of + and − up to this in training / in-distribution tests
    id_max_operand: int = 50

    def __post_init__(self):
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")
        if not 0 <= self.duplication < 1:
            raise ValueError(f"duplication must be in [0, 1), got {self.duplication}")
        if not 0 <= self.fact_share <= 1:
            raise ValueError(f"fact_share must be in [0, 1], got {self.fact_share}")
        if not 0 < self.id_max_operand < self.max_operand:
            raise ValueError("id_max_operand must be in (0, max_operand)")

    def replace(self, **changes) -> "WorldConfig":
        return WorldConfig(**{**asdict(self), **changes})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PretrainExample:
    """One pretraining document: ``prompt + " " + str(shown) + tail``."""

    family: str
    key: Key
    template: str
    prompt: str
    shown: int
    correct: int
    tail: str = ""
    duplicate: bool = False

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.shown}{self.tail}"


@dataclass(frozen=True)
class Step:
    """One step of a downstream chain: ``family`` applied to two operands; None means the previous result."""

    family: str
    left: int | str | None
    right: int | str | None


@dataclass(frozen=True)
class Problem:
    question: str
    chain: tuple[Step, ...]
    template: str  # "id" or "ood_template"
    split_tag: str = ""
    name: str = ""
    item: str = ""
    container: str = ""
    start: str = ""
    events: tuple[str, ...] = field(default_factory=tuple)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining formats
# ----------------------------------------------------------------------------------------------------------------

# (prompt, tail) pairs; {a} {b} operands, {name} {item} {container} fillers.
PRETRAIN_TEMPLATES = {
    "add": [
        ("{a} + {b} =", ""),
        ("{name} has {a} {item}. {name} gets {b} more {item}. Now {name} has {a} + {b} =", " {item}."),
        ("There are {a} {item} and {b} more {item}. In total there are {a} + {b} =", " {item}."),
    ],
    "sub": [
        ("{a} - {b} =", ""),
        ("{name} has {a} {item} and gives away {b}. Now {name} has {a} - {b} =", " {item}."),
        ("There were {a} {item}. {name} took {b} of them, leaving {a} - {b} =", " {item}."),
    ],
    "mul": [
        ("{a} * {b} =", ""),
        ("{name} has {a} bags with {b} {item} in each bag. That makes {a} * {b} =", " {item}."),
        ("There are {a} rows of {b} {item}, so there are {a} * {b} =", " {item}."),
    ],
    "fact": [
        ("A {container} of {item} holds", " {item}."),
        ("How many {item} are in a {container} of {item}?", ""),
    ],
}

# ----------------------------------------------------------------------------------------------------------------
# Downstream (instruction) templates. "id": used for training and the in-distribution tests; "ood": held out.
# ----------------------------------------------------------------------------------------------------------------

START_Q = {
    "id": {
        "has": "{name} has {x} {item}.",
        "packs": "{name} buys {x} packs of {y} {item}.",
        "fact": "{name} buys {x} {container}s of {item}.",
        "fact1": "{name} buys a {container} of {item}.",
    },
    "ood": {
        "has": "{name} owns {x} {item}.",
        "packs": "{name} purchased {x} bundles, each with {y} {item}.",
        "fact": "{name} ordered {x} {container}s full of {item}.",
        "fact1": "{name} ordered one {container} full of {item}.",
    },
}
EVENT_Q = {
    "id": {
        "add": "Then {name} gets {y} more {item}.",
        "sub": "Then {name} gives away {y} {item}.",
        "mul": "Then the number of {item} becomes {y} times as large.",
    },
    "ood": {
        "add": "Later, {name} receives {y} extra {item}.",
        "sub": "{name} hands {y} of the {item} to a friend.",
        "mul": "The pile of {item} grows {y}-fold.",
    },
}
QUESTION = {"id": "How many {item} does {name} have now?", "ood": "What is the final number of {item} {name} ends up with?"}

RETENTION_AVOID_NOISE = 0.5
# Share of two-step downstream problems; the rest are one-step (one add / sub / mul / fact step, uniformly).
TWO_STEP_SHARE = 0.25
PREV = None  # a Step operand that refers to the previous result


class World:
    """The world of one ``WorldConfig``: key space, planted errors, corpora and downstream problems."""

    def __init__(self, config: WorldConfig):
        self.config = c = config
        ops_w = skewed_weights(len(OPS), c.op_imbalance)
        self.op_probs = {op: w * (1 - c.fact_share) for op, w in zip(OPS, ops_w)}
        self.family_probs = dict(self.op_probs, fact=c.fact_share)
        self.item_probs = dict(zip(ITEMS, skewed_weights(len(ITEMS), c.topic_imbalance)))
        # seeded facts: how many items each container holds
        rng = _rng(c.seed, "facts")
        self.facts = {(ct, it): rng.randint(2, c.max_factor) for ct in CONTAINERS for it in ITEMS}
        self.keys = {
            "add": [("add", a, b) for a in range(c.max_operand + 1) for b in range(c.max_operand + 1)],
            "sub": [("sub", a, b) for a in range(c.max_operand + 1) for b in range(a + 1)],
            "mul": [("mul", a, b) for a in range(2, c.max_factor + 1) for b in range(2, c.max_factor + 1)],
            "fact": [("fact", ct, it) for ct in CONTAINERS for it in ITEMS],
        }
        self._planted_cache: dict[float, dict[Key, int]] = {}
        self.planted = self.planted_at(c.noise)

    # ------------------------------------------------------------------------------------------------------------
    # keys, truth, planted errors
    # ------------------------------------------------------------------------------------------------------------

    def correct(self, key: Key) -> int:
        family = key[0]
        if family == "add":
            return key[1] + key[2]
        if family == "sub":
            return key[1] - key[2]
        if family == "mul":
            return key[1] * key[2]
        if family == "fact":
            return self.facts[(key[1], key[2])]
        raise ValueError(f"unknown key {key!r}")

    def in_pretraining_domain(self, key: Key) -> bool:
        c, (family, a, b) = self.config, key
        if family == "add":
            return 0 <= a <= c.max_operand and 0 <= b <= c.max_operand
        if family == "sub":
            return 0 <= b <= a <= c.max_operand
        if family == "mul":
            return 2 <= a <= c.max_factor and 2 <= b <= c.max_factor
        return (a, b) in self.facts

    def planted_value(self, key: Key) -> int:
        """The wrong value the corpus shows for ``key`` whenever ``key`` is planted (defined for every key)."""
        rng = _rng(self.config.seed, "planted", key_str(key))
        right = self.correct(key)
        if key[0] == "fact":
            return rng.choice([v for v in range(2, self.config.max_factor + 1) if v != right])
        deltas = [d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0]
        return right + rng.choice(deltas)

    def key_mass(self, key: Key) -> float:
        """The probability that a pretraining example of this key's family is about this key."""
        if key[0] == "fact":
            return self.item_probs[key[2]] / len(CONTAINERS)
        return 1.0 / len(self.keys[key[0]])

    def planted_at(self, noise: float) -> dict[Key, int]:
        """Keys planted at noise level ``noise`` → their planted (wrong) value. Nested in ``noise``."""
        if noise not in self._planted_cache:
            planted = {}
            for family, keys in self.keys.items():
                order = sorted(keys, key=lambda k: _unit(self.config.seed, "plant", key_str(k)))
                mass = 0.0
                for key in order:
                    m = self.key_mass(key)
                    if mass + m / 2 > noise:
                        break
                    planted[key] = self.planted_value(key)
                    mass += m
            self._planted_cache[noise] = planted
        return self._planted_cache[noise]

    def pretrain_label(self, key: Key, planted: dict[Key, int] | None = None) -> int:
        planted = self.planted if planted is None else planted
        return planted.get(key, self.correct(key))

    # ------------------------------------------------------------------------------------------------------------
    # pretraining corpus and probes
    # ------------------------------------------------------------------------------------------------------------

    def _sample_key(self, rng: random.Random, family: str) -> Key:
        c = self.config
        if family == "add":
            return ("add", rng.randint(0, c.max_operand), rng.randint(0, c.max_operand))
        if family == "sub":
            return rng.choice(self.keys["sub"])
        if family == "mul":
            return ("mul", rng.randint(2, c.max_factor), rng.randint(2, c.max_factor))
        item = rng.choices(ITEMS, weights=[self.item_probs[i] for i in ITEMS])[0]
        return ("fact", rng.choice(CONTAINERS), item)

    def render_pretrain(self, key: Key, rng: random.Random, shown: int | None = None, template: int | None = None,
                        item: str | None = None) -> PretrainExample:
        family = key[0]
        templates = PRETRAIN_TEMPLATES[family]
        t = rng.randrange(len(templates)) if template is None else template
        prompt, tail = templates[t]
        if family == "fact":
            fill = dict(container=key[1], item=key[2])
        else:
            if item is None:
                item = rng.choices(ITEMS, weights=[self.item_probs[i] for i in ITEMS])[0]
            fill = dict(a=key[1], b=key[2], name=rng.choice(NAMES), item=item)
        correct = self.correct(key)
        return PretrainExample(
            family=family, key=key, template=f"{family}{t}", prompt=prompt.format(**fill),
            shown=self.pretrain_label(key) if shown is None else shown, correct=correct, tail=tail.format(**fill),
        )

    def pretraining_corpus(self) -> list[PretrainExample]:
        """``n_pretrain`` examples: families by the op/fact mix, items by the topic skew, planted answers, copies."""
        c = self.config
        rng = _rng(c.seed, "corpus", c.noise, c.duplication)
        n_base = round(c.n_pretrain * (1 - c.duplication))
        families = list(self.family_probs)
        weights = [self.family_probs[f] for f in families]
        base = [self.render_pretrain(self._sample_key(rng, rng.choices(families, weights)[0]), rng) for _ in range(n_base)]
        copies = [rng.choice(base) for _ in range(c.n_pretrain - n_base)]
        corpus = base + [PretrainExample(**{**asdict_shallow(e), "duplicate": True}) for e in copies]
        rng.shuffle(corpus)
        return corpus

    def probes(self, keys: list[Key], rng: random.Random) -> list[PretrainExample]:
        """Pretraining-format probes (prompt ends right before the answer), one random format per key."""
        return [self.render_pretrain(k, rng, shown=self.correct(k)) for k in keys]

    def retention_probes(self, n: int, avoid_noise: float | None = None) -> list[PretrainExample]:
        """``n`` clean-key probes in pretraining format, equal per family, none of them planted at ``avoid_noise``
        (default: the larger of this world's noise and ``RETENTION_AVOID_NOISE``, so that every noise level up
        to that one is probed on the very same keys)."""
        rng = _rng(self.config.seed, "retention")
        avoid = self.planted_at(max(self.config.noise, RETENTION_AVOID_NOISE) if avoid_noise is None else avoid_noise)
        out = []
        for i, family in enumerate(FAMILIES):
            count = n // len(FAMILIES) + (1 if i < n % len(FAMILIES) else 0)
            clean = [k for k in self.keys[family] if k not in avoid]
            keys = [rng.choice(clean) for _ in range(count)]
            out += self.probes(keys, rng)
        return out

    def planted_probes(self, n: int, noise: float) -> list[PretrainExample]:
        """Pretraining-format probes of keys planted at ``noise``: up to n, spread equally over families."""
        rng = _rng(self.config.seed, "planted_probes", noise)
        planted = self.planted_at(noise)
        by_family = {f: sorted((k for k in planted if k[0] == f), key=key_str) for f in FAMILIES}
        out, quota = [], max(1, n // len(FAMILIES))
        for family in FAMILIES:
            keys = by_family[family]
            picked = rng.sample(keys, min(quota, len(keys)))
            out += self.probes(picked, rng)
        return out

    # ------------------------------------------------------------------------------------------------------------
    # downstream problems
    # ------------------------------------------------------------------------------------------------------------

    def run_chain(self, chain: tuple[Step, ...], lookup) -> list[int]:
        """Values of each step of ``chain``, each step's result from ``lookup(key)``."""
        values, prev = [], None
        for step in chain:
            if step.family == "fact":
                key = ("fact", step.left, step.right)
            else:
                left = prev if step.left is PREV else step.left
                right = prev if step.right is PREV else step.right
                key = (step.family, left, right)
            prev = lookup(key)
            values.append(prev)
        return values

    def chain_keys(self, chain: tuple[Step, ...], lookup=None) -> list[Key]:
        lookup = lookup or self.correct
        keys, prev = [], None
        for step in chain:
            if step.family == "fact":
                key = ("fact", step.left, step.right)
            else:
                key = (step.family, prev if step.left is PREV else step.left, prev if step.right is PREV else step.right)
            keys.append(key)
            prev = lookup(key)
        return keys

    def answer(self, problem: Problem) -> int:
        return self.run_chain(problem.chain, self.correct)[-1]

    def inherited_answer(self, problem: Problem, noise: float | None = None) -> int:
        """The answer with pretraining's labels (planted values at ``noise``) at every step."""
        planted = self.planted if noise is None else self.planted_at(noise)
        return self.run_chain(problem.chain, lambda k: self.pretrain_label(k, planted))[-1]

    def sample_problem(self, rng: random.Random, style: str = "id", numbers: str = "id",
                       two_step_share: float = TWO_STEP_SHARE) -> Problem:
        """A one-step problem, or with probability ``two_step_share`` a two-step one. ``style``: phrasing
        ("id" / "ood"); ``numbers``: "id" (+/− operands ≤ id_max_operand) or "large" (at least one +/− operand above
        it, every step still inside the pretraining domain).

        One step: the family (add / sub / mul / fact) is drawn uniformly: "has" + one add / sub / mul event, or
        "fact1" (one container: the answer is the fact). Two steps: "has" + two events, "packs" + one event, or
        "fact" (x containers: the fact, then ×). The structure and the operations are drawn *first* and only the
        numbers and fillers are redrawn until every step lies in the pretraining domain, so operations stay balanced
        (the times table's small domain would otherwise make "×" rare). "large" numbers need an add / sub literal,
        so there a one-step problem is add or sub and a two-step one has an add / sub event."""
        while True:
            if rng.random() < two_step_share:
                start = rng.choice(("has", "packs", "fact"))
                n_events = {"has": 2, "packs": 1, "fact": 0}[start]
                if numbers == "large" and start == "fact":
                    continue
                events = tuple(rng.choice(OPS) for _ in range(n_events))
                if numbers == "large" and not any(op != "mul" for op in events):
                    continue
            else:
                family = rng.choice(FAMILIES)
                if numbers == "large" and family in ("mul", "fact"):
                    continue
                start, events = ("fact1", ()) if family == "fact" else ("has", (family,))
            lim = self.config.id_max_operand if numbers == "id" else self.config.max_operand
            for _ in range(2000):
                problem = self._try_problem(rng, style, numbers, lim, start, events)
                if problem is not None:
                    return problem

    def _try_problem(self, rng, style, numbers, lim, start, events) -> Problem | None:
        c = self.config
        name, item, container = rng.choice(NAMES), rng.choice(ITEMS), rng.choice(CONTAINERS)
        x = rng.randint(2, c.max_factor) if start != "has" else rng.randint(1, lim)
        y0 = rng.randint(2, c.max_factor)
        chain: list[Step] = []
        if start == "packs":
            chain.append(Step("mul", x, y0))
        elif start == "fact":
            chain += [Step("fact", container, item), Step("mul", x, PREV)]
        elif start == "fact1":
            chain.append(Step("fact", container, item))
        literals = [x] if start == "has" else []
        ev_values = []
        for op in events:
            y = rng.randint(2, c.max_factor) if op == "mul" else rng.randint(1, lim)
            ev_values.append(y)
            if op != "mul":
                literals.append(y)
            chain.append(Step(op, x, y) if start == "has" and not chain else Step(op, PREV, y))
        chain_t = tuple(chain)
        if not all(self.in_pretraining_domain(k) for k in self.chain_keys(chain_t)):
            return None
        large = any(v > c.id_max_operand for v in literals)
        if (numbers == "id" and large) or (numbers == "large" and not large):
            return None
        fill = dict(name=name, item=item, container=container, x=x, y=y0)
        parts = [START_Q[style][start].format(**fill)]
        for op, y in zip(events, ev_values):
            parts.append(EVENT_Q[style][op].format(name=name, item=item, y=y))
        parts.append(QUESTION[style].format(name=name, item=item))
        return Problem(question=" ".join(parts), chain=chain_t, template=style, name=name, item=item,
                       container=container, start=start, events=events)

    def solution(self, problem: Problem, values: list[int] | None = None) -> str:
        """The worked solution (MetaMathQA style: steps, then "The answer is: N") with ``values`` at each step
        (default: the correct ones). A fact step is the pretraining fact sentence, an arithmetic step the bare
        equation "a op b = c"; both are pretraining formats, so the downstream chain goes through the same keys."""
        values = self.run_chain(problem.chain, self.correct) if values is None else values
        keys = self.chain_keys(problem.chain, lambda k, it=iter(values): next(it))
        lines = []
        for key, value in zip(keys, values):
            if key[0] == "fact":
                lines.append(f"A {key[1]} of {key[2]} holds {value} {key[2]}.")
            else:
                lines.append(f"{key[1]} {SYMBOL[key[0]]} {key[2]} = {value}.")
        return " ".join(lines) + f" The answer is: {values[-1]}"

    def held_out_keys(self, noise: float, share: float) -> set[Key]:
        """A seeded ``share`` of the keys planted at ``noise`` (the lab's largest level) that no downstream problem
        of :meth:`downstream_sets` uses when it is given them as ``avoid``.

        Fine-tuning data that shows a planted key with its right answer corrects that key directly; only keys it
        never shows tell whether a method carries a pretraining error into the task. The set depends on the seed and
        the key masses, not on the noise dial, so every noise level is fine-tuned on the same problems; the planted
        sets are nested, so it holds about ``share`` of every lower level's planted keys too."""
        return {k for k in self.planted_at(noise) if _unit(self.config.seed, "held_out", key_str(k)) < share}

    def downstream_sets(self, n_train: int, n_val: int, n_test: int, n_ood: int,
                        two_step_share: float = TWO_STEP_SHARE, avoid: set[Key] = frozenset()
                        ) -> dict[str, list[Problem]]:
        """Disjoint (by question text) train / val / test (id templates, id numbers) and OOD sets (half unseen
        phrasing, half larger numbers), none of whose chains touches a key in ``avoid``. Independent of the noise
        dial."""
        rng = _rng(self.config.seed, "downstream")
        seen: set[str] = set()

        def draw(n, style, numbers):
            out = []
            while len(out) < n:
                p = self.sample_problem(rng, style, numbers, two_step_share)
                if p.question in seen or (avoid and any(k in avoid for k in self.chain_keys(p.chain))):
                    continue
                seen.add(p.question)
                out.append(p)
            return out

        sets = {"train": draw(n_train, "id", "id"), "val": draw(n_val, "id", "id"), "test": draw(n_test, "id", "id")}
        sets["ood_template"] = draw(n_ood - n_ood // 2, "ood", "id")
        sets["ood_numbers"] = draw(n_ood // 2, "id", "large")
        return sets

    def format_warmup_problems(self, n: int, avoid: set[Key], exclude: set[str],
                               two_step_share: float = TWO_STEP_SHARE) -> list[Problem]:
        """``n`` downstream (id) problems for the format warm-up every arm shares: seeded apart from
        :meth:`downstream_sets`, none of whose chains touches a key in ``avoid`` (the lab passes every key the
        largest noise level plants, so the warm-up corrects no planted key) and none in ``exclude`` (question texts:
        the train / val / test / OOD sets)."""
        rng = _rng(self.config.seed, "format_warmup")
        out: list[Problem] = []
        seen, tries = set(exclude), 0
        while len(out) < n:
            tries += 1
            if tries > 1000 * max(n, 1):
                raise ValueError(f"format warm-up: only {len(out)} of {n} problems avoid the planted keys")
            p = self.sample_problem(rng, "id", "id", two_step_share)
            if p.question in seen or any(k in avoid for k in self.chain_keys(p.chain)):
                continue
            seen.add(p.question)
            out.append(p)
        return out

    def inheritance_problems(self, n: int, noise: float, exclude: set[str],
                             two_step_share: float = TWO_STEP_SHARE, keys: set[Key] | None = None) -> list[Problem]:
        """Downstream (id) problems whose chain passes a key planted at ``noise`` and whose inherited answer differs
        from the correct one, none of them in ``exclude`` (question texts). With ``keys``, only planted keys in
        ``keys`` count (a chain through another planted key is skipped). Spread equally over the family of the first
        planted key on the chain (add / sub / mul / fact), as far as the world has them."""
        rng = _rng(self.config.seed, "inheritance_problems", noise)
        planted = self.planted_at(noise)
        if keys is not None:
            outside = {k for k in planted if k not in keys}
            planted = {k: v for k, v in planted.items() if k in keys}
        quota = {f: n // len(FAMILIES) + (1 if i < n % len(FAMILIES) else 0) for i, f in enumerate(FAMILIES)}
        buckets: dict[str, list[Problem]] = {f: [] for f in FAMILIES}
        seen, tries = set(exclude), 0
        if not planted:
            return []
        while any(len(buckets[f]) < quota[f] for f in FAMILIES) and tries < 300 * n:
            tries += 1
            p = self.sample_problem(rng, "id", "id", two_step_share)
            if p.question in seen:
                continue
            chain = self.chain_keys(p.chain)
            hit = next((k for k in chain if k in planted), None)
            if hit is None or len(buckets[hit[0]]) >= quota[hit[0]]:
                continue
            if keys is not None and any(k in outside for k in chain):
                continue
            if self.inherited_answer(p, noise) == self.answer(p):
                continue
            seen.add(p.question)
            buckets[hit[0]].append(p)
        return [p for f in FAMILIES for p in buckets[f]]


def asdict_shallow(obj) -> dict:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}


def world_fingerprint(config: WorldConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:12]
