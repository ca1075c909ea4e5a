"""The command line, offline: outputs, resuming, refusing to mix settings, and ``python -m eval`` itself."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from balora_trl.prompts import DEFAULT
from eval import cli
from eval.testing_utils import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_gsm8k_run_outputs_and_resume(model_dir, tmp_path):
    out = tmp_path / "out"
    data = str(SHARED_DATA / "gsm8k" / "test.jsonl")

    def argv(limit, max_new_tokens=8, *extra):
        return ["gsm8k", "--model", model_dir, "--data_file", data, "--max_new_tokens", str(max_new_tokens),
                "--output_dir", str(out), "--backend", "transformers", "--batch_size", "3", "--chunk_size", "2",
                "--limit", str(limit), *extra]

    assert cli.main(argv(3)) == 0
    records = lines(out / "gsm8k.jsonl")
    assert len(records) == 3
    questions = [json.loads(line)["question"] for line in open(data)][:5]
    for record, question in zip(records, questions):
        assert {"id", "prompt", "generation", "extracted", "verdict", "gold", "correct"} <= set(record)
        assert record["prompt"] == DEFAULT.render(question)  # the template saved with the model
    summary = json.loads((out / "gsm8k_summary.json").read_text())
    assert summary["n"] == 3 and summary["resumed"] == 0 and summary["backend"] == "transformers"
    assert summary["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in records) / 3)
    assert "| gsm8k | 3 |" in (out / "gsm8k.md").read_text()

    # A longer rerun only does the new samples.
    cli.main(argv(5))
    records = lines(out / "gsm8k.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]
    assert json.loads((out / "gsm8k_summary.json").read_text())["resumed"] == 3

    # Other generation settings would mix incomparable results: refused, unless --overwrite.
    with pytest.raises(ValueError, match="max_new_tokens"):
        cli.main(argv(5, 9))
    cli.main(argv(2, 9, "--overwrite"))
    assert len(lines(out / "gsm8k.jsonl")) == 2


def test_a_torn_last_line_is_redone(model_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["gsm8k", "--model", model_dir, "--data_file", str(SHARED_DATA / "gsm8k" / "test.jsonl"),
            "--max_new_tokens", "4", "--output_dir", str(out), "--limit", "2"]
    cli.main(argv)
    path = out / "gsm8k.jsonl"
    text = path.read_text().splitlines()
    path.write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])  # killed mid-write
    cli.main(argv)
    kept = path.read_text().splitlines()
    assert len(kept) == 3 and kept[1] == text[1][: len(text[1]) // 2]  # the fragment stays, on its own line
    assert json.loads(kept[2])["id"] == "1" and json.loads(kept[2])["generation"] == json.loads(text[1])["generation"]
    assert json.loads((out / "gsm8k_summary.json").read_text())["resumed"] == 1


def test_humaneval_through_the_cli(model_dir, tmp_path):
    out = tmp_path / "out"
    cli.main(["humaneval", "--model", model_dir, "--limit", "2", "--max_new_tokens", "8", "--output_dir", str(out),
              "--timeout", "5", "--workers", "2"])
    records = lines(out / "humaneval.jsonl")
    assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["verdict"] in ("passed", "failed", "timeout") for r in records)
    assert records[0]["prompt"].startswith(DEFAULT.render("Create a Python script for this problem:\n")[:60])
    summary = json.loads((out / "humaneval_summary.json").read_text())
    assert summary["metric"] == "pass@1" and summary["n"] == 2


def test_cli_rejects_bad_requests(model_dir):
    with pytest.raises(SystemExit):
        cli.main(["gsm9k", "--model", model_dir])
    with pytest.raises(SystemExit, match="judge_model"):
        cli.main(["mt_bench", "--model", model_dir])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0


def test_python_dash_m_eval(model_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "eval", "gsm8k", "--model", model_dir, "--data_file",
                           str(SHARED_DATA / "gsm8k" / "test.jsonl"), "--limit", "2", "--max_new_tokens", "4",
                           "--output_dir", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["gsm8k"]["n"] == 2
