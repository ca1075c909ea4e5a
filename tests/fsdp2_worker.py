"""Run by tests/test_fsdp2.py under ``torch.distributed.run`` (2 CPU processes, gloo): BA-LoRA's loss on a model
sharded by torch's FSDP2 (``fully_shard``) against the same model unsharded, on every rank.

accelerate cannot run FSDP on a CPU, so the trainer here is an ordinary multi-CPU BALoraSFTTrainer (its collectives,
the metrics gather and the non-finite check, are real gloo ones) and its PEFT model is sharded by hand, as
accelerate's FSDP2 plugin would shard it: each decoder layer, optionally the LM head on its own, then the root.
For each head path (plain, fused) and layout, on a PiSSA model whose trained adapter has moved away from its frozen
initial copy (so the KL term and its gradient are not 0):

* the unsharded loss, and the adapter gradients averaged over the ranks (what DDP would apply);
* the sharded loss and the gradients FSDP2 reduce-scattered (gathered back with ``full_tensor``).

Writes ``$OUT/rank{R}.json`` with both losses, the largest gradient difference, and how many parameters were
really sharded (a DTensor whose local shard is smaller than the parameter).
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from datasets import Dataset
from peft import LoraConfig
from torch.distributed.fsdp import fully_shard

from balora_trl import BALoraSFTTrainer
from balora_trl.local_models import build_causal_lm, train_tokenizer
from balora_trl.prompts import DEFAULT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import cpu_config, gsm8k_rows  # noqa: E402

out = sys.argv[1]
torch.set_num_threads(1)
rows = gsm8k_rows("train", 64)
tokenizer = train_tokenizer((r["question"] + "\n" + r["answer"] for r in rows), vocab_size=512)
data = Dataset.from_list([{"prompt": DEFAULT.render(r["question"]), "completion": " " + r["answer"]} for r in rows])


def trainable_grads(model):
    grads = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = param.grad
            grads[name] = (grad.full_tensor() if hasattr(grad, "full_tensor") else grad).detach().clone()
    return grads


def run(head_path: str, shard_head: bool) -> dict:
    model = build_causal_lm("llama", tokenizer, hidden_size=32, num_layers=2, seed=0)
    trainer = BALoraSFTTrainer(
        model, cpu_config(os.path.join(out, f"{head_path}-{shard_head}"), head_path=head_path,
                          per_device_train_batch_size=2, lambda_consistency=0.5, lambda_diversity=0.5,
                          lambda_svd=0.5),
        train_dataset=data, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa"))
    assert trainer._path == head_path and trainer.reference.kind == "initial_adapter"
    peft_model = trainer.model
    with torch.no_grad():  # the trained adapter moves away from the reference's copy (same on every rank)
        generator = torch.Generator().manual_seed(1)
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))  # this rank's own examples
    peft_model.train()

    loss = trainer.compute_loss(peft_model, dict(batch))
    loss.backward()
    plain = trainable_grads(peft_model)
    for grad in plain.values():  # what DDP applies: the mean over ranks
        dist.all_reduce(grad)
        grad /= dist.get_world_size()
    peft_model.zero_grad(set_to_none=True)

    causal_lm = peft_model.get_base_model()
    for layer in causal_lm.model.layers:
        fully_shard(layer)
    if shard_head:
        fully_shard(causal_lm.lm_head)
    fully_shard(peft_model)
    sharded = [p for p in peft_model.parameters()
               if hasattr(p, "to_local") and p.to_local().numel() < p.numel()]
    loss_sharded = trainer.compute_loss(peft_model, dict(batch))
    loss_sharded.backward()
    grads = trainable_grads(peft_model)
    assert grads.keys() == plain.keys()
    kl = trainer._metrics["train"]["ba_lora/kl"]
    return {"loss": loss.item(), "loss_sharded": loss_sharded.item(), "kl": kl,
            "grad_max_diff": max((grads[n] - plain[n]).abs().max().item() for n in grads),
            "grad_max": max(g.abs().max().item() for g in plain.values()),
            "sharded_parameters": len(sharded), "parameters": sum(1 for _ in peft_model.parameters()),
            "tokens": int((batch["labels"] != -100).sum())}


results = {f"{head_path}/{'head' if shard_head else 'root'}": run(head_path, shard_head)
           for head_path in ("plain", "fused") for shard_head in (False, True)}
with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump({"rank": dist.get_rank(), "world_size": dist.get_world_size(), "results": results}, f)
dist.destroy_process_group()
