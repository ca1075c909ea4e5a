"""The main job, examples/sft_metamath.py: a shrunken embedded run in-process (quick), and the real no-argument
run end to end (slow; CI runs it)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from balora_trl.prompts import DEFAULT, PromptTemplate

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "sft_metamath.py"
BA_LORA_TERMS = ("ba_lora/sft_loss", "ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio")
TINY = ["--max_train_samples", "24", "--per_device_train_batch_size", "4", "--embedded_hidden_size", "32",
        "--embedded_num_layers", "1", "--embedded_vocab_size", "512",
        "--max_length", "256", "--logging_steps", "1"]


def check_outputs(out: Path, expect_tensorboard: bool):
    """What the main job promises to write, and that it is what it says."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the adapter, recording the base it was trained on; the base and tokenizer load from disk
    assert (out / "adapter_model.safetensors").is_file()
    adapter = PeftConfig.from_pretrained(str(out))
    base_dir = out / "base_model"
    assert Path(adapter.base_model_name_or_path) == base_dir.resolve()
    assert adapter.r in (8, 16) and adapter.lora_dropout == 0.0  # 16: PiSSA saved as a rank-2r LoRA of the base
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == base.config.vocab_size and (base_dir / "EMBEDDED.md").is_file()
    model = PeftModel.from_pretrained(base, str(out))
    with torch.no_grad():
        ids = tokenizer(DEFAULT.render("What is 2 + 3?"), return_tensors="pt")
        assert torch.isfinite(model(**ids).logits).all()

    # the prompt template used, for evaluation
    assert PromptTemplate.load(str(out)) == DEFAULT

    # the logs (streamed) and the training metrics, with the BA-LoRA terms
    logs = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    train_logs = [r for r in logs if "loss" in r]
    assert train_logs and all(term in train_logs[-1] for term in BA_LORA_TERMS)
    assert any(r["ba_lora/kl"] > 0 for r in train_logs)  # the adapter moved away from the pretrained reference
    metrics = json.loads((out / "training_metrics.json").read_text())
    history = [r for r in metrics["log_history"] if "loss" in r]
    assert [(r["step"], r["loss"]) for r in history] == [(r["step"], r["loss"]) for r in train_logs]
    assert metrics["reference"] == "initial_adapter"  # PiSSA: base + frozen copy of the initial adapter
    assert metrics["prompt_template"] == "alpaca" and metrics["train"]["train_loss"] > 0
    paper = {"lambda_consistency": 1e-4, "lambda_diversity": 3e-4, "lambda_svd": 1e-4, "svd_top_k": 10,
             "kl_temperature": 1.0}
    assert {k: metrics["ba_lora"].get(k) for k in paper} == paper
    assert (out / "trainer_state.json").is_file()
    if expect_tensorboard:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = list(out.glob("runs/*/events.out.tfevents.*"))
        assert events
        tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
        assert {"train/" + t for t in BA_LORA_TERMS} <= set(tags)
    return metrics


def test_embedded_run_in_process(tmp_path):
    pytest.importorskip("tensorboard")
    from balora_trl.sft import main, parse_args

    out = tmp_path / "run"
    script, training, model = parse_args(["--output_dir", str(out), *TINY, "--report_to", "tensorboard"])
    assert model.model_name_or_path is None and training.report_to == ["tensorboard"]
    main(script, training, model)
    metrics = check_outputs(out, expect_tensorboard=True)
    assert metrics["train_rows"] == 24 and metrics["model"] == "embedded default"


def test_own_model_and_data_file(tmp_path, tokenizer, make_model):
    """A model from disk and a local GSM8K file (question/answer): the path a real run takes, on a tiny model."""
    from conftest import gsm8k_rows

    from balora_trl.sft import main, parse_args

    base, data, out = tmp_path / "base", tmp_path / "gsm8k.jsonl", tmp_path / "run"
    make_model("qwen2").save_pretrained(base)
    tokenizer.save_pretrained(base)
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows("train", 16)))
    script, training, model = parse_args(
        ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(out), "--max_steps", "2",
         "--per_device_train_batch_size", "4", "--max_length", "256", "--use_cpu", "true", "--report_to", "none",
         "--lambda_svd", "0"])
    assert not training.bf16 and model.use_peft and model.lora_r == 8  # BA-LoRA's method defaults, not the embedded run's
    main(script, training, model)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["dataset"] == str(data) and metrics["train_rows"] == 16 and metrics["prompt_template"] == "alpaca"
    assert "ba_lora/svd_ratio" not in metrics["log_history"][0] and "ba_lora/kl" in metrics["log_history"][0]
    assert PromptTemplate.load(str(out)) == DEFAULT and not (out / "base_model").exists()


