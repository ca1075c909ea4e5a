"""MT-Bench: both turns of the 80 questions are generated; a judge model scores the first turn, FastChat style.

The judge is any OpenAI-compatible chat endpoint. Prompts are FastChat's single-answer grading prompts
(``single-v1``; ``single-math-v1`` with GPT-4's reference answer for math, reasoning and coding), the score is
the ``[[N]]`` of the judgment (FastChat's ``[N]`` backup), 1-10. A judgment without a score is asked again
(``retries`` times, sampled, since a greedy judge would repeat itself); one that still has none is recorded with
verdict ``unparseable``, counted in the summary and left out of the means — never dropped silently.

The questions, judge prompts and reference answers ship in ``eval/data`` (lm-sys/FastChat, Apache-2.0; see
``eval/data/LICENSE``).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from ..data import limit_rows, packaged, read_rows
from ..report import markdown_table
from .base import Task

QUESTIONS = "mt_bench_question.jsonl"
JUDGE_PROMPTS = "mt_bench_judge_prompts.jsonl"
REFERENCES = "mt_bench_reference_answer_gpt-4.jsonl"
NEED_REFERENCE = ("math", "reasoning", "coding")
CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
_SCORE = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_SCORE_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")


def parse_score(judgment: str | None) -> float | None:
    """The 1-10 rating of a judgment: the first ``[[N]]``, else the first ``[N]``; None if absent or out of range."""
    if not judgment:
        return None
    match = _SCORE.search(judgment) or _SCORE_BACKUP.search(judgment)
    if not match:
        return None
    score = float(match.group(1))
    return score if 1 <= score <= 10 else None


class Judge:
    """Scores answers through an OpenAI-compatible chat endpoint."""

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, retries: int = 2,
                 max_tokens: int = 2048, retry_temperature: float = 0.7, concurrency: int = 8,
                 timeout_s: float = 600.0):
        import os

        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout_s, max_retries=3)
        self.retries = retries
        self.max_tokens = max_tokens
        self.retry_temperature = retry_temperature
        self.concurrency = concurrency

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
            if score is not None:
                return {"score": score, "judgment": judgment, "attempts": attempt + 1}
        return {"score": None, "judgment": judgments[-1], "attempts": len(judgments), "judgments": judgments}

    def rate_many(self, requests: list[tuple[str, str]]) -> list[dict]:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(lambda r: self.rate(*r), requests), total=len(requests), desc="judging",
                             leave=False, disable=len(requests) < 2))


def _by_name(rows: list[dict]) -> dict:
    return {row["name"]: row for row in rows}


class MTBench(Task):
    name = "mt_bench"
    max_new_tokens = 1024

    def __init__(self, *args, judge: Judge | None = None, **kw):
        super().__init__(*args, **kw)
        self.judge = judge
        prompts = _by_name(read_rows(packaged(JUDGE_PROMPTS)))
        self.prompts = {"general": prompts["single-v1"], "reference": prompts["single-math-v1"]}
        self.references = {str(r["question_id"]): r["choices"][0]["turns"] for r in read_rows(packaged(REFERENCES))}

    def load(self):
        rows = read_rows(self.data_file or packaged(QUESTIONS))
        samples = [{"id": str(r["question_id"]), "category": r["category"], "turns": list(r["turns"]),
                    "reference": r.get("reference")} for r in rows]
        return limit_rows(samples, self.limit)

    def judge_request(self, sample: dict, answer: str) -> tuple[str, str, str]:
        """(prompt name, system, user) of the first-turn judgment."""
        question = sample["turns"][0]
        if sample["category"] in NEED_REFERENCE:
            spec = self.prompts["reference"]
            reference = self.references.get(sample["id"]) or sample.get("reference")
            if not reference:
                raise ValueError(f"MT-Bench question {sample['id']} ({sample['category']}) has no reference answer.")
            user = spec["prompt_template"].format(question=question, answer=answer, ref_answer_1=reference[0])
        else:
            spec = self.prompts["general"]
            user = spec["prompt_template"].format(question=question, answer=answer)
        return spec["name"], spec["system_prompt"], user

    def evaluate(self, samples, generator):
        if self.judge is None:
            raise ValueError("mt_bench needs a judge: pass --judge_model (and --judge_base_url for a local server).")
        first_prompts = [generator.prompt(s["turns"][:1]) for s in samples]
        first = generator.generate(first_prompts)
        second_prompts = [generator.prompt(s["turns"][:2], [a]) for s, a in zip(samples, first)]
        second = generator.generate(second_prompts)
        requests = [self.judge_request(s, a) for s, a in zip(samples, first)]
        ratings = self.judge.rate_many([(system, user) for _, system, user in requests])
        records = []
        for s, p1, p2, a1, a2, (prompt_name, _, _), rating in zip(
                samples, first_prompts, second_prompts, first, second, requests, ratings):
            records.append({
                "id": s["id"], "category": s["category"], "prompt": [generator.display(p1), generator.display(p2)],
                "generation": [a1, a2], "extracted": rating["score"], "score": rating["score"],
                "verdict": "scored" if rating["score"] is not None else "unparseable",
                "judge_prompt": prompt_name, "judgment": rating["judgment"], "judge_attempts": rating["attempts"],
                **({"judgments": rating["judgments"]} if "judgments" in rating else {}),
            })
        return records

    def summarize(self, records):
        categories = {}
        for record in records:
            entry = categories.setdefault(record["category"], {"scores": [], "unparseable": 0})
            if record["score"] is None:
                entry["unparseable"] += 1
            else:
                entry["scores"].append(record["score"])
        order = [c for c in CATEGORIES if c in categories] + sorted(set(categories) - set(CATEGORIES))
        rows, per_category = [], {}
        for c in order:
            scores = categories[c]["scores"]
            mean = sum(scores) / len(scores) if scores else None
            per_category[c] = {"score": mean, "n": len(scores), "unparseable": categories[c]["unparseable"]}
            rows.append([c, len(scores), categories[c]["unparseable"], mean if mean is not None else "-"])
        all_scores = [r["score"] for r in records if r["score"] is not None]
        overall = sum(all_scores) / len(all_scores) if all_scores else None
        unparseable = sum(r["score"] is None for r in records)
        rows.append(["overall", len(all_scores), unparseable, overall if overall is not None else "-"])
        summary = {"metric": "first-turn score", "score": overall, "n": len(records), "scored": len(all_scores),
                   "unparseable": unparseable, "judge_model": self.judge.model if self.judge else None,
                   "categories": per_category}
        table = markdown_table(["category", "scored", "unparseable", "first-turn score"], rows)
        if unparseable:
            table += (f"\n{unparseable} judgment(s) had no [[rating]] after retries; they are excluded from the means "
                      f"(verdict 'unparseable' in {self.name}.jsonl).\n")
        return summary, table


def questions() -> list[dict]:
    """The 80 shipped MT-Bench questions."""
    return read_rows(packaged(QUESTIONS))


__all__ = ["MTBench", "Judge", "parse_score", "questions"]
