"""Run by tests/test_deepspeed.py: the main job (balora_trl.sft) under `accelerate launch` with DeepSpeed on two CPU
processes, or alone as the single-process run it is compared with. Writes ``$BALORA_TEST_RECORD/rank{R}.json``:

* ``batches``: for every micro-batch this rank collated, its global index (micro-batch ``k`` of rank ``r`` among
  ``W`` is ``k·W + r``; one process with gradient accumulation ``W`` sees the same sequence) and its examples'
  token ids, so the test can check both runs saw the same data in the same micro-batches (counted from the
  first micro-batch this run collates: from the start, not from a resumed step);
* ``losses``: every ``compute_loss`` call's local (this rank's) response-token count, KL sum and whether it had an
  SVD ratio, with the optimizer step it belongs to;
* ``parameters``: after training, how many of the model's parameters DeepSpeed has partitioned (ZeRO-3 marks each
  with ``ds_numel``; a partitioned one holds no data outside a gather) out of how many;
  and how many were already partitioned when the trainer was built (loaded under ``zero.Init``);
* the head path and the reference kind the trainer chose.

``BALORA_TEST_MASK_BATCH=k`` turns every label of global micro-batch ``k`` into -100 (a micro-batch with no trained
token, on one rank only): every rank must still issue the same collectives, or the run hangs.
"""

import json
import os

import torch

from balora_trl.sft import build_trainer, parse_args, train_and_save

record = os.environ["BALORA_TEST_RECORD"]
masked = int(os.environ.get("BALORA_TEST_MASK_BATCH", "-1"))
script_args, training_args, model_args = parse_args()
trainer, template = build_trainer(script_args, training_args, model_args)
# Before DeepSpeed wraps the model: were the base weights loaded partitioned (zero.Init)?
loaded_partitioned = sum(1 for p in trainer.model.parameters() if hasattr(p, "ds_numel") and p.numel() == 0)
rank, world = training_args.process_index, training_args.world_size
batches, losses = [], []
collate = trainer.data_collator


def probing_collator(examples):
    batch = collate(examples)
    index = len(batches) * world + rank
    batches.append({"index": index, "input_ids": [list(map(int, e["input_ids"])) for e in examples]})
    if index == masked:
        batch["labels"] = torch.full_like(batch["labels"], -100)
    return batch


trainer.data_collator = probing_collator
record_metrics = trainer._record_metrics


def probing_record_metrics(mode, out, inputs):
    losses.append({"step": trainer.state.global_step, "mode": mode, "tokens": int(out.num_tokens),
                   "kl_sum": None if out.kl_sum is None else float(out.kl_sum),
                   "has_svd_ratio": out.svd_ratio is not None})
    return record_metrics(mode, out, inputs)


trainer._record_metrics = probing_record_metrics
train_and_save(trainer, template, script_args, training_args, model_args)

params = list(trainer.accelerator.unwrap_model(trainer.model).named_parameters())
zero3 = [p for _, p in params if hasattr(p, "ds_numel")]
with open(os.path.join(record, f"rank{rank}.json"), "w") as f:
    json.dump({
        "rank": rank, "world_size": world, "distributed_type": str(training_args.distributed_state.distributed_type),
        "head_path": trainer._path, "reference": None if trainer.reference is None else trainer.reference.kind,
        "batches": batches, "losses": losses,
        "parameters": {"total": len(params), "zero3": len(zero3), "loaded_partitioned": loaded_partitioned,
                       "partitioned": sum(1 for p in zero3 if p.numel() == 0 and p.ds_numel > 0)},
    }, f)
trainer.end() if hasattr(trainer, "end") else None
