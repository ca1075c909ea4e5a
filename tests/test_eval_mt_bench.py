"""MT-Bench: the shipped data, the judgment parser, and a full run against a real OpenAI-compatible server on
127.0.0.1 (``python -m eval.serve`` with a tiny model; a scripted judge, since a random model writes no [[N]])."""

import json
import os
import zlib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from balora_trl.prompts import DEFAULT
from eval import cli
from eval.data import packaged, read_rows
from eval.tasks.mt_bench import CATEGORIES, NEED_REFERENCE, parse_score, questions
from eval.testing_utils import serve, tiny_model_dir

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def test_the_80_questions_judge_prompts_and_references_ship_with_the_harness():
    shipped = questions()
    assert len(shipped) == 80 and len({q["question_id"] for q in shipped}) == 80
    assert {q["category"] for q in shipped} == set(CATEGORIES)
    assert all(len(q["turns"]) == 2 for q in shipped)
    with open(SHARED_DATA / "mt_bench" / "question.jsonl") as f:
        assert shipped == [json.loads(line) for line in f]  # unchanged copies
    names = {p["name"] for p in read_rows(packaged("mt_bench_judge_prompts.jsonl"))}
    assert {"single-v1", "single-math-v1"} <= names
    references = {r["question_id"] for r in read_rows(packaged("mt_bench_reference_answer_gpt-4.jsonl"))}
    assert references == {q["question_id"] for q in shipped if q["category"] in NEED_REFERENCE}
    assert "Apache License" in Path(packaged("LICENSE")).read_text()


@pytest.mark.parametrize("judgment, score", [
    ("The answer is helpful. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("Rating: [[10]]", 10.0),
    ("Rating: [[1]]", 1.0),
    ("First [[3]], on reflection [[9]]", 3.0),  # FastChat takes the first
    ("Rating: [6]", 6.0),  # FastChat's backup pattern
])
def test_parse_well_formed_judgments(judgment, score):
    assert parse_score(judgment) == score


@pytest.mark.parametrize("judgment", [
    None, "", "I cannot rate this.", "Rating: 7", "Rating: [[seven]]", "[[0]]", "[[11]]", "Rating: [[ 7 ]]",
    "[[-3]]", "[[rating]]",
])
def test_parse_malformed_judgments(judgment):
    assert parse_score(judgment) is None


def test_mt_bench_end_to_end_with_a_local_judge_server(tmp_path):
    model_dir = tiny_model_dir(str(tmp_path / "model"))
    # Two questions per category; 81 and 119 get scripted judges.
    subset = [q for c in CATEGORIES for q in [x for x in questions() if x["category"] == c][:2]]
    assert {"81", "111"} <= {str(q["question_id"]) for q in subset}
    data_file = tmp_path / "questions.jsonl"
    data_file.write_text("".join(json.dumps(q) + "\n" for q in subset))
    q81 = next(q for q in subset if q["question_id"] == 81)["turns"][0]
    q111 = next(q for q in subset if q["question_id"] == 111)["turns"][0]
    script = tmp_path / "judge.json"
    script.write_text(json.dumps({"default": "{generation}\nRating: [[{score}]]", "rules": [
        {"contains": q81, "replies": ["I would rather not say.", "Good post. Rating: [[8]]"]},  # parses on retry
        {"contains": q111, "replies": ["No score at all."]},  # never parses
    ]}))
    log = tmp_path / "requests.jsonl"
    out = tmp_path / "results"

    with serve(model_dir, "--served_model_name", "tiny", "--script", str(script), "--log", str(log)) as url:
        assert url.startswith("http://127.0.0.1:")
        argv = ["mt_bench", "--model", model_dir, "--served_model_name", "tiny", "--base_url", url,
                "--judge_model", "tiny", "--judge_base_url", url, "--data_file", str(data_file),
                "--max_new_tokens", "6", "--judge_max_tokens", "6", "--judge_retries", "2",
                "--output_dir", str(out)]
        assert cli.main(argv) == 0
        requests = [json.loads(line) for line in log.read_text().splitlines()]
        cli.main(argv)  # resume: nothing left to do
        assert len(log.read_text().splitlines()) == len(requests)

    summary = json.loads((out / "mt_bench_summary.json").read_text())
    records = {r["id"]: r for r in map(json.loads, (out / "mt_bench.jsonl").read_text().splitlines())}
    assert summary["n"] == 16 and summary["scored"] == 15 and summary["unparseable"] == 1
    assert summary["resumed"] == 16 and summary["backend"] == "openai"
    assert set(summary["categories"]) == set(CATEGORIES)
    other_math = next(r for i, r in records.items() if r["category"] == "math" and i != "111")
    assert summary["categories"]["math"] == {"score": other_math["score"], "n": 1, "unparseable": 1}

    # Retry then count: 81 parsed on its second ask; 111 was asked 1 + 2 times, then recorded as unparseable.
    assert records["81"]["score"] == 8.0 and records["81"]["judge_attempts"] == 2
    assert records["111"]["verdict"] == "unparseable" and records["111"]["score"] is None
    assert records["111"]["judgments"] == ["No score at all."] * 3
    table = (out / "mt_bench.md").read_text()
    assert "| overall | 15 | 1 |" in table and "1 judgment(s) had no [[rating]]" in table
    scores = [r["score"] for r in records.values() if r["score"] is not None]
    assert summary["score"] == pytest.approx(sum(scores) / 15)

    completions = [r for r in requests if r["endpoint"] == "completions"]
    judgments = [r for r in requests if r["endpoint"] == "chat/completions"]
    assert len(completions) == 32 and len(judgments) == 16 + 1 + 2
    for q in subset:
        record = records[str(q["question_id"])]
        first, second = record["generation"]
        # Turn 2 is prompted with the model's own turn-1 answer, in the saved template.
        assert record["prompt"] == [DEFAULT.render(q["turns"][0]),
                                    DEFAULT.render(q["turns"][0]) + first + "\n\n" + DEFAULT.render(q["turns"][1])]
        asked = [j["request"] for j in judgments if q["turns"][0] in j["request"]["messages"][1]["content"]]
        assert len(asked) == {"81": 2, "111": 3}.get(record["id"], 1)
        user = asked[0]["messages"][1]["content"]
        assert f"[The Start of Assistant's Answer]\n{first}\n[The End of Assistant's Answer]" in user
        assert ("[The Start of Reference Answer]" in user) == (q["category"] in NEED_REFERENCE)
        assert record["judge_prompt"] == ("single-math-v1" if q["category"] in NEED_REFERENCE else "single-v1")
        assert asked[0]["temperature"] == 0.0 and asked[0]["max_tokens"] == 6
        assert all(a["temperature"] > 0 for a in asked[1:])  # retries sample
        if record["id"] not in ("81", "111"):  # the default reply's deterministic score, parsed
            key = zlib.crc32(json.dumps(asked[0]["messages"], sort_keys=True).encode())
            assert record["score"] == 1 + key % 10
    references = {str(r["question_id"]): r["choices"][0]["turns"][0]
                  for r in read_rows(packaged("mt_bench_reference_answer_gpt-4.jsonl"))}
    math_judgment = next(j for j in judgments if q111 in j["request"]["messages"][1]["content"])
    assert references["111"] in math_judgment["request"]["messages"][1]["content"]
