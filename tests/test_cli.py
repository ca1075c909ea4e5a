"""The `balora` command: help, env, train (parsing, checks and the accelerate launch), merge/eval delegation, and
the start-up checks for QLoRA / flash-attn / loggers."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from balora_trl import cli, preflight
from balora_trl.preflight import PreflightError, check, parse_init_lora_weights
from balora_trl.sft import parse_args

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "configs" / "metamath_llama2_7b.yaml")


def test_top_level_help_lists_commands(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    for command in ("train", "env", "merge", "eval"):
        assert f"  {command}" in out
    assert "balora train --config configs/metamath_llama2_7b.yaml" in out
    assert cli.main(["--help"]) == 0


def test_unknown_command(capsys):
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_train_help_is_actionable(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("usage: balora train", "embedded default", "--config configs/metamath_llama2_7b.yaml",
                 "--lambda_consistency", "--lambda_svd", "--dataset_format", "--prompt_template", "--init_lora_weights",
                 "--lora_r", "--load_in_4bit", "metamath_mistral_7b.yaml", "sharegpt", "conversations"):
        assert text in out, text


def test_env_reports_versions_device_and_extras(capsys):
    import torch
    import trl

    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert f"torch             {torch.__version__}" in out and f"trl               {trl.__version__}" in out
    assert "device" in out and ("CPU only" in out or "CUDA" in out)
    for extra in ("quant", "flash", "vllm", "eval", "nlu", "dev", "real"):
        line = next(line for line in out.splitlines() if line.strip().startswith(extra + " "))
        assert "usable" in line or f"pip install 'balora-trl[{extra}]'" in line or "needs a CUDA GPU" in line
    quant = next(line for line in out.splitlines() if line.strip().startswith("quant "))
    if not preflight.is_available("bitsandbytes"):
        assert "balora-trl[quant]" in quant


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "balora_trl.cli", "--help"], capture_output=True, text=True, check=True)
    assert "balora <command>" in out.stdout


# ------------------------------------------------------------------------------------------------------------------
# balora train: parsed and checked here, launched through accelerate
# ------------------------------------------------------------------------------------------------------------------

def _launched(argv):
    seen = []
    assert cli.train(argv, launch=seen.append) == 0
    return seen[0]


def test_train_launches_the_job_with_accelerate():
    args = _launched(["--config", RECIPE, "--learning_rate", "1e-4", "--num_processes", "2"])
    assert args.module and args.training_script == "balora_trl.sft"
    assert args.num_processes == 2  # an accelerate option goes to accelerate...
    assert args.training_script_args == ["--config", RECIPE, "--learning_rate", "1e-4"]  # ...the rest to the job


def test_train_accelerate_config_by_name():
    args = _launched(["--config", RECIPE, "--accelerate_config", "multi_gpu"])
    assert Path(args.config_file) == REPO / "configs" / "accelerate" / "multi_gpu.yaml"
    assert "--accelerate_config" not in args.training_script_args


def test_train_without_arguments_is_the_embedded_default():
    args = _launched([])
    assert args.training_script == "balora_trl.sft" and args.training_script_args == []
    script, training, model = parse_args([])
    assert model.model_name_or_path is None and script.dataset_name is None
    assert training.output_dir == "outputs/sft_metamath" and model.use_peft and model.lora_r == 8
    assert script.init_lora_weights == "pissa_niter_4" and model.lora_dropout == 0.0


def test_train_rejects_misspelt_field(capsys):
    assert cli.main(["train", "--config", RECIPE, "--lerning_rate", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert "--lerning_rate" in err and "balora train --help" in err


def test_train_rejects_bad_value_before_launch(capsys):
    assert cli.main(["train", "--config", RECIPE, "--lambda_consistency", "-1"]) == 2
    assert "lambda_consistency" in capsys.readouterr().err


def test_train_rejects_unknown_accelerate_config(capsys):
    assert cli.main(["train", "--accelerate_config", "no_such_setup"]) == 2
    assert "multi_gpu" in capsys.readouterr().err  # lists ours


# ------------------------------------------------------------------------------------------------------------------
# start-up checks: QLoRA, flash-attn, loggers (this machine has no CUDA)
# ------------------------------------------------------------------------------------------------------------------

def _args(*extra):
    _, training, model = parse_args(["--config", RECIPE, *extra])
    return model, training


def test_qlora_without_bitsandbytes_or_cuda(monkeypatch):
    monkeypatch.setattr(preflight, "is_available", lambda m: m != "bitsandbytes")
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)
    with pytest.raises(PreflightError) as info:
        check(*_args("--load_in_4bit", "true"), init_lora_weights=True)
    assert "pip install 'balora-trl[quant]'" in str(info.value)


@pytest.mark.parametrize("version, bits, refused", [("0.45.1", "4", "bitsandbytes >= 0.50"), ("0.50.2", "4", None),
                                                   ("0.50.2", "8", "8-bit training needs one")])
def test_qlora_on_the_cpu_needs_bitsandbytes_050_and_4_bits(monkeypatch, version, bits, refused):
    monkeypatch.setattr(preflight, "is_available", lambda m: True)
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)
    from packaging.version import Version

    monkeypatch.setattr(preflight, "bitsandbytes_version", lambda: Version(version))
    args = _args(f"--load_in_{bits}bit", "true")
    if refused is None:
        check(*args, init_lora_weights=True)
        return
    with pytest.raises(PreflightError) as info:
        check(*args, init_lora_weights=True)
    assert refused in str(info.value) and "CUDA GPU" in str(info.value)


def test_qlora_with_pissa_is_refused_at_start(monkeypatch):
    monkeypatch.setattr(preflight, "is_available", lambda m: True)
    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    model, training = _args("--load_in_4bit", "true")
    with pytest.raises(PreflightError, match="PiSSA's SVD on unquantized weights"):
        check(model, training, init_lora_weights="pissa_niter_4")
    check(model, training, init_lora_weights=True)  # plain LoRA on a 4-bit base: fine


def test_flash_attention_without_flash_attn_or_cuda(monkeypatch):
    monkeypatch.setattr(preflight, "is_available", lambda m: m != "flash_attn")
    monkeypatch.setattr(preflight, "cuda_available", lambda: False)
    with pytest.raises(PreflightError) as info:
        check(*_args("--attn_implementation", "flash_attention_2", "--dtype", "bfloat16"))
    message = str(info.value)
    assert "pip install 'balora-trl[flash]' --no-build-isolation" in message and "CUDA GPU" in message


def test_flash_attention_needs_16_bit(monkeypatch):
    monkeypatch.setattr(preflight, "is_available", lambda m: True)
    monkeypatch.setattr(preflight, "cuda_available", lambda: True)
    with pytest.raises(PreflightError, match="fp16/bf16 only"):
        check(*_args("--attn_implementation", "flash_attention_2"))  # the recipes are float32
    check(*_args("--attn_implementation", "flash_attention_2", "--dtype", "bfloat16"))


def test_missing_logger(monkeypatch):
    monkeypatch.setattr(preflight, "is_available", lambda m: m not in ("wandb",))
    with pytest.raises(PreflightError, match="pip install wandb"):
        check(*_args("--report_to", "wandb"))


def test_real_machine_qlora_fails_at_start(capsys):
    """On this machine (no CUDA, no bitsandbytes) `balora train` stops before launching anything."""
    if preflight.cuda_available() and preflight.is_available("bitsandbytes"):
        pytest.skip("this machine can run QLoRA")
    assert cli.main(["train", "--config", RECIPE, "--load_in_4bit", "true", "--init_lora_weights", "true"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: This configuration cannot start here: `load_in_4bit` (QLoRA) needs")
    assert err.count("\n") == 1  # one line, however many problems


def test_init_lora_weights_values():
    assert parse_init_lora_weights("true") is True and parse_init_lora_weights("false") is False
    assert parse_init_lora_weights("pissa_niter_16") == "pissa_niter_16" and parse_init_lora_weights("olora") == "olora"
    with pytest.raises(PreflightError, match="pissa_niter_<n>"):
        parse_init_lora_weights("pisa")


# ------------------------------------------------------------------------------------------------------------------
# merge / eval are other modules' commands
# ------------------------------------------------------------------------------------------------------------------

def test_merge_delegates_to_merging(monkeypatch):
    import balora_trl.merging

    calls = []
    monkeypatch.setattr(balora_trl.merging, "merge_cli", lambda argv: calls.append(argv) or 0, raising=False)
    assert cli.main(["merge", "outputs/x", "--output_dir", "merged"]) == 0
    assert calls == [["outputs/x", "--output_dir", "merged"]]


def test_merge_missing_says_so(monkeypatch, capsys):
    import balora_trl.merging

    monkeypatch.delattr(balora_trl.merging, "merge_cli", raising=False)
    assert cli.main(["merge", "x"]) == 1
    assert "balora merge" in capsys.readouterr().err


def test_eval_delegates_to_eval_cli(monkeypatch):
    calls = []
    fake = types.ModuleType("eval.cli")
    fake.main = lambda argv: calls.append(argv) or 3
    monkeypatch.setitem(sys.modules, "eval.cli", fake)
    monkeypatch.setitem(sys.modules, "eval", types.ModuleType("eval"))
    sys.modules["eval"].cli = fake
    assert cli.main(["eval", "--task", "gsm8k"]) == 3
    assert calls == [["--task", "gsm8k"]]


# ------------------------------------------------------------------------------------------------------------------
# a user's mistake: one `error:` line, exit code 2, no traceback (--debug / BALORA_DEBUG=1 keep it); bugs still raise
# ------------------------------------------------------------------------------------------------------------------

def _merge_raising(monkeypatch, error):
    import balora_trl.merging

    def merge_cli(argv):
        raise error

    monkeypatch.setattr(balora_trl.merging, "merge_cli", merge_cli, raising=False)


@pytest.mark.parametrize("error,line", [
    (ValueError("adapter_model.safetensors in out/ is unreadable: probably truncated"),
     "error: adapter_model.safetensors in out/ is unreadable: probably truncated"),
    (FileNotFoundError(2, "No such file or directory", "out/adapter_config.json"),
     "error: No such file or directory: out/adapter_config.json"),
    (PreflightError("needs a CUDA GPU"), "error: needs a CUDA GPU"),
    (OSError("We couldn't connect to the Hub.\n  Check your connection."),  # a library's multi-line message
     "error: We couldn't connect to the Hub. Check your connection."),
])
def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys, error, line):
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    _merge_raising(monkeypatch, error)
    assert cli.main(["merge", "--adapter", "out"]) == 2
    assert capsys.readouterr().err == line + "\n"


def test_debug_shows_the_traceback_and_bugs_are_not_hidden(monkeypatch):
    monkeypatch.delenv("BALORA_DEBUG", raising=False)
    _merge_raising(monkeypatch, ValueError("bad adapter"))
    with pytest.raises(ValueError, match="bad adapter"):
        cli.main(["--debug", "merge", "--adapter", "out"])
    assert "BALORA_DEBUG" not in os.environ  # restored
    monkeypatch.setenv("BALORA_DEBUG", "1")
    with pytest.raises(ValueError, match="bad adapter"):
        cli.main(["merge", "--adapter", "out"])
    monkeypatch.delenv("BALORA_DEBUG")
    _merge_raising(monkeypatch, KeyError("a bug"))  # not a user error: keeps its traceback
    with pytest.raises(KeyError):
        cli.main(["merge", "--adapter", "out"])


def test_a_failed_launch_returns_the_jobs_exit_code(monkeypatch, capsys):
    """The launched job printed its own error line: `balora train` only passes its exit code on."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    def raising(error):
        def train(argv):
            raise error
        return train

    monkeypatch.setattr(cli, "train", raising(subprocess.CalledProcessError(2, ["python", "-m", "balora_trl.sft"])))
    assert cli.main(["train"]) == 2
    failure = ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file="")
    monkeypatch.setattr(cli, "train", raising(ChildFailedError("balora_trl.sft", {1: failure})))
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == ""


