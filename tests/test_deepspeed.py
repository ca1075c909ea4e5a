"""DeepSpeed ZeRO-2 and ZeRO-3 for real: two CPU processes over gloo (``DS_ACCELERATOR=cpu``), launched with the
CPU configs we ship (configs/accelerate/deepspeed_zero{2,3}_cpu.yaml), compared with one process that runs the same
micro-batches as gradient accumulation.

ZeRO-3 runs with ``stage3_param_persistence_threshold: 0``, so every parameter of the tiny model (base, adapter,
reference copy, LM head) is partitioned, as a 7B model's would be. Each launch checks several things at once:

* the main job's embedded default runs (rank 0 builds the base while ZeRO-3's init is installed: it used to hang);
* PiSSA with its pretrained reference: the KL is 0 at step 0 on every rank;
* the fused head (it gathers the partitioned LM head itself) and, from a ``balora pissa-init`` folder, the plain head;
* one rank gets a micro-batch with no trained token (the collectives rule): the run must not hang;
* the final save converts PiSSA to a LoRA for the original base, and that adapter's logits are the single-process
  run's to 1e-4 (float32);
* a run resumed from ``checkpoint-2`` continues exactly (same losses, same final adapter).

Five launches, marked slow (5.4-6.5 min on two busy cores, most of it process start-up; the first run on a machine also
compiles DeepSpeed's shared-memory op once, ~25 s, cached in ~/.cache/torch_extensions).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "deepspeed_worker.py"
CONFIGS = REPO / "configs" / "accelerate"
MASKED = 3  # global micro-batch 3: rank 1's at step 1 in the 2-process runs, step 1's second micro-batch alone

JOB = ["--use_cpu", "true", "--max_steps", "4", "--per_device_train_batch_size", "2", "--max_train_samples", "40",
       "--embedded_hidden_size", "32", "--embedded_num_layers", "1", "--embedded_vocab_size", "512",
       "--max_length", "256", "--report_to", "none", "--logging_steps", "1", "--seed", "0",
       "--learning_rate", "1e-3", "--lr_scheduler_type", "linear", "--warmup_steps", "0.03",
       "--activation_checkpointing", "false", "--init_lora_weights", "pissa",
       "--lambda_consistency", "0.5", "--lambda_diversity", "0.5", "--lambda_svd", "0.5"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command, record: Path, cwd: Path, mask: bool, timeout=900):
    """Run ``command`` in its own process group (killed whole on timeout: a hung rank must not outlive the test)."""
    record.mkdir(parents=True)
    env = dict(os.environ, BALORA_TEST_RECORD=str(record), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("BALORA_TEST_MASK_BATCH", None)
    if mask:
        env["BALORA_TEST_MASK_BATCH"] = str(MASKED)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"{' '.join(map(str, command[:8]))} ... did not finish in {timeout} s (a hang):\n{output[-4000:]}")
    assert process.returncode == 0, output[-6000:]
    ranks = sorted(record.glob("rank*.json"))
    return [json.loads(p.read_text()) for p in ranks]


def _launch(tmp: Path, name: str, config: str, args: list[str], mask: bool):
    if config == "deepspeed_zero3_cpu":  # its DeepSpeed config file is named relative to the repository's root
        settings = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
        settings["deepspeed_config"]["deepspeed_config_file"] = str(CONFIGS / "deepspeed_zero3_cpu.json")
        config_file = tmp / f"{name}.yaml"
        config_file.write_text(yaml.safe_dump(settings))
    else:
        config_file = CONFIGS / f"{config}.yaml"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
               "--num_processes", "2", "--main_process_port", str(_free_port()), str(WORKER), *args]
    ranks = _run(command, tmp / f"{name}-record", tmp, mask)
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {2}
    assert all("DEEPSPEED" in r["distributed_type"] for r in ranks)
    return ranks


def _logs(output_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (output_dir / "logs.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows if "loss" in row}


def test_models_built_outside_zero3_init_are_plain_local_models():
    """With transformers' ZeRO-3 config installed (as the training arguments install it under `accelerate launch`),
    `outside_zero3_init` hides it for the block only, and a meta-device skeleton is built without ZeRO-3's init
    (which needs the process group, and cannot partition a meta tensor)."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from balora_trl.local_models import causal_lm_config
    from balora_trl.zero3_init import meta_skeleton, outside_zero3_init

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        with outside_zero3_init():
            assert not is_deepspeed_zero3_enabled()
        assert is_deepspeed_zero3_enabled()
        skeleton = meta_skeleton(causal_lm_config("llama", 128, hidden_size=32, num_layers=1))
        assert is_deepspeed_zero3_enabled()
        params = list(skeleton.parameters())
        assert params and all(p.device.type == "meta" and not hasattr(p, "ds_numel") for p in params)
    finally:
        unset_hf_deepspeed_config()
    del config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run, launched once for the module: single process, ZeRO-3 (with checkpoints), ZeRO-3 resumed from
    checkpoint-2, ZeRO-3 from a pissa-init folder (plain head), ZeRO-2."""
    tmp = tmp_path_factory.mktemp("deepspeed")
    out = {name: tmp / name for name in ("single", "zero3", "resumed", "pissa_init", "zero2")}
    found = {"out": out}
    found["single"] = _run([sys.executable, str(WORKER), *JOB, "--output_dir", str(out["single"]),
                            "--gradient_accumulation_steps", "2"], tmp / "single-record", tmp, mask=True)
    found["zero3"] = _launch(tmp, "zero3", "deepspeed_zero3_cpu",
                             [*JOB, "--output_dir", str(out["zero3"]), "--save_strategy", "steps",
                              "--save_steps", "2"], mask=True)
    found["resumed"] = _launch(tmp, "resumed", "deepspeed_zero3_cpu",
                               [*JOB, "--output_dir", str(out["resumed"]),
                                "--resume_from_checkpoint", str(out["zero3"] / "checkpoint-2")], mask=False)
    folder = tmp / "pissa-init"
    done = subprocess.run([sys.executable, "-m", "balora_trl.cli", "pissa-init", "--model",
                           str(out["single"] / "base_model"), "--out", str(folder), "--r", "8", "--lora_alpha", "8",
                           "--init", "pissa", "--dtype", "fp32"], capture_output=True, text=True, cwd=tmp,
                          env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found["pissa_init"] = _launch(tmp, "pissa_init", "deepspeed_zero3_cpu",
                                  [*JOB, "--output_dir", str(out["pissa_init"]), "--model_name_or_path", str(folder),
                                   "--head_path", "plain"], mask=True)
    found["zero2"] = _launch(tmp, "zero2", "deepspeed_zero2_cpu", [*JOB, "--output_dir", str(out["zero2"])],
                             mask=True)
    return found


def _micro_batches(ranks):
    return {b["index"]: b["input_ids"] for r in ranks for b in r["batches"]}


def _logits(adapter_dir: Path, adapter: bool = True) -> torch.Tensor:
    """The saved final adapter applied to the original base it names (or that base alone), in float32, on two
    GSM8K prompts."""
    from peft import PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    batch = tokenizer(["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."],
                      return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "pissa_init", "zero2"])
def test_every_rank_trains_the_same_micro_batches_as_one_process(runs, name):
    """Rank r's micro-batch k is the single run's micro-batch 2k + r; one rank's micro-batch had no trained token,
    and no rank waited for a collective another skipped (the run finished)."""
    ranks, single = runs[name], _micro_batches(runs["single"])
    distributed = _micro_batches(ranks)  # 8 trained, plus what the loaders prefetched
    assert sorted(distributed) == list(range(len(distributed))) and set(range(8)) <= set(single)
    assert all(distributed[k] == single[k] for k in range(8))
    masked = [loss for r in ranks for loss in r["losses"] if loss["tokens"] == 0]
    assert len(masked) == 1 and not masked[0]["has_svd_ratio"] and masked[0]["step"] == 1
    assert ranks[1]["losses"][1]["tokens"] == 0 and ranks[0]["losses"][1]["tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "pissa_init", "zero2"])
def test_kl_is_zero_at_step_0_on_every_rank(runs, name):
    """PiSSA's pretrained reference (residual + frozen initial adapter) is the policy before the first step."""
    for rank in runs[name]:
        assert rank["reference"] == "initial_adapter"
        first = [loss for loss in rank["losses"] if loss["step"] == 0 and loss["tokens"] > 0]
        later = [loss for loss in rank["losses"] if loss["step"] == 3]
        assert first and later
        for loss in first:
            assert abs(loss["kl_sum"]) <= 1e-6 * loss["tokens"], loss
        assert any(loss["kl_sum"] > 1e-4 for loss in later)  # the policy moved away from it


