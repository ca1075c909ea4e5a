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
    "no_completion.jsonl": ('{"query": "a", "response": "b"}\n\n{"query": "c", "response": " "}\n',  # a blank line
                            "{path}, line 3: empty completion ('response'). Remove or fix the row."),
    "not_text.jsonl": ('{"query": "a", "response": 7}\n',
                       "{path}, line 1: completion ('response') must be text, got int."),
    "not_text.json": ('[{"query": "a", "response": "b"},\n {"query": "c", "response": 7}]\n',
                      "{path}, row 1 (counted from 0): completion ('response') must be text, got int."),
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


def test_a_bad_row_of_a_random_subset_is_named_by_its_line(tmp_path, capsys, monkeypatch):
    """max_train_samples draws a seeded subset: the error names the row's line in the file, not its subset index."""
    import numpy as np

    from balora_trl.sft import cli

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    subset = np.random.default_rng(3).permutation(40)[:24]  # Dataset.shuffle(seed=3)'s first 24 rows
    bad = int(subset[5])
    assert bad != 5
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "response": "" if i == bad else f"r{i}"}) + "\n"
                            for i in range(40)))
    assert cli(["--dataset_name", str(path), "--output_dir", str(tmp_path / "run"), "--seed", "3", *TINY]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {path}, line {bad + 1}: empty completion ('response'). Remove or fix the row.")


def test_a_bad_row_given_by_data_files_is_named_by_its_line(tmp_path, capsys, monkeypatch):
    """The file can come as ``--data_files`` (one file) instead of ``--dataset_name``: the same line is named."""
    from balora_trl.sft import cli

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    path = tmp_path / "data.jsonl"
    path.write_text(BAD_DATA["no_completion.jsonl"][0])
    assert cli(["--data_files", str(path), "--output_dir", str(tmp_path / "run"), *TINY]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: " + BAD_DATA["no_completion.jsonl"][1].format(path=path))


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    from balora_trl.dataset_formats import DatasetLoadError
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


# ------------------------------------------------------------------------------------------------------------------
# conversations: every assistant turn trains, and BA-LoRA's terms run on exactly those tokens
# ------------------------------------------------------------------------------------------------------------------

def three_turn_conversation():
    from conftest import gsm8k_rows

    rows = gsm8k_rows("train", 3)
    messages = [{"role": "system", "content": "Answer step by step."}]
    for row in rows:
        messages += [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
    return messages


def assistant_token_labels(tokenizer, messages):
    """The labels every-assistant-turn training should give, found without TRL: render the conversation, locate each
    reply as the template writes it (content, <|end|>, EOS) in the text, and label the tokens whose characters lie
    inside one; every other token (system, user turns, role tags) gets -100."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans, start = [], 0
    for message in messages:
        if message["role"] == "assistant":
            written = message["content"] + "<|end|>" + tokenizer.eos_token
            begin = text.index("<|assistant|>\n" + written, start) + len("<|assistant|>\n")
            spans.append((begin, begin + len(written)))
            start = spans[-1][1]
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    labels = [token if any(a <= lo and hi <= b for a, b in spans) else -100
              for token, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return encoded["input_ids"], labels, spans


def conversation_job(tmp_path, tokenizer, make_model, *extra):
    """build_trainer (the main job's own path) on a model folder and a `messages` file holding one conversation."""
    from balora_trl.sft import build_trainer, parse_args

    base, data = tmp_path / "base", tmp_path / "chat.jsonl"
    if not base.exists():
        make_model("llama").save_pretrained(base)
        tokenizer.save_pretrained(base)
    data.write_text(json.dumps({"messages": three_turn_conversation()}) + "\n")
    script, training, model = parse_args(
        ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(tmp_path / "run"),
         "--max_length", "1024", "--use_cpu", "true", "--report_to", "none", "--activation_checkpointing",
         "false", "--per_device_train_batch_size", "1", *extra])
    return build_trainer(script, training, model)[0]


def test_main_job_trains_every_assistant_turn_and_no_user_turn(tmp_path, tokenizer, make_model):
    messages = three_turn_conversation()
    trainer = conversation_job(tmp_path, tokenizer, make_model)
    row = trainer.train_dataset[0]
    ids, expected, spans = assistant_token_labels(tokenizer, messages)
    assert len(spans) == 3 and row["input_ids"] == ids and row["labels"] == expected
    trained = tokenizer.decode([t for t in row["labels"] if t != -100])
    for message in messages:  # all three replies, and not a word of the user turns or the system turn
        assert (message["content"] in trained) == (message["role"] == "assistant")

    # `assistant_turns: last` keeps the former behaviour: only the last reply carries labels
    last = conversation_job(tmp_path / "last", tokenizer, make_model, "--assistant_turns", "last").train_dataset[0]
    assert tokenizer.decode([t for t in last["labels"] if t != -100]) == (
        messages[-1]["content"] + "<|end|>" + tokenizer.eos_token)


def test_balora_terms_cover_the_assistant_turns_in_both_head_paths(tmp_path, tokenizer, make_model):
    """KL, entropy and SVD ratio (and the NLL) of the main job's trainer, plain and fused head, against a direct
    computation over exactly the positions that predict an assistant-turn token (found without TRL)."""
    import numpy as np
    from torch.distributions import Categorical, kl_divergence
    from transformers import AutoModelForCausalLM

    messages = three_turn_conversation()
    _, expected, _ = assistant_token_labels(tokenizer, messages)
    lam = ["--lambda_consistency", "0.5", "--lambda_diversity", "0.3", "--lambda_svd", "0.2", "--svd_top_k", "2",
           "--init_lora_weights", "true"]  # LoRA from zero: the reference is exactly the base model
    logged = {}
    for path in ("plain", "fused"):
        trainer = conversation_job(tmp_path, tokenizer, make_model, *lam, "--head_path", path)
        assert trainer._path == path
        torch.manual_seed(1)
        with torch.no_grad():  # move the adapter off zero, the same way for both paths, so the KL is not 0
            for name, p in trainer.model.named_parameters():
                if "lora_B.default" in name:
                    p.add_(0.05 * torch.randn_like(p))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        assert batch["labels"][0].tolist() == expected
        trainer._metrics["train"].clear()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        logged[path] = {k: v[-1] for k, v in trainer._metrics["train"].items()}, loss

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    positions = torch.tensor(expected[1:]) != -100  # hidden state t predicts token t + 1
    targets = torch.tensor(expected[1:])[positions]
    with torch.no_grad():
        ids = batch["input_ids"]
        policy = trainer.model(input_ids=ids).logits[0, :-1][positions].double()
        reference = base(input_ids=ids).logits[0, :-1][positions].double()
    p, r = Categorical(logits=policy), Categorical(logits=reference)
    direct = {"ba_lora/sft_loss": -p.log_prob(targets).mean().item(), "ba_lora/kl": kl_divergence(r, p).mean().item(),
              "ba_lora/entropy": p.entropy().mean().item()}
    sigma = np.linalg.svd(policy.numpy(), compute_uv=False)
    direct["ba_lora/svd_ratio"] = sigma[:2].sum() / sigma.sum()
    total = direct["ba_lora/sft_loss"] + 0.5 * direct["ba_lora/kl"] - 0.3 * direct["ba_lora/entropy"] \
        - 0.2 * direct["ba_lora/svd_ratio"]
    assert direct["ba_lora/kl"] > 1e-5 and int(positions.sum()) > 3 * 20
    for path, (terms, loss) in logged.items():
        for name, value in direct.items():
            assert terms[name] == pytest.approx(value, rel=1e-4, abs=1e-7), (path, name)
        assert loss == pytest.approx(total, rel=1e-5), path


def test_template_without_generation_markers_is_one_line(tmp_path, tokenizer, make_model, capsys, monkeypatch):
    import copy

    from balora_trl.sft import cli

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    base, data = tmp_path / "base", tmp_path / "chat.jsonl"
    make_model("llama").save_pretrained(base)
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = plain.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    plain.save_pretrained(base)
    data.write_text(json.dumps({"messages": three_turn_conversation()}) + "\n")
    argv = ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(tmp_path / "run"),
            "--use_cpu", "true", "--report_to", "none"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        f"error: Training every assistant turn of a conversation needs a chat template with {{% generation %}} "
        f"markers; the template of {str(base)!r} has none and TRL has no training version of it. Set "
        "`chat_template_path` to a .jinja template with them (TRL's trl/chat_templates/*_training.jinja are "
        "examples), or `assistant_turns: last` to train the last assistant turn of each conversation only.")


def test_api_warns_once_when_conversations_train_user_turns(tmp_path, tokenizer, make_model):
    import warnings

    from conftest import cpu_config
    from datasets import Dataset

    from balora_trl import BALoraSFTTrainer

    rows = Dataset.from_list([{"messages": three_turn_conversation()}] * 2)
    with pytest.warns(UserWarning, match="cover the user turns too") as caught:
        BALoraSFTTrainer(make_model(), cpu_config(tmp_path / "a"), train_dataset=rows, processing_class=tokenizer)
    assert sum("cover the user turns" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*cover the user turns.*")
        BALoraSFTTrainer(make_model(), cpu_config(tmp_path / "b", assistant_only_loss=True), train_dataset=rows,
                         processing_class=tokenizer)


def test_release_tokenization_through_the_main_job(tmp_path, tokenizer, make_model):
    """`tokenization: release` (the *_release recipes): TRL trains the rows exactly as the release builds them,
    independently built here from their pieces, including a row whose prompt fills max_length (kept, no label;
    its step adds a finite zero)."""
    from conftest import gsm8k_rows

    from balora_trl.prompts import ALPACA
    from balora_trl.sft import build_trainer, parse_args, train_and_save

    gsm = gsm8k_rows("train", 2)
    rows = [{"instruction": gsm[0]["question"] * 6, "output": gsm[0]["answer"]},  # the prompt alone exceeds 256
            {"instruction": gsm[1]["question"], "output": gsm[1]["answer"]}]
    base, data = tmp_path / "base", tmp_path / "pissa.jsonl"
    make_model("llama").save_pretrained(base)
    tokenizer.save_pretrained(base)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    script, training, model = parse_args(
        ["--model_name_or_path", str(base), "--dataset_name", str(data), "--output_dir", str(tmp_path / "run"),
         "--tokenization", "release", "--max_length", "256", "--use_cpu", "true", "--report_to", "none",
         "--per_device_train_batch_size", "1", "--max_steps", "2", "--train_sampling_strategy", "sequential",
         "--logging_steps", "1", "--activation_checkpointing", "false"])
    trainer, template = build_trainer(script, training, model)

    expected = []
    for row in rows:
        prompt = tokenizer(ALPACA.replace("{instruction}", row["instruction"]))["input_ids"]
        example = (prompt + tokenizer(row["output"])["input_ids"] + [tokenizer.eos_token_id])[:256]
        expected.append((example, ([-100] * len(prompt) + example[len(prompt):])[:256]))
    assert [(r["input_ids"], r["labels"]) for r in trainer.train_dataset] == expected
    assert set(expected[0][1]) == {-100} and len(trainer.train_dataset) == 2

    train_and_save(trainer, template, script, training, model)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == 2 and losses[0] == 0.0 and losses[1] > 0


# ------------------------------------------------------------------------------------------------------------------
# after parsing: a resume that cannot be exact, no example left, a full disk — one line; leftovers cleaned (issue 30)
# ------------------------------------------------------------------------------------------------------------------

SAVING = ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--disable_tqdm", "true"]


def _one_line(capsys, code):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-2000:]
    return err.splitlines()[-1]


def test_errors_after_parsing_end_in_one_line(tmp_path, capsys, monkeypatch):
    import errno

    import peft.peft_model

    from balora_trl.sft import cli

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    out = tmp_path / "run"
    line = _one_line(capsys, cli(["--output_dir", str(out), *TINY, "--resume_from_checkpoint", str(tmp_path / "no")]))
    assert line == f"error: resume_from_checkpoint: {tmp_path / 'no'} is not a checkpoint folder."
    line = _one_line(capsys, cli(["--output_dir", str(out), *TINY, "--resume_from_checkpoint", "true"]))
    assert line == f"error: resume_from_checkpoint=true, but {out} holds no checkpoint-N folder to resume from."
    line = _one_line(capsys, cli(["--output_dir", str(out), *TINY[:-4], "--max_length", "8"]))
    assert line.startswith("error: No training example is left: every one of the 24 rows lost its response")
    line = _one_line(capsys, cli(["--output_dir", str(out), *TINY, "--lambda_consistency", "1e30"]))
    assert line.startswith("error: `lambda_consistency` = 1e+30 is beyond any useful weight")

    def full_disk(*args, **kwargs):  # PEFT writing the checkpoint's adapter on a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)
    line = _one_line(capsys, cli(["--output_dir", str(out), *TINY, *SAVING]))
    assert line.startswith(f"error: no space left on {out} ")
    assert not [p for p in os.listdir(out) if "checkpoint" in p]  # nothing half-written left behind

    def torch_writer(*args, **kwargs):  # torch's zip writer says only this; the disk is what is full
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 528512 vs 528404")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", torch_writer)
    import balora_trl.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: __import__("shutil")._ntuple_diskusage(1, 1, 0))
    line = _one_line(capsys, cli(["--output_dir", str(out), *TINY, *SAVING]))
    assert line.startswith(f"error: no space left on {out} ")
    monkeypatch.setenv("BALORA_DEBUG", "1")  # the traceback stays, with the writer's error as its cause
    with pytest.raises(OSError, match="no space left on") as raised:
        cli(["--output_dir", str(out), *TINY, *SAVING])
    assert "unexpected pos" in str(raised.value.__cause__)


