"""Run by tests/test_multiprocess.py under `accelerate launch`: the main job (balora_trl.sft) with three probes.

* every example each rank's data loader hands to the collator (its token ids) -> what data each rank saw;
* every file or folder this process creates or opens for writing under output_dir (a Python audit hook);
* the trainable adapter weights before and after training, saved per rank outside output_dir.
"""

import json
import os
import sys

import torch

from balora_trl.sft import build_trainer, parse_args, train_and_save

record = os.environ["BALORA_TEST_RECORD"]
script_args, training_args, model_args = parse_args()
out = os.path.abspath(training_args.output_dir)
writes = []


def audit(event, args):
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    elif event in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.symlink", "shutil.rmtree"):
        path, writing = args[0], True
        if event == "os.mkdir" and os.path.exists(os.fsdecode(path)):
            writing = False  # makedirs(exist_ok=True) on a folder that is already there creates nothing
    else:
        return
    if writing and isinstance(path, (str, bytes, os.PathLike)):
        full = os.path.abspath(os.fsdecode(path))
        if full == out or full.startswith(out + os.sep):
            writes.append(f"{event} {full}")


sys.addaudithook(audit)

trainer, template = build_trainer(script_args, training_args, model_args)
rank, world = training_args.process_index, training_args.world_size
seen = []
collate = trainer.data_collator


def recording_collator(examples):
    seen.extend(list(map(int, e["input_ids"])) for e in examples)
    return collate(examples)


trainer.data_collator = recording_collator


def trainable():
    return {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


before = trainable()
train_and_save(trainer, template, script_args, training_args, model_args)
torch.save({"before": before, "after": trainable()}, os.path.join(record, f"adapter_rank{rank}.pt"))
with open(os.path.join(record, f"rank{rank}.json"), "w") as f:
    json.dump({"rank": rank, "world_size": world, "distributed_type": str(training_args.distributed_state.distributed_type),
               "seen": seen, "writes": writes}, f)
trainer.end() if hasattr(trainer, "end") else None
