"""Every rank issues the same collectives whatever its micro-batch holds (one process, remote ranks emulated).

A rank that skips a gather another rank makes hangs multi-GPU training or pairs its tensors with the wrong ones; a
rank that raises alone leaves the others waiting. Recorded here: the accelerator's collective calls (name, shape,
dtype) for a micro-batch with trained tokens and one without (reachable with packing and long prompts), and the
non-finite check's reduction with a remote rank's flag.

tests/test_deepspeed.py gives one rank a micro-batch with no trained token in real 2-process ZeRO-2/3 runs (no hang,
the single-process result). Kept here, out of a real run's reach or sight: the exact call sequence in train and eval
mode, the gathered means' values, and a non-finite loss on one rank only.
"""

import pytest
import torch
from conftest import cpu_config
from peft import LoraConfig

from balora_trl import BALoraSFTTrainer

COLLECTIVES = ("gather", "gather_for_metrics", "reduce", "pad_across_processes")


def record_collectives(accelerator, monkeypatch, remote=None):
    """Record every collective ``accelerator`` issues; ``remote[name](tensor)`` may stand in for the other ranks."""
    calls = []
    for name in COLLECTIVES:
        original = getattr(type(accelerator), name).__get__(accelerator)  # unpatched, even when called again

        def call(tensor, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, tuple(tensor.shape), tensor.dtype))
            if remote and _name in remote:
                return remote[_name](tensor)
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(accelerator, name, call)
    return calls


def sft_trainer(model, tokenizer, dataset, tmp_path, **cfg):
    return BALoraSFTTrainer(model, cpu_config(tmp_path, **cfg), train_dataset=dataset, processing_class=tokenizer,
                            peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa"))


def batches(trainer):
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    empty = dict(batch)
    empty["labels"] = torch.full_like(batch["labels"], -100)  # no trained token: no SVD ratio on this rank
    return batch, empty


@pytest.mark.parametrize("head_path", ["plain", "fused"])
def test_same_collectives_with_and_without_trained_tokens(head_path, make_model, tokenizer, gsm8k_prompt_completion,
                                                          tmp_path, monkeypatch):
    trainer = sft_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, head_path=head_path,
                          lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=0.5)
    assert trainer._path == head_path
    batch, empty = batches(trainer)
    calls = record_collectives(trainer.accelerator, monkeypatch)
    sequences = {}
    for mode in ("train", "eval"):
        trainer.model.train(mode == "train")
        for name, inputs, items in (("tokens", batch, None), ("none", empty, 0)):
            calls.clear()
            trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=items)
            sequences[mode, name] = list(calls)
        assert sequences[mode, "tokens"] == sequences[mode, "none"], mode
        assert [c[0] for c in sequences[mode, "tokens"]].count("reduce") == 1  # the non-finite check, every step
    assert trainer._metrics["train"]["ba_lora/svd_ratio"]  # the batch with tokens did have a ratio


def test_metrics_over_ranks_with_and_without_trained_tokens(make_model, tokenizer, gsm8k_prompt_completion,
                                                            tmp_path, monkeypatch):
    """Rank 0 has trained tokens, rank 1 none: the means are rank 0's, the SVD ratio is averaged over the ranks
    that have one, and TRL's `num_tokens` counts both ranks' attended tokens."""
    trainer = sft_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, head_path="plain",
                          lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=0.5)
    batch, empty = batches(trainer)
    rows = {}

    def keep(name):
        def gather(tensor):
            rows[name] = tensor
            return tensor
        return gather

    for name, inputs, items in (("alone", batch, None), ("remote", empty, 0)):
        trainer._metrics["train"].clear()
        record_collectives(trainer.accelerator, monkeypatch, remote={"gather": keep(name)})
        trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=items)
        if name == "alone":
            alone = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("ba_lora/")}
            tokens_before = trainer._total_train_tokens
    assert rows["alone"].shape == rows["remote"].shape  # one fixed-shape row per rank
    assert "ba_lora/svd_ratio" not in trainer._metrics["train"]  # the empty batch alone has no ratio to log

    trainer._metrics["train"].clear()
    tokens = trainer._total_train_tokens
    record_collectives(trainer.accelerator, monkeypatch,
                       remote={"gather": lambda t: torch.cat([t, rows["remote"]])})
    trainer.compute_loss(trainer.model, dict(batch))
    both = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("ba_lora/")}
    assert both.keys() == alone.keys() and "ba_lora/svd_ratio" in both
    for key in both:
        assert both[key] == pytest.approx(alone[key], rel=1e-6), key
    attended = int(batch["attention_mask"].sum()) + int(empty["attention_mask"].sum())
    assert trainer._total_train_tokens - tokens == attended
    assert tokens_before > 0


def test_non_finite_loss_on_another_rank_stops_this_one(make_model, tokenizer, gsm8k_prompt_completion, tmp_path,
                                                       monkeypatch):
    trainer = sft_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, lambda_svd=0.5)
    batch, _ = batches(trainer)
    calls = record_collectives(trainer.accelerator, monkeypatch, remote={"reduce": lambda flag: flag + 1.0})
    with pytest.raises(FloatingPointError, match=r"non-finite loss on another rank at step 0"):
        trainer.compute_loss(trainer.model, dict(batch))
    assert ("reduce", (1,), torch.float32) in calls


def test_nlu_trainer_agrees_on_non_finite_loss(tmp_path, monkeypatch):
    """The NLU trainer reduces the same flag: a finite local loss still stops when a remote rank's is not."""
    from test_nlu import make_trainer, tiny_bert  # the helpers of the NLU tests
    from transformers import AutoTokenizer

    from balora_trl.nlu import default_encoder, load_local, sst2_sample, tokenize_task

    tok = AutoTokenizer.from_pretrained(default_encoder())
    data = tokenize_task(load_local(sst2_sample("train")).select(range(32)), tok, "sst2", 32)
    trainer = make_trainer(tiny_bert(), tok, data, tmp_path, lambda_consistency=1e-4)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    calls = record_collectives(trainer.accelerator, monkeypatch)
    trainer.compute_loss(trainer.model, dict(batch))
    assert [c[0] for c in calls].count("reduce") == 1  # issued on a finite step too
    record_collectives(trainer.accelerator, monkeypatch, remote={"reduce": lambda flag: flag + 1.0})
    with pytest.raises(FloatingPointError, match="another rank"):
        trainer.compute_loss(trainer.model, dict(batch))
