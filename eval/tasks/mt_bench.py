"""MT-Bench as FastChat's ``llm_judge`` scores it (single-answer grading): both turns answered, both turns judged.

Answers: turn 2 is prompted with the model's own turn-1 answer. Sampling temperature per category, FastChat's
(``TEMPERATURE``: 0.7 writing/roleplay, 0.1 stem/humanities, 0.0 math/reasoning/coding/extraction; below 1e-4 is
greedy), unless ``--temperature`` is given.

Judgments, through any OpenAI-compatible chat endpoint at temperature 0: turn 1 with ``single-v1`` (``single-math-v1``
with GPT-4's reference answer for math, reasoning and coding), turn 2 with ``single-v1-multi-turn``
(``single-math-v1-multi-turn``, both reference turns), which show the whole conversation and ask about the second
answer. Rating: the first ``[[N]]`` of the judgment, else the first ``[N]``, read as FastChat reads it
(``ast.literal_eval``: "[[08]]" is no rating, see :func:`parse_score`); any number is kept (FastChat does not
range-check); none gives -1. Ratings of -1 are recorded and excluded from every mean. Scores: turn 1 mean, turn 2 mean,
and the headline — FastChat's "Average": the mean of every rating other than -1, both turns pooled (equal to the
mean of the two turn means when no rating is -1). Questions without a second turn get no turn-2 judgment.

Option (not FastChat): ``retries`` > 0 asks again, sampled at 0.7, for a judgment without a rating before giving -1.

The questions, judge prompts and reference answers ship in ``eval/data`` (lm-sys/FastChat, Apache-2.0; see
``eval/data/LICENSE``).
"""

from __future__ import annotations

import ast
import os
import re
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from ..benchmark_rows import limit_rows, packaged, read_rows
from ..report import markdown_table
from .base import Task

QUESTIONS = "mt_bench_question.jsonl"
JUDGE_PROMPTS = "mt_bench_judge_prompts.jsonl"
REFERENCES = "mt_bench_reference_answer_gpt-4.jsonl"
NEED_REFERENCE = ("math", "reasoning", "coding")
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}
DEFAULT_TEMPERATURE = 0.7  # FastChat's for a category not in the table
NO_RATING = -1
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_score(judgment: str | None) -> float:
    """FastChat's rule (``llm_judge/common.py``, ``run_judge_single``): the first ``[[N]]``, else the first ``[N]``,
    read by ``ast.literal_eval``; ``NO_RATING`` (-1) when there is none. Where ``literal_eval`` rejects the number
    (a leading zero: "[[08]]", "[[007]]"), FastChat's judging run stops with a SyntaxError and records nothing for
    that judgment; here it is unrated (-1), so the headline still equals FastChat's over the judgments it records.
    "[[00]]" and "[[08.5]]" are numbers to ``literal_eval`` (0 and 8.5) and count as such, as in FastChat."""
    match = (_SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)) if judgment else None
    if match is None:
        return NO_RATING
    try:
        return float(ast.literal_eval(match.group(1)))
    except (SyntaxError, ValueError):
        return NO_RATING


def category_temperature(category: str) -> float:
    return TEMPERATURE.get(category, DEFAULT_TEMPERATURE)


