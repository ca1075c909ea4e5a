"""configs/: every recipe parses with TRL's parser into a valid BALoraConfig carrying section 4.2's settings;
configs/accelerate/: every launch config loads with accelerate and sets what BA-LoRA's reference needs."""

from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from trl import ModelConfig, TrlParser

from balora_trl import BALoraConfig
from balora_trl.dataset_formats import FORMATS, to_prompt_completion
from balora_trl.sft import BALoraScriptArguments, parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("_release"))  # the paper's text
RELEASE_RECIPES = sorted(CONFIGS.glob("*_release.yaml"))  # the authors' released training script
ACCELERATE = CONFIGS / "accelerate"

# The paper's NLG setups (section 4.1 / table 1, appendix figure 4 for LLaMA-3-8B).
EXPECTED = {
    ("metamath", "meta-llama/Llama-2-7b-hf"), ("metamath", "mistralai/Mistral-7B-v0.1"), ("metamath", "google/gemma-7b"),
    ("codefeedback", "meta-llama/Llama-2-7b-hf"), ("codefeedback", "mistralai/Mistral-7B-v0.1"),
    ("codefeedback", "google/gemma-7b"),
    ("wizardlm", "meta-llama/Llama-2-7b-hf"), ("wizardlm", "mistralai/Mistral-7B-v0.1"), ("wizardlm", "google/gemma-7b"),
    ("metamath", "meta-llama/Meta-Llama-3-8B"), ("codefeedback", "meta-llama/Meta-Llama-3-8B"),
}
DATASETS = {
    "metamath": ("meta-math/MetaMathQA", "metamath", {"query": "What is 2+3?", "response": "2+3=5. The answer is: 5"}),
    "codefeedback": ("m-a-p/CodeFeedback-Filtered-Instruction", "codefeedback",
                     {"query": "Write add(a, b).", "answer": "```python\ndef add(a, b):\n    return a + b\n```"}),
    "wizardlm": ("WizardLMTeam/WizardLM_evol_instruct_V2_196k", "sharegpt",
                 {"idx": "x", "conversations": [{"from": "human", "value": "Name a prime."}, {"from": "gpt", "value": "7"}]}),
}