def _run_balora(*args, cwd):
    environment = {k: v for k, v in os.environ.items() if k != "BALORA_DEBUG"}
    environment.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "balora_trl.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=environment, timeout=600)


def test_train_missing_model_folder_fails_before_launch(tmp_path):
    result = _run_balora("train", "--model_name_or_path", str(tmp_path / "no_model"), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"error: No such model folder: {tmp_path / 'no_model'}"


@pytest.mark.slow
def test_train_bad_data_fails_in_the_launched_job_with_one_line(tmp_path):
    """`balora train` launches the job through accelerate: the job's own process prints the one line and exits 2."""
    (tmp_path / "empty.jsonl").write_text("")
    result = _run_balora("train", "--dataset_name", "empty.jsonl", "--output_dir", "run", "--num_processes", "1",
                         cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "error: empty.jsonl is empty."
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------------
# a real `balora train` (through accelerate launch)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_balora_train_end_to_end(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-m", "balora_trl.cli", "train", "--output_dir", str(out), "--max_steps", "2",
         "--max_train_samples", "16", "--embedded_hidden_size", "32", "--embedded_num_layers", "1",
         "--embedded_vocab_size", "512", "--max_length", "256",
         "--report_to", "none", "--num_processes", "1"],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "prompt_template.json").is_file()