def test_a_failed_rerun_keeps_the_finished_log_and_leftovers_are_cleaned(tmp_path, capsys, monkeypatch):
    from balora_trl.sft import cli
    from balora_trl.trainer import BALoraSFTTrainer

    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    out = tmp_path / "run"
    assert cli(["--output_dir", str(out), *TINY, "--max_steps", "2"]) == 0
    finished = (out / "logs.jsonl").read_text()
    assert len(finished.splitlines()) == 3  # 2 steps and the summary

    calls = []
    step = BALoraSFTTrainer.training_step

    def fail_at_second_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("crash at step 2")
        return step(self, *args, **kwargs)

    monkeypatch.setattr(BALoraSFTTrainer, "training_step", fail_at_second_step)
    with pytest.raises(RuntimeError, match="crash at step 2"):
        cli(["--output_dir", str(out), *TINY, "--max_steps", "2"])
    assert (out / "logs.jsonl").read_text() == finished  # not replaced by the run that did not finish
    assert len((out / "logs.partial.jsonl").read_text().splitlines()) == 1  # what that run logged
    monkeypatch.undo()
    monkeypatch.delenv("BALORA_DEBUG", raising=False)

    # what a kill leaves: a staged final output and checkpoint, a checkpoint moved aside, from a process now gone
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    leftovers = [tmp_path / f"run.tmp-{pid}", out / "_tmp-checkpoint-1", out / f"checkpoint-1.old-{pid}"]
    for path in leftovers:
        path.mkdir()
        (path / "adapter_model.safetensors").write_bytes(b"partial")
    capsys.readouterr()
    assert cli(["--output_dir", str(out), *TINY, *SAVING]) == 0
    err = capsys.readouterr().err
    for path in leftovers[:2]:
        assert not path.exists() and f"Removed {path}" in err
    # the previous checkpoint moved aside, its replacement never renamed in: put back under its name (then saved over)
    assert not leftovers[2].exists() and f"{out / 'checkpoint-1'} restored from checkpoint-1.old-{pid}" in err
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