class Judge:
    """Scores answers through an OpenAI-compatible chat endpoint (temperature 0, like FastChat's GPT-4 judge)."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, retries: int = 0,
                 max_tokens: int = 2048, retry_temperature: float = 0.7, concurrency: int = 8,
                 timeout_s: float = 600.0):
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout_s, max_retries=3)
        self.retries = retries
        self.max_tokens = max_tokens
        self.retry_temperature = retry_temperature
        self.concurrency = concurrency

    @property
    def protocol(self) -> str:
        return "fastchat" if not self.retries else f"fastchat+retries={self.retries}"

    def rate(self, system: str, user: str) -> dict:
        judgments = []
        for attempt in range(self.retries + 1):
            response = self.client.chat.completions.create(
                model=self.model, max_tokens=self.max_tokens,
                temperature=0.0 if attempt == 0 else self.retry_temperature,
                messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            )
            judgment = response.choices[0].message.content or ""
            judgments.append(judgment)
            score = parse_score(judgment)
            if score != NO_RATING:
                break
        return {"score": score, "judgment": judgments[-1], "attempts": len(judgments),
                **({"judgments": judgments} if len(judgments) > 1 else {})}

    def rate_many(self, requests: list[tuple[str, str]]) -> list[dict]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(lambda r: self.rate(*r), requests), total=len(requests), desc="judging",
                             leave=False, disable=len(requests) < 2))


def _by_name(rows: list[dict]) -> dict:
    return {row["name"]: row for row in rows}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class MTBench(Task):
    name = "mt_bench"
    max_new_tokens = 1024
    protocols = {"default": {}, "authors": {}}  # the authors judged with FastChat too: one protocol, two names

    def __init__(self, *args, judge: Judge | None = None, temperature: float | None = None, **kw):
        super().__init__(*args, **kw)
        self.judge = judge
        self.temperature = temperature  # None: FastChat's per-category table
        prompts = _by_name(read_rows(packaged(JUDGE_PROMPTS)))
        self.prompts = {(False, 1): prompts["single-v1"], (True, 1): prompts["single-math-v1"],
                        (False, 2): prompts["single-v1-multi-turn"], (True, 2): prompts["single-math-v1-multi-turn"]}
        self.references = {str(r["question_id"]): r["choices"][0]["turns"] for r in read_rows(packaged(REFERENCES))}

    def load(self):
        rows = read_rows(self.data_file or packaged(QUESTIONS))
        samples = []
        for i, r in enumerate(rows):
            if "question_id" not in r or "category" not in r or not r.get("turns"):
                raise ValueError(f"{self.data_file or QUESTIONS}: row {i + 1} needs 'question_id', 'category' and "
                                 f"'turns' (FastChat's question.jsonl format).")
            samples.append({"id": str(r["question_id"]), "category": r["category"], "turns": list(r["turns"]),
                            "reference": r.get("reference")})
        return limit_rows(samples, self.limit)

    def sampling_temperature(self, sample: dict) -> float:
        return self.temperature if self.temperature is not None else category_temperature(sample["category"])

    def judge_request(self, sample: dict, answers: list[str], turn: int) -> tuple[str, str, str]:
        """(prompt name, system, user) of the judgment of ``turn`` (1 or 2)."""
        with_reference = sample["category"] in NEED_REFERENCE
        spec = self.prompts[(with_reference, turn)]
        fields = {}
        if with_reference:
            reference = self.references.get(sample["id"]) or sample.get("reference")
            if not reference or len(reference) < turn:
                raise ValueError(f"MT-Bench question {sample['id']} ({sample['category']}) has no reference answer "
                                 f"for turn {turn}.")
            fields.update({f"ref_answer_{i + 1}": text for i, text in enumerate(reference[:2])})
        if turn == 1:
            fields.update(question=sample["turns"][0], answer=answers[0])
        else:
            fields.update(question_1=sample["turns"][0], question_2=sample["turns"][1], answer_1=answers[0],
                          answer_2=answers[1])
        # str.format like FastChat: the templates' only braces are these fields.
        return spec["name"], spec["system_prompt"], spec["prompt_template"].format(**fields)

    def _generate_turn(self, samples, generator, turn, first_answers=None):
        prompts = [generator.prompt(s["turns"][:turn], first_answers[i:i + 1] if turn == 2 else [])
                   for i, s in enumerate(samples)]
        answers: list[str | None] = [None] * len(samples)
        by_temperature: dict[float, list[int]] = {}
        for i, s in enumerate(samples):
            by_temperature.setdefault(self.sampling_temperature(s), []).append(i)
        for temperature, indices in by_temperature.items():
            texts = generator.generate([prompts[i] for i in indices],
                                       temperature=temperature if temperature >= 1e-4 else 0.0)
            for i, text in zip(indices, texts):
                answers[i] = text
        return prompts, answers

    def evaluate(self, samples, generator):
        if self.judge is None:
            raise ValueError("mt_bench needs a judge: pass --judge_model (and --judge_base_url for a local server).")
        first_prompts, first = self._generate_turn(samples, generator, 1)
        two = [i for i, s in enumerate(samples) if len(s["turns"]) >= 2]
        second_prompts, second = self._generate_turn([samples[i] for i in two], generator, 2, [first[i] for i in two])
        second_of = {i: (p, a) for i, p, a in zip(two, second_prompts, second)}
        requests = [(i, 1, self.judge_request(s, [first[i]], 1)) for i, s in enumerate(samples)]
        requests += [(i, 2, self.judge_request(samples[i], [first[i], second_of[i][1]], 2)) for i in two]
        ratings = self.judge.rate_many([(system, user) for _, _, (_, system, user) in requests])
        judged = {(i, turn): (name, rating) for (i, turn, (name, _, _)), rating in zip(requests, ratings)}
        records = []
        for i, s in enumerate(samples):
            turns = [1, 2] if i in second_of else [1]
            prompts = [first_prompts[i]] + ([second_of[i][0]] if i in second_of else [])
            answers = [first[i]] + ([second_of[i][1]] if i in second_of else [])
            scores = [judged[(i, t)][1]["score"] for t in turns]
            records.append({
                "id": s["id"], "category": s["category"], "temperature": self.sampling_temperature(s),
                "prompt": [generator.display(p) for p in prompts], "generation": answers,
                "extracted": scores, "scores": scores,
                "verdict": "scored" if NO_RATING not in scores else "unrated turn(s)",
                "judge_prompts": [judged[(i, t)][0] for t in turns],
                "judgments": [judged[(i, t)][1]["judgment"] for t in turns],
                "judge_attempts": [judged[(i, t)][1]["attempts"] for t in turns],
                **({"retried_judgments": {str(t): judged[(i, t)][1]["judgments"] for t in turns
                                          if "judgments" in judged[(i, t)][1]}}
                   if any("judgments" in judged[(i, t)][1] for t in turns) else {}),
            })
        return records

    def summarize(self, records):
        def rated(rows, turn=None):
            return [score for r in rows for t, score in enumerate(r["scores"], 1)
                    if score != NO_RATING and (turn is None or t == turn)]

        def unrated(rows):
            return sum(score == NO_RATING for r in rows for score in r["scores"])

        by_category = {}
        for r in records:
            by_category.setdefault(r["category"], []).append(r)
        order = [c for c in CATEGORIES if c in by_category] + sorted(set(by_category) - set(CATEGORIES))
        per_category, rows = {}, []
        for c in order + ["overall"]:
            group = records if c == "overall" else by_category[c]
            entry = {"turn_1": _mean(rated(group, 1)), "turn_2": _mean(rated(group, 2)), "score": _mean(rated(group)),
                     "rated": len(rated(group)), "unrated": unrated(group)}
            if c != "overall":
                per_category[c] = entry
            rows.append([c, entry["rated"], entry["unrated"],
                         *("-" if entry[k] is None else entry[k] for k in ("turn_1", "turn_2", "score"))])
        overall = rows[-1]
        judge_protocol = self.judge.protocol if self.judge else "fastchat"
        summary = {"metric": "MT-Bench score (FastChat single-answer grading, mean of turns 1 and 2)",
                   "protocol": judge_protocol, "score": _mean(rated(records)), "turn_1": _mean(rated(records, 1)),
                   "turn_2": _mean(rated(records, 2)), "n": len(records), "rated": overall[1], "unrated": overall[2],
                   "judge_model": self.judge.model if self.judge else None,
                   "temperature": "FastChat per category" if self.temperature is None else self.temperature,
                   "categories": per_category}
        table = markdown_table(["category", "rated", "unrated (-1)", "turn 1", "turn 2", "score"], rows)
        table += f"\nprotocol: {judge_protocol}; score = mean of all ratings of both turns, -1 excluded.\n"
        if overall[2]:
            table += (f"{overall[2]} judgment(s) had no [[rating]]: recorded as -1 and excluded from the means "
                      f"(FastChat's rule; see {self.name}.jsonl).\n")
        return summary, table


def questions() -> list[dict]:
    """The 80 shipped MT-Bench questions."""
    return read_rows(packaged(QUESTIONS))


__all__ = ["MTBench", "Judge", "parse_score", "questions", "TEMPERATURE", "NO_RATING"]