@pytest.mark.slow
def test_zero3_partitions_every_parameter(runs):
    for name in ("zero3", "resumed", "pissa_init"):
        for rank in runs[name]:
            params = rank["parameters"]
            assert params["total"] > 0 and params["zero3"] == params["partitioned"] == params["total"], (name, params)
    for rank in runs["zero2"]:
        assert rank["parameters"]["zero3"] == 0


@pytest.mark.slow
def test_head_paths(runs):
    assert {r["head_path"] for r in runs["zero3"] + runs["zero2"] + runs["single"]} == {"fused"}
    assert {r["head_path"] for r in runs["pissa_init"]} == {"plain"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero3", "pissa_init", "zero2"])
def test_final_adapter_reproduces_the_single_process_run(runs, name):
    """The PiSSA -> LoRA adapter saved from the shards, on the original base: the single-process run's logits."""
    out = runs["out"]
    config = json.loads((out[name] / "adapter_config.json").read_text())
    assert config["r"] == 16 and str(config["init_lora_weights"]).lower() == "true"  # rank 2r, a plain LoRA
    reference = _logits(out["single"])
    assert (_logits(out[name]) - reference).abs().max().item() <= 1e-4
    assert (_logits(out[name], adapter=False) - reference).abs().max().item() > 1e-2  # training changed the model


@pytest.mark.slow
def test_resume_from_a_zero3_checkpoint_continues_exactly(runs):
    out = runs["out"]
    full, resumed = _logs(out["zero3"]), _logs(out["resumed"])
    assert {3, 4} <= set(resumed) and {1, 2, 3, 4} <= set(full)
    for step in (3, 4):
        for key in ("loss", "ba_lora/sft_loss", "ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio"):
            assert resumed[step][key] == pytest.approx(full[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert (_logits(out["resumed"]) - _logits(out["zero3"])).abs().max().item() <= 1e-5
