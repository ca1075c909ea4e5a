"""Fine-tune an encoder on a GLUE task with LoRA, PiSSA or BA-LoRA (paper section 4, appendix B).

    python examples/nlu_glue.py                                  # SST-2 (GLUE dev + slice), MiniLM-L6, BA-LoRA, offline
    python examples/nlu_glue.py --config configs/nlu/deberta-v3-base.yaml --task mnli
    python examples/nlu_glue.py --task cola --train_file cola/train.tsv --eval_file cola/dev.tsv --method lora
    python examples/nlu_glue.py --task mnli --train_file train.tsv --eval_file dev_matched.tsv dev_mismatched.tsv

Data: the Hub's `glue` dataset for ``--task`` (validation split; MNLI: matched and mismatched), or local
.tsv/.csv/.jsonl files with the task's GLUE column names (SST-2/CoLA: sentence; MRPC/RTE/WNLI/STS-B: sentence1,
sentence2; QQP: question1, question2; QNLI: question, sentence; MNLI: premise, hypothesis) and a ``label`` column
(``--label_column`` / ``--text_columns`` name other columns, e.g. the original GLUE TSVs'). Without
``--train_file`` and without the Hub (offline, as on this project's machines), SST-2 falls back to the files shipped
in ``balora_trl/data``: it trains on 2,000 rows of GLUE SST-2 train and reports two sets side by side,
``glue_dev/accuracy`` on GLUE's own SST-2 dev split (872 full sentences, the paper's evaluation set) and
``in_dist/accuracy`` on 872 other, held-out rows of GLUE SST-2 train (the in-distribution validation slice).

Models: any ``AutoModelForSequenceClassification`` id or path — the packaged MiniLM-L6 is the offline default;
``microsoft/deberta-v3-base``, ``roberta-large``, ``bert-large-uncased`` by Hub id (the configs in configs/nlu/ hold
the appendix-B settings for each). Methods: ``lora`` (B = 0), ``pissa`` (principal components), ``ba-lora`` (PiSSA +
λ1 = 1e-4, λ2 = 4e-4, λ3 = 1e-4; override with --lambda_*). The classifier head is trained (PEFT's SEQ_CLS
``modules_to_save``). Metrics: accuracy; MCC for CoLA; Pearson/Spearman for STS-B; F1 and accuracy for MRPC/QQP;
matched/mismatched accuracy for MNLI. They are printed and written to ``<output_dir>/eval_results.json``.

t-SNE: ``--feature_dump_steps 0 100 -1`` saves the eval set's pooled features at those steps under
``<output_dir>/features/``; ``examples/tsne.py --run LoRA=<dir>/features --run BA-LoRA=<dir>/features`` draws them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FALLBACK = {  # what an option means when neither the config file nor the command line sets it
    "task": "sst2", "method": "ba-lora", "output_dir": "outputs/nlu", "label_column": "label",
    "epochs": 3.0, "max_steps": -1, "batch_size": 32, "eval_batch_size": 128, "grad_accum": 1,
    "learning_rate": 5e-4, "lr_scheduler": "cosine", "warmup": 0.03, "weight_decay": 0.0,
    "lora_r": 8, "lora_alpha": 8.0, "target_modules": ["all-linear"], "max_length": 128, "seed": 0,
    "svd_top_k": 1, "features": "logits", "feature_dump_steps": [], "logging_steps": 25,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML with `model`, `defaults` and per-task settings under `tasks` (configs/nlu)")
    p.add_argument("--task", help="GLUE task: cola sst2 mrpc qqp stsb mnli qnli rte wnli (default sst2)")
    p.add_argument("--model", help="model id or path (default: the packaged MiniLM-L6)")
    p.add_argument("--method", choices=["lora", "pissa", "ba-lora"], help="default ba-lora")
    p.add_argument("--train_file", help="local .tsv/.csv/.jsonl/.json training file")
    p.add_argument("--eval_file", nargs="+", help="local evaluation file(s); MNLI: matched then mismatched")
    p.add_argument("--label_column", help="gold column of the local files (default label)")
    p.add_argument("--text_columns", nargs="+", help="text column(s) of the local files, if not the GLUE names")
    p.add_argument("--output_dir")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max_steps", type=int, help="> 0 overrides --epochs")
    p.add_argument("--batch_size", type=int)
    p.add_argument("--eval_batch_size", type=int)
    p.add_argument("--grad_accum", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--lr_scheduler")
    p.add_argument("--warmup", type=float, help="warmup ratio (< 1) or steps")
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--lora_r", type=int)
    p.add_argument("--lora_alpha", type=float)
    p.add_argument("--target_modules", nargs="+", help="module names, or all-linear (default)")
    p.add_argument("--max_length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--lambda_consistency", type=float, help="λ1 (eq. 5); default 1e-4 for ba-lora, 0 otherwise")
    p.add_argument("--lambda_diversity", type=float, help="λ2 (eqs. 6-7); default 4e-4 for ba-lora, 0 otherwise")
    p.add_argument("--lambda_svd", type=float, help="λ3 (eq. 8); default 1e-4 for ba-lora, 0 otherwise")
    p.add_argument("--svd_top_k", type=int)
    p.add_argument("--features", choices=["logits", "hidden"], help="F in eqs. 5-8 (default logits)")
    p.add_argument("--feature_dump_steps", type=int, nargs="*", help="steps to dump eval features (-1: end)")
    p.add_argument("--max_train_samples", type=int)
    p.add_argument("--max_eval_samples", type=int)
    p.add_argument("--logging_steps", type=int)
    p.add_argument("--bf16", action="store_true", default=None)
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--save", action="store_true", default=None,
                   help="save the adapter (+ head); PiSSA adapters are converted to plain LoRA on the original base")
    return p


def resolve(argv=None) -> argparse.Namespace:
    """Command line > config file (`tasks.<task>` > `defaults` > top level) > FALLBACK."""
    parser = build_parser()
    args = parser.parse_args(argv)
    merged: dict = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            doc = yaml.safe_load(f) or {}
        task = args.task or doc.get("task") or FALLBACK["task"]
        tasks = doc.get("tasks") or {}
        if tasks and task not in tasks:
            parser.error(f"{args.config} has no settings for task {task!r} (it has: {sorted(tasks)}).")
        for layer in ({k: v for k, v in doc.items() if k not in ("defaults", "tasks")}, doc.get("defaults") or {},
                      tasks.get(task) or {}):
            merged.update(layer)
        merged["task"] = task
    types = {a.dest: a.type for a in parser._actions}
    for key, value in merged.items():
        if key not in types:
            parser.error(f"unknown option {key!r} in {args.config}")
        convert = types[key]
        if convert is not None and value is not None:  # PyYAML reads 1e-4 as a string
            value = [convert(v) for v in value] if isinstance(value, list) else convert(value)
        merged[key] = value
    for key, value in vars(args).items():
        if value is not None:
            merged[key] = value
    for key, value in FALLBACK.items():
        merged.setdefault(key, value)
    for key in ("model", "train_file", "eval_file", "text_columns", "lambda_consistency", "lambda_diversity", "lambda_svd",
                "max_train_samples", "max_eval_samples", "bf16", "threads", "save", "config"):
        merged.setdefault(key, None)
    if isinstance(merged["target_modules"], list) and merged["target_modules"] == ["all-linear"]:
        merged["target_modules"] = "all-linear"
    return argparse.Namespace(**merged)


def load_data(args, task):
    """{"train": Dataset, "<eval name>": Dataset, ...} from local files, the Hub, or the shipped SST-2 files (GLUE
    dev first: the trainer's eval set)."""
    from balora_trl.nlu import load_local, sst2_sample

    if args.train_file:
        train = load_local(args.train_file, "train")
        if args.eval_file:
            evals = {Path(p).stem if len(args.eval_file) > 1 else "eval": load_local(p, "eval") for p in args.eval_file}
        else:
            print("No --eval_file: holding out 10% of the training file for evaluation.")
            split = train.train_test_split(test_size=0.1, seed=args.seed)
            train, evals = split["train"], {"eval": split["test"]}
        return train, evals
    if args.eval_file:
        raise ValueError("--eval_file needs --train_file (or leave both out to use the Hub's GLUE splits).")
    try:
        from datasets import load_dataset

        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
            raise ConnectionError("offline mode")
        glue = load_dataset("nyu-mll/glue", task.name)
        evals = {split if len(task.eval_splits) > 1 else "eval": glue[split] for split in task.eval_splits}
        return glue["train"], evals
    except Exception as error:  # noqa: BLE001 - no Hub: the offline default, or a clear message
        if task.name != "sst2":
            raise ValueError(f"Could not load GLUE {task.name} from the Hub ({type(error).__name__}: {error}); pass "
                             "--train_file and --eval_file.") from None
        print(f"GLUE from the Hub unavailable ({type(error).__name__}); using the shipped SST-2 files: 2,000 rows of "
              "GLUE SST-2 train; evaluation on GLUE SST-2 dev and on 872 held-out rows of GLUE SST-2 train.")
        evals = {"glue_dev": load_local(sst2_sample("glue_dev"), "glue_dev"),
                 "in_dist": load_local(sst2_sample("dev"), "in_dist")}
        return load_local(sst2_sample("train"), "train"), evals


def main(argv=None) -> dict:
    args = resolve(argv)
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed

    from balora_trl import BALoraNLUConfig
    from balora_trl.nlu import (METHODS, BALoraTrainer, default_encoder, glue_metrics, glue_task, lora_config,
                                save_adapter, save_initial_adapter, tokenize_task, write_json)

    task = glue_task(args.task)
    model_path = args.model or default_encoder()
    if args.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged encoder is a local path
    train, evals = load_data(args, task)
    if args.max_train_samples and args.max_train_samples < len(train):
        train = train.shuffle(seed=args.seed).select(range(args.max_train_samples))
    if args.max_eval_samples:
        evals = {k: v.select(range(min(args.max_eval_samples, len(v)))) for k, v in evals.items()}

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    columns = {"label_column": args.label_column, "text_columns": args.text_columns}
    train = tokenize_task(train, tokenizer, task, args.max_length, name=args.train_file or "train", **columns)
    evals = {k: tokenize_task(v, tokenizer, task, args.max_length, name=k, **columns) for k, v in evals.items()}

    regularised = METHODS[args.method][1]
    lambdas = {name: (default if regularised else 0.0) if getattr(args, name) is None else getattr(args, name)
               for name, default in (("lambda_consistency", 1e-4), ("lambda_diversity", 4e-4), ("lambda_svd", 1e-4))}
    set_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=task.num_labels, problem_type="regression" if task.is_regression else None)
    if model.config.pad_token_id is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    first_eval = next(iter(evals.values()))
    config = BALoraNLUConfig(
        args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler, warmup_steps=args.warmup, weight_decay=args.weight_decay,
        seed=args.seed, bf16=bool(args.bf16), logging_steps=args.logging_steps, report_to="none",
        save_strategy="no", svd_top_k=args.svd_top_k, regulariser_features=args.features,
        feature_dump_steps=list(args.feature_dump_steps or []), **lambdas,
    )
    trainer = BALoraTrainer(model, config, train_dataset=train, eval_dataset=first_eval, processing_class=tokenizer,
                            data_collator=DataCollatorWithPadding(tokenizer),
                            peft_config=lora_config(args.method, args.lora_r, args.lora_alpha, args.target_modules))
    init_dir = None
    if args.save and METHODS[args.method][0] == "pissa":  # keep the initial adapter to convert PiSSA -> LoRA at save
        init_dir = save_initial_adapter(trainer.model, tempfile.mkdtemp(prefix="pissa_init_"))
    print(f"{task.name}: {len(train)} train rows, eval {', '.join(f'{k} {len(v)}' for k, v in evals.items())}; "
          f"{args.method} (λ1 {lambdas['lambda_consistency']:g}, λ2 {lambdas['lambda_diversity']:g}, "
          f"λ3 {lambdas['lambda_svd']:g}, F = {args.features}); reference: "
          f"{trainer.reference.describe() if trainer.reference else 'none (λ1 = 0)'}", flush=True)
    start = time.time()
    trainer.train()
    seconds = time.time() - start

    metrics: dict[str, float] = {}
    for name, dataset in evals.items():
        out = trainer.collect(dataset)
        result = glue_metrics(task, out["logits"], np.asarray(dataset["label"]))
        prefix = "" if len(evals) == 1 else f"{name}/"
        metrics.update({prefix + k: v for k, v in result.items()})
    print("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
    write_json(Path(args.output_dir) / "eval_results.json", {
        "task": task.name, "model": model_path, "method": args.method, "metrics": metrics, "train_seconds": seconds,
        "train_rows": len(train), "eval_rows": {k: len(v) for k, v in evals.items()},
        "settings": {k: v for k, v in vars(args).items()}, "lambdas": lambdas,
    })
    if args.save:
        save_adapter(trainer.model, Path(args.output_dir) / "adapter", init_dir)
        tokenizer.save_pretrained(Path(args.output_dir) / "adapter")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
