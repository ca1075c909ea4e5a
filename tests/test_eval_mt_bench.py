"""MT-Bench as FastChat scores it: the shipped data, FastChat's rating parser, and a full two-turn run against a real
OpenAI-compatible server on 127.0.0.1 (``python -m eval.serve`` with a tiny model; a scripted judge, since a random
model writes no [[N]]), checked against an independent computation of FastChat's averages."""

import hashlib
import json
import os
import zlib
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from balora_trl.prompts import DEFAULT
from eval import cli
from eval.benchmark_rows import packaged, read_rows
from eval.tasks.mt_bench import CATEGORIES, NEED_REFERENCE, TEMPERATURE, parse_score, questions
from eval.testing_utils import serve, tiny_model_dir

# sha256 of FastChat's data/mt_bench/question.jsonl, shipped unchanged.
QUESTIONS_SHA256 = "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"


def test_the_80_questions_judge_prompts_and_references_ship_with_the_harness():
    shipped = questions()
    assert len(shipped) == 80 and len({q["question_id"] for q in shipped}) == 80
    assert {q["category"] for q in shipped} == set(CATEGORIES) == set(TEMPERATURE)
    assert all(len(q["turns"]) == 2 for q in shipped)
    assert hashlib.sha256(Path(packaged("mt_bench_question.jsonl")).read_bytes()).hexdigest() == QUESTIONS_SHA256
    names = {p["name"] for p in read_rows(packaged("mt_bench_judge_prompts.jsonl"))}
    assert {"single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn"} <= names
    references = read_rows(packaged("mt_bench_reference_answer_gpt-4.jsonl"))
    assert {r["question_id"] for r in references} == {q["question_id"] for q in shipped
                                                       if q["category"] in NEED_REFERENCE}
    assert all(len(r["choices"][0]["turns"]) == 2 for r in references)  # turn 2 is judged with both references
    assert "Apache License" in Path(packaged("LICENSE")).read_text()


@pytest.mark.parametrize("judgment, score", [
    ("The answer is helpful. Rating: [[7]]", 7.0),
    ("[[8.5]]", 8.5),
    ("Rating: [[10]]", 10.0),
    ("First [[3]], on reflection [[9]]", 3.0),  # FastChat takes the first
    ("Rating: [6]", 6.0),  # FastChat's backup pattern
    ("See [2] and Rating: [[9]]", 9.0),  # [[N]] anywhere beats an earlier [N]
    ("[[0]]", 0.0), ("[[11]]", 11.0),  # FastChat keeps any number it parses
])
def test_parse_well_formed_judgments(judgment, score):
    assert parse_score(judgment) == score


@pytest.mark.parametrize("judgment", [
    None, "", "I cannot rate this.", "Rating: 7", "Rating: [[seven]]", "Rating: [[ 7 ]]", "[[-3]]", "[[rating]]",
])
def test_unparsable_judgments_are_minus_one(judgment):
    assert parse_score(judgment) == -1


def _fastchat_rating(judgment):
    """FastChat's llm_judge ``run_judge_single`` rating step, restated here as the independent reference (its two
    patterns, then ``ast.literal_eval``, which raises on what Python does not read as a number)."""
    import ast
    import re

    match = re.search(r"\[\[(\d+\.?\d*)\]\]", judgment) or re.search(r"\[(\d+\.?\d*)\]", judgment)
    return ast.literal_eval(match.groups()[0]) if match else -1


@pytest.mark.parametrize("judgment", [
    "Rating: [[08]]", "[[007]]", "Rating: [[08]], on reflection [[9]]",  # FastChat raises: no rating recorded
    "[[00]]", "[[08.5]]", "[[8.]]", "[09]", "Rating: [[7]]", "[5] then [[06]]", "[[10]] [[08]]", "none", "[[1e3]]",
])
def test_ratings_are_read_as_fastchat_reads_them(judgment):
    try:
        expected = float(_fastchat_rating(judgment))
    except SyntaxError:  # FastChat's run stops here and records no rating for this judgment
        expected = -1
    assert parse_score(judgment) == expected