def test_every_setup_of_the_paper_has_a_recipe():
    found = set()
    for path in RECIPES:
        config = yaml.safe_load(path.read_text())
        found.add((path.stem.split("_")[0], config["model_name_or_path"]))
    assert found == EXPECTED


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_with_trl_parser(path):
    # TRL's own parser, on the three dataclasses, with no BA-LoRA defaults: the YAML alone must be complete and valid.
    parser = TrlParser((BALoraScriptArguments, BALoraConfig, ModelConfig))
    script, training, model = parser.parse_args_and_config(["--config", str(path)])
    assert isinstance(training, BALoraConfig)

    # Section 4.2.
    assert (training.lambda_consistency, training.lambda_diversity, training.lambda_svd) == (1e-4, 3e-4, 1e-4)
    assert model.use_peft and model.lora_r == 8 and model.lora_alpha in (8, 16) and model.lora_dropout == 0.0
    assert script.init_lora_weights.startswith("pissa")
    assert model.dtype == "float32" and not training.bf16 and not training.fp16  # float32 base and adapter
    assert training.completion_only_loss is True  # loss on the responses only
    assert training.num_train_epochs == 1 and training.max_steps == -1
    assert training.optim.startswith("adamw") and training.lr_scheduler_type == "linear"
    assert training.learning_rate in (1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4, 5e-5, 3e-5)  # the paper's grid
    assert training.per_device_train_batch_size * training.gradient_accumulation_steps in (6, 8, 16, 32)
    assert script.max_train_samples == 100_000
    assert set(model.lora_target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    task = path.stem.split("_")[0]
    dataset, fmt, row = DATASETS[task]
    assert (script.dataset_name, script.dataset_format) == (dataset, fmt)
    assert script.dataset_format in FORMATS
    # The recipe's data settings turn a row of that dataset's shape into a text prompt/completion.
    converted, template = to_prompt_completion(Dataset.from_list([row]), script.dataset_format, script.prompt_template)
    assert template.name == "alpaca" and converted[0]["prompt"].endswith("### Response:")

    # What the paper leaves open is said in a comment.
    text = path.read_text()
    assert "Left open by the paper" in text and "learning_rate" in text and "svd_top_k" in text


def test_every_paper_recipe_has_a_release_sibling():
    assert [p.stem + "_release" for p in RECIPES] == [p.stem for p in RELEASE_RECIPES]


@pytest.mark.parametrize("path", RELEASE_RECIPES, ids=lambda p: p.stem)
def test_release_recipe_parses_with_the_releases_settings(path):
    parser = TrlParser((BALoraScriptArguments, BALoraConfig, ModelConfig))
    # bf16 is the release's: transformers only accepts it on a CPU-only machine when told to train on the CPU.
    script, training, model = parser.parse_args_and_config(["--config", str(path), "--use_cpu", "true"])
    paper_script, _, paper_model = parser.parse_args_and_config(["--config", str(path).replace("_release", "")])

    # scripts/ba-lora.sh + train.py of github.com/llm172/BA-LoRA
    assert (training.lambda_consistency, training.lambda_diversity, training.lambda_svd) == (0.025, 0.005, 0.005)
    assert training.lambda_consistency_schedule == "cosine" and training.lambda_consistency_end is None  # 0.1·λ1
    assert (training.lambda_focus_schedule, training.focus_warmup_ratio, training.focus_ramp_ratio) == (
        "two_phase", 0.2, 0.05)
    assert (training.entropy_top_k, training.svd_normalizer, training.svd_top_k) == (20, "frobenius", 10)
    assert (training.kl_temperature, training.kl_t2_scaling, training.kl_target) == (2.0, True, None)
    assert model.lora_r == 128 and model.lora_alpha == 128 and model.lora_dropout == 0.0
    assert script.init_lora_weights == "pissa_niter_16"
    assert model.dtype == "bfloat16" and training.bf16 and not training.fp16
    assert training.learning_rate == 2e-5 and training.lr_scheduler_type == "cosine" and training.warmup_steps == 0.03
    assert (training.per_device_train_batch_size, training.gradient_accumulation_steps) == (4, 4)
    assert training.num_train_epochs == 1 and training.seed == 1024 and training.weight_decay == 0.0
    assert training.completion_only_loss is True and script.max_train_samples == 100_000
    assert script.tokenization == "release"  # train.py's joining and truncation
    assert set(model.lora_target_modules) == set(paper_model.lora_target_modules)
    assert model.model_name_or_path == paper_model.model_name_or_path

    # Data: the release's pissa-dataset for MetaMathQA; the paper recipe's data otherwise.
    if path.stem.startswith("metamath"):
        assert (script.dataset_name, script.dataset_data_dir, script.dataset_format) == (
            "fxmeng/pissa-dataset", "metamath", "pissa")
        rows = Dataset.from_list([{"instruction": "What is 2+3?", "output": "5"}])
        converted, template = to_prompt_completion(rows, script.dataset_format, script.prompt_template)
        assert template.name == "alpaca" and converted[0]["prompt"].endswith("### Response:")
    else:
        assert (script.dataset_name, script.dataset_format) == (paper_script.dataset_name, paper_script.dataset_format)

    # The header says where each value comes from.
    text = path.read_text()
    for source in ("scripts/ba-lora.sh", "train.py", "github.com/llm172/BA-LoRA", "lambda1 0.025", "top_k_entropy 20",
                   "svd_frob_norm", "distill_temp 2.0", "pissa_niter_16", "seed 1024", "mean per micro-batch",
                   "casts the whole PEFT model to bf16"):
        assert source in text, source


def test_command_line_overrides_the_recipe():
    recipe = str(CONFIGS / "metamath_llama2_7b.yaml")
    script, training, model = parse_args(["--config", recipe, "--learning_rate", "1e-4", "--lora_alpha", "16",
                                          "--lambda_svd", "0", "--max_train_samples", "500"])
    assert training.learning_rate == 1e-4 and model.lora_alpha == 16 and training.lambda_svd == 0.0
    assert script.max_train_samples == 500
    assert training.lambda_diversity == 3e-4  # untouched fields keep the recipe's value


def test_bad_value_fails_when_parsed():
    recipe = str(CONFIGS / "metamath_llama2_7b.yaml")
    with pytest.raises(ValueError, match="lambda_svd"):
        parse_args(["--config", recipe, "--lambda_svd", "-1"])


# ------------------------------------------------------------------------------------------------------------------
# accelerate launch configs
# ------------------------------------------------------------------------------------------------------------------

def _load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(ACCELERATE / f"{name}.yaml"))