# ------------------------------------------------------------------------------------------------------------------
# a user's mistake stops the job before training: one `error:` line, exit code 2, no traceback
# ------------------------------------------------------------------------------------------------------------------

BAD_DATA = {  # file name -> (content, the error line after "error: "; {path} is the file as given)
    "empty.jsonl": ("", "{path} is empty."),
    "cut.jsonl": ('{"query": "q0", "response": "r0"}\n{"query": "q1", "response": "r1"\n',
                  "{path}, line 2: not valid JSON (Expecting ',' delimiter, column 33)."),
    "columns.jsonl": ('{"text": "a", "label": 1}\n',
                      "Could not recognise the dataset format from its columns. Columns found: ['label', 'text']. "
                      "Supported formats (set `dataset_format` to force one): prompt_completion (prompt, completion); "
                      "messages (messages); sharegpt (conversations); metamath (query, response); codefeedback "
                      "(query, answer); alpaca (instruction, input, output); pissa (instruction, output); gsm8k "
                      "(question, answer)."),
    "no_completion.jsonl": ('{"query": "a", "response": "b"}\n{"query": "c", "response": " "}\n',
                            "Row 1: empty completion ('response'). Remove or fix the row (rows are counted from 0)."),
    "not_text.jsonl": ('{"query": "a", "response": 7}\n', "Row 0: completion ('response') must be text, got int."),
}


@pytest.mark.parametrize("name", [*BAD_DATA, "missing.jsonl", "no_model"])
def test_user_mistakes_end_in_one_line(tmp_path, capsys, monkeypatch, name):
    from balora_trl.sft import cli

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    out, path = tmp_path / "run", tmp_path / name
    if name in BAD_DATA:
        path.write_text(BAD_DATA[name][0])
        expected = BAD_DATA[name][1].format(path=path)
    else:
        expected = f"No such dataset file: {path}" if name == "missing.jsonl" else f"No such model folder: {path}"
    argv = ["--model_name_or_path", str(path)] if name == "no_model" else ["--dataset_name", str(path)]
    assert cli([*argv, "--output_dir", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "error: " + expected and "Traceback" not in err
    assert not (out / "base_model").exists()  # stopped before building anything


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    from balora_trl.data import DatasetLoadError
    from balora_trl.sft import cli

    monkeypatch.setenv("BALORA_DEBUG", "1")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetLoadError, match="empty.jsonl is empty"):
        cli(["--dataset_name", str(tmp_path / "empty.jsonl"), "--output_dir", str(tmp_path / "run"), *TINY])


def test_main_job_bad_data_as_a_user_runs_it(tmp_path):
    """`python examples/sft_metamath.py --dataset_name FILE`: the last stderr line is the error, no traceback."""
    data = tmp_path / "cut.jsonl"
    data.write_text(BAD_DATA["cut.jsonl"][0])
    env = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, str(SCRIPT), "--dataset_name", "cut.jsonl", "--output_dir", "run"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "error: " + BAD_DATA["cut.jsonl"][1].format(path="cut.jsonl")


@pytest.mark.slow
def test_no_argument_main_job(tmp_path):
    """`python examples/sft_metamath.py` with no argument, from an empty folder: the README's first command."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start, cpu_start = time.time(), os.times()
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=1800)
    wall, cpu_end = time.time() - start, os.times()
    cpu = (cpu_end.children_user - cpu_start.children_user) + (cpu_end.children_system - cpu_start.children_system)
    print(f"no-argument main job: {wall:.0f} s wall, {cpu:.0f} s CPU")
    assert result.returncode == 0, result.stderr[-5000:]
    out = tmp_path / "outputs" / "sft_metamath"
    metrics = check_outputs(out, expect_tensorboard=_has_tensorboard())
    assert metrics["train_rows"] == 2000
    losses = [r["ba_lora/sft_loss"] for r in metrics["log_history"] if "ba_lora/sft_loss" in r]
    assert losses[-1] < losses[0]  # it learns
    assert "it/s]" in result.stderr or "s/it]" in result.stderr  # progress bars


@pytest.mark.slow
def test_accelerate_launch_main_job(tmp_path):
    """`accelerate launch examples/sft_metamath.py` (shrunk by overrides to keep CI short)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--output_dir", str(out), *TINY,
         "--report_to", "none"],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    check_outputs(out, expect_tensorboard=False)


def _has_tensorboard():
    from balora_trl.preflight import is_available

    return is_available("tensorboard")