def test_a_leading_zero_is_no_rating_and_zeros_or_decimals_still_count():
    assert parse_score("Rating: [[08]]") == -1  # SyntaxError in FastChat, never 8
    assert parse_score("[[00]]") == 0.0 and parse_score("[[08.5]]") == 8.5 and parse_score("[[8.]]") == 8.0


def _fastchat_average(ratings):
    """FastChat's show_result.py, independently: drop -1, then the mean per turn and over both turns pooled."""
    kept = [(turn, score) for turn, score in ratings if score != -1]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (mean([s for t, s in kept if t == 1]), mean([s for t, s in kept if t == 2]), mean([s for _, s in kept]))


def test_mt_bench_two_turns_end_to_end_with_a_local_judge_server(tmp_path):
    model_dir = tiny_model_dir(str(tmp_path / "model"))
    # Two questions per category; 81, 82 and 111 get scripted judges.
    subset = [q for c in CATEGORIES for q in [x for x in questions() if x["category"] == c][:2]]
    by_id = {str(q["question_id"]): q for q in subset}
    assert {"81", "82", "111"} <= set(by_id)
    data_file = tmp_path / "questions.jsonl"
    data_file.write_text("".join(json.dumps(q) + "\n" for q in subset))
    turn1 = lambda qid: "[Question]\n" + by_id[qid]["turns"][0] + "\n"  # noqa: E731  (only in turn-1 judgments)
    turn2 = lambda qid: by_id[qid]["turns"][1]  # noqa: E731  (only in turn-2 judgments)
    scripted = {  # (question, turn) -> (replies, the rating FastChat gives the first reply)
        ("81", 1): (["I would rather not say.", "Good post. Rating: [[8]]"], -1),  # unparsable: -1, excluded
        ("111", 2): (["No score at all."], -1),  # unparsable on the multi-turn math prompt
        ("82", 1): (["Superb. Rating: [[11]]"], 11.0),  # out of 1-10: FastChat keeps it
        ("82", 2): (["Decent, see [2]. Final: [4]"], 2.0),  # backup pattern, first match
    }
    script = tmp_path / "judge.json"
    script.write_text(json.dumps({"default": "Fine.\nRating: [[{score}]]", "rules": [
        {"contains": turn1(q) if t == 1 else turn2(q), "replies": replies} for (q, t), (replies, _) in scripted.items()
    ]}))
    log = tmp_path / "requests.jsonl"
    out = tmp_path / "results"

    with serve(model_dir, "--served_model_name", "tiny", "--script", str(script), "--log", str(log)) as url:
        argv = ["mt_bench", "--model", model_dir, "--served_model_name", "tiny", "--base_url", url,
                "--judge_model", "tiny", "--judge_base_url", url, "--data_file", str(data_file),
                "--max_new_tokens", "6", "--judge_max_tokens", "7", "--output_dir", str(out)]
        assert cli.main(argv) == 0
        requests = [json.loads(line) for line in log.read_text().splitlines()]
        cli.main(argv)  # resume: nothing left to do
        assert len(log.read_text().splitlines()) == len(requests)

        # Our retry option: an unparsable judgment is asked again (sampled) before it becomes -1.
        retry_out = tmp_path / "retry"
        retry_file = tmp_path / "q81.jsonl"
        retry_file.write_text(json.dumps(by_id["81"]) + "\n")
        assert cli.main([*argv[:-1], str(retry_out), "--judge_retries", "2", "--data_file", str(retry_file),
                         "--max_new_tokens", "5"]) == 0  # other answers: the script's counters start afresh
        retried = json.loads((retry_out / "mt_bench.jsonl").read_text())
        assert retried["scores"][0] == 8.0 and retried["judge_attempts"][0] == 2
        assert json.loads((retry_out / "mt_bench_summary.json").read_text())["protocol"] == "fastchat+retries=2"

    summary = json.loads((out / "mt_bench_summary.json").read_text())
    records = {r["id"]: r for r in map(json.loads, (out / "mt_bench.jsonl").read_text().splitlines())}
    assert summary["n"] == 16 and summary["resumed"] == 16 and summary["backend"] == "openai"
    assert summary["protocol"] == "fastchat" and summary["temperature"] == "FastChat per category"

    completions = [r for r in requests if r["endpoint"] == "completions"]
    judgments = [r for r in requests if r["endpoint"] == "chat/completions"]
    assert len(completions) == 32 and len(judgments) == 32  # two answers and two judgments per question, no retry

    # The ratings, recomputed from what the judge was asked: the scripted ones, else the default reply's score.
    ratings = []
    for q in subset:
        qid = str(q["question_id"])
        record = records[qid]
        first, second = record["generation"]
        # Turn 2 is prompted with the model's own turn-1 answer, in the saved template, at the category's temperature.
        assert record["prompt"] == [DEFAULT.render(q["turns"][0]),
                                    DEFAULT.render(q["turns"][0]) + first + "\n\n" + DEFAULT.render(q["turns"][1])]
        asked = [c["request"] for c in completions if c["request"]["prompt"] in record["prompt"]]
        assert len(asked) == 2 and all(a["temperature"] == TEMPERATURE[q["category"]] for a in asked)
        with_reference = q["category"] in NEED_REFERENCE
        assert record["judge_prompts"] == (["single-math-v1", "single-math-v1-multi-turn"] if with_reference
                                           else ["single-v1", "single-v1-multi-turn"])
        for turn in (1, 2):
            marker = turn1(qid) if turn == 1 else turn2(qid)
            [judged] = [j["request"] for j in judgments if marker in j["request"]["messages"][1]["content"]]
            user = judged["messages"][1]["content"]
            assert judged["temperature"] == 0.0 and judged["max_tokens"] == 7
            if turn == 1:
                assert f"[The Start of Assistant's Answer]\n{first}\n[The End of Assistant's Answer]" in user
            else:  # the whole conversation, both answers
                assert f"### User:\n{q['turns'][0]}\n\n### Assistant A:\n{first}\n\n" \
                       f"### User:\n{q['turns'][1]}\n\n### Assistant A:\n{second}\n\n" in user
            assert ("Reference" in user) == with_reference
            if (qid, turn) in scripted:
                expected = scripted[(qid, turn)][1]
            else:
                expected = float(1 + zlib.crc32(json.dumps(judged["messages"], sort_keys=True).encode()) % 10)
            assert record["scores"][turn - 1] == expected
            ratings.append((turn, expected))
    references = {str(r["question_id"]): r["choices"][0]["turns"]
                  for r in read_rows(packaged("mt_bench_reference_answer_gpt-4.jsonl"))}
    [math_turn2] = [j for j in judgments if turn2("111") in j["request"]["messages"][1]["content"]]
    assert all(ref in math_turn2["request"]["messages"][1]["content"] for ref in references["111"])

    turn_1, turn_2, average = _fastchat_average(ratings)
    assert summary["turn_1"] == pytest.approx(turn_1) and summary["turn_2"] == pytest.approx(turn_2)
    assert summary["score"] == pytest.approx(average)
    assert summary["rated"] == 30 and summary["unrated"] == 2
    assert records["81"]["scores"][0] == -1 and records["81"]["verdict"] == "unrated turn(s)"
    math = summary["categories"]["math"]
    assert math["unrated"] == 1 and math["rated"] == 3
    table = (out / "mt_bench.md").read_text()
    assert f"| overall | 30 | 2 | {turn_1:.2f} | {turn_2:.2f} | {average:.2f} |" in table
    assert "2 judgment(s) had no [[rating]]" in table
