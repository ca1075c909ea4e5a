"""Shared fixtures: offline, tiny models built in-process, a locally trained tokenizer, real GSM8K rows."""

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest
import torch
from transformers import TrainerCallback

torch.set_num_threads(min(2, torch.get_num_threads()))

REPO = Path(__file__).resolve().parents[1]
# The first 1,000 rows of the GSM8K train split (MIT, (c) OpenAI: tests/data/GSM8K_LICENSE), shipped with the tests
# so a fresh clone needs nothing beside the repository.
GSM8K_TRAIN_SAMPLE = Path(__file__).resolve().parent / "data" / "gsm8k_train_sample.jsonl"


def gsm8k_rows(split: str = "train", n: int = 64) -> list[dict]:
    """The first ``n`` GSM8K train rows ({"question", "answer"}) from the shipped sample."""
    if split != "train":
        raise ValueError(f"only the GSM8K train sample ships with the tests (asked for {split!r})")
    with open(GSM8K_TRAIN_SAMPLE) as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    if len(rows) < n:
        raise ValueError(f"{GSM8K_TRAIN_SAMPLE} holds {len(rows)} rows, fewer than the {n} asked for")
    return rows


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module (tiny tiles / tiny encoders: a second thread on the shared 2-core machine
    spins more than it computes); restores the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    from balora_trl.local_models import train_tokenizer

    rows = gsm8k_rows("train", 1000)
    return train_tokenizer((r["question"] + "\n" + r["answer"] for r in rows), vocab_size=512)


@pytest.fixture(scope="session")
def gsm8k_prompt_completion():
    """Real GSM8K rows as TRL prompt/completion, prompted with the default (Alpaca) template."""
    from datasets import Dataset

    from balora_trl.prompts import DEFAULT

    rows = gsm8k_rows("train", 256)
    return Dataset.from_list([{"prompt": DEFAULT.render(r["question"]), "completion": " " + r["answer"]} for r in rows])


@pytest.fixture
def make_model(tokenizer):
    """Factory: a seeded tiny causal LM of a family ('llama', 'gpt2', 'qwen2', 'gemma', 'gemma2')."""
    from balora_trl.local_models import build_causal_lm

    def make(family: str = "llama", seed: int = 0, **kw):
        kw.setdefault("hidden_size", 32)
        return build_causal_lm(family, tokenizer, seed=seed, **kw)

    return make


def cpu_config(output_dir, **kw):
    """A BALoraConfig fit for numeric tests on CPU: fp32, no checkpointing, no saving, no reporting."""
    from balora_trl import BALoraConfig

    base = dict(bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no",
                logging_steps=1, per_device_train_batch_size=4, dataloader_num_workers=0, seed=0, max_length=256)
    base.update(kw)
    return BALoraConfig(str(output_dir), **base)



class StopAt(TrainerCallback):
    """Interrupt the run after optimizer step ``step`` (that step's checkpoint is saved first): the first half of
    every exact-resume test."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