def test_accelerate_configs_load():
    from accelerate.utils import DistributedType

    kinds = {p.stem: _load(p.stem).distributed_type for p in ACCELERATE.glob("*.yaml")}
    assert kinds == {
        "single_gpu": DistributedType.NO,
        "multi_gpu": DistributedType.MULTI_GPU,
        "fsdp": DistributedType.FSDP,
        "deepspeed_zero2": DistributedType.DEEPSPEED,
        "deepspeed_zero3": DistributedType.DEEPSPEED,
        "fsdp_pissa_init": DistributedType.FSDP,  # pre-initialised PiSSA: tests/test_pissa_init.py
        "deepspeed_zero3_pissa_init": DistributedType.DEEPSPEED,
        "deepspeed_zero2_cpu": DistributedType.DEEPSPEED,  # 2 CPU processes: tests/test_deepspeed.py
        "deepspeed_zero3_cpu": DistributedType.DEEPSPEED,
    }
    for name in kinds:  # the recipes compute in float32 (with a DeepSpeed file, the job's --bf16 decides: "auto")
        assert _load(name).mixed_precision == (None if name == "deepspeed_zero3_cpu" else "no")


def test_fsdp_config_fits_peft_and_pissa():
    fsdp = _load("fsdp").fsdp_config
    assert fsdp["fsdp_use_orig_params"] is True  # frozen base + trainable adapter in one flat parameter
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # PiSSA's SVD needs the full weights on every rank
    assert fsdp["fsdp_sync_module_states"] is True


def test_deepspeed_configs():
    zero2, zero3 = _load("deepspeed_zero2").deepspeed_config, _load("deepspeed_zero3").deepspeed_config
    assert zero2["zero_stage"] == 2 and zero3["zero_stage"] == 3
    assert zero3["zero3_init_flag"] is False  # accelerate's default (transformers 5 partitions at load regardless)
    assert zero3["zero3_save_16bit_model"] is True  # the adapter is gathered from the shards at save time


def test_deepspeed_cpu_configs():
    """The CPU variants: use_cpu, and ZeRO-3's DeepSpeed file (named relative to the repository's root) partitions
    every parameter and gathers the adapter at save time."""
    import json

    zero2, zero3 = _load("deepspeed_zero2_cpu"), _load("deepspeed_zero3_cpu")
    assert zero2.use_cpu and zero3.use_cpu and zero2.deepspeed_config["zero_stage"] == 2
    ds_file = ACCELERATE.parents[1] / zero3.deepspeed_config["deepspeed_config_file"]
    ds = json.loads(ds_file.read_text())["zero_optimization"]
    assert ds["stage"] == 3 and ds["stage3_param_persistence_threshold"] == 0
    assert ds["stage3_gather_16bit_weights_on_model_save"] is True
    assert json.loads(ds_file.read_text())["bf16"]["enabled"] == "auto"  # the job's --bf16 (false: float32)
