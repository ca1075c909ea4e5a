"""What BA-LoRA changes on a real model: SmolLM2-135M-Instruct fine-tuned on GSM8K (README, "What BA-LoRA changes on
a real model"; the design is pre-registered there and this script follows it).

    python benchmarks/real_lm.py                 # the pre-registered experiment (hours; cached, resumes)
    python benchmarks/real_lm.py --quick         # smoke test of every stage (CI: tests/test_real_lm.py)
    python benchmarks/real_lm.py --report_only   # tables, tests and the figure from whatever cells are finished

Stages, each cached under ``--cache_dir`` in a folder named by a hash of everything that shapes it:
  1. learning rate: PiSSA at seed 0 for every rate of the grid, validation loss on held-out GSM8K train rows;
  2. cells (arm × seed): train with ``BALoraSFTTrainer`` (the PiSSA→LoRA conversion on save), ``balora merge``,
     ``balora eval gsm8k --protocol authors`` on the fixed test subset, then drift (KL and NLL on the untuned model's
     own general answers) and the chat-format check, in-process;
  3. report: results.json, results.md, drift_vs_accuracy.png under ``--out``.
The untuned model goes through the same evaluation once. Everything runs offline on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a clone: lab/ (statistics) is not installed
    sys.path.insert(0, str(REPO))

DESIGN_VERSION = "real-lm-v1"
SPLIT_SEED = 2026  # the one permutation of GSM8K train (validation | pool) and of GSM8K test (the fixed subset)
MODEL = "smollm2-135m-instruct"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "balora_real_lm")
DEFAULT_OUT = str(REPO / "benchmarks" / "results" / "real_lm")


@dataclass(frozen=True)
class Arm:
    label: str
    init: str | bool  # peft's init_lora_weights
    lambdas: tuple[float, float, float]
    balora: tuple[tuple[str, object], ...] = ()


ARMS = {
    "pissa": Arm("PiSSA", "pissa_niter_4", (0.0, 0.0, 0.0)),
    "ba_paper": Arm("BA-LoRA (paper λ)", "pissa_niter_4", (1e-4, 3e-4, 1e-4)),
    "ba_anchored": Arm("BA-LoRA λ1=0.1", "pissa_niter_4", (0.1, 0.02, 0.02)),
    "lora": Arm("LoRA", True, (0.0, 0.0, 0.0)),
    "kl_budget": Arm("BA-LoRA paper λ, KL budget 0.01", "pissa_niter_4", (1e-4, 3e-4, 1e-4),
                     (("kl_horizon", 10.0), ("kl_target", 0.01))),
}
HYPOTHESES = {"H1": ("ba_anchored", "pissa", "drift_kl"), "H2a": ("ba_paper", "pissa", "accuracy"),
              "H2b": ("ba_anchored", "pissa", "accuracy")}


@dataclass(frozen=True)
class Design:
    steps: int = 60
    batch: int = 8
    max_length: int = 256
    train_rows: int = 480
    val_rows: int = 256
    lr_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3)
    warmup_steps: int = 3
    rank: int = 8
    alpha: int = 16
    test_n: int = 400
    test_n_extended: int = 600
    extend_above: float = 0.10
    gen_tokens: int = 320
    chat_tokens: int = 256
    mt_questions: int = 80
    gsm_kl_n: int = 80
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    arms: tuple[str, ...] = ("pissa", "ba_paper", "ba_anchored", "lora")
    eval_batch: int = 16

    def key(self, **extra) -> str:
        blob = json.dumps({"v": DESIGN_VERSION, **asdict(self), **extra}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


QUICK = Design(steps=2, batch=2, max_length=192, train_rows=4, val_rows=4, lr_grid=(3e-4,), warmup_steps=0,
               test_n=6, test_n_extended=6, gen_tokens=48, chat_tokens=24, mt_questions=3, gsm_kl_n=3, seeds=(0,),
               arms=("pissa", "ba_anchored"), eval_batch=8)


def log(message: str) -> None:
    print(f"[real_lm {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------

_CALC = re.compile(r"<<[^>]*>>")


def metamath_answer(solution: str) -> str:
    """A GSM8K solution in MetaMathQA's form: calculator annotations removed, "#### N" → "The answer is: N"."""
    body, _, final = _CALC.sub("", solution).rpartition("####")
    return f"{body.rstrip()}\nThe answer is: {final.strip()}"


def alpaca():
    """The registered prompt template (the authors' Alpaca prompt), imported late like the rest of balora_trl."""
    from balora_trl.prompts import ALPACA, PromptTemplate

    return PromptTemplate("alpaca", ALPACA)


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def train_split(rows: list[dict], design: Design) -> tuple[list[dict], list[dict]]:
    """(validation, pool): one seed-2026 permutation of GSM8K train."""
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    return [rows[i] for i in order[:design.val_rows]], [rows[i] for i in order[design.val_rows:]]


def test_subset(rows: list[dict], n: int) -> list[dict]:
    """The first n problems of a seed-2026 permutation of GSM8K test (ids = positions in the shipped file)."""
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    return [{"id": str(i), **rows[i]} for i in order[:n]]


def to_pc(rows: list[dict], template) -> list[dict]:
    return [{"prompt": template.render(r["question"]), "completion": " " + metamath_answer(r["answer"])} for r in rows]


def fitting(rows: list[dict], tokenizer, template, max_length: int) -> list[dict]:
    """The rows whose prompt + completion + EOS fit in ``max_length`` tokens (longer ones are skipped)."""
    out = []
    for row, pc in zip(rows, to_pc(rows, template)):
        n = len(tokenizer(pc["prompt"] + pc["completion"])["input_ids"]) + 1
        if n <= max_length:
            out.append(row)
    return out


def training_rows(pool: list[dict], seed: int, design: Design, tokenizer, template) -> list[dict]:
    order = list(pool)
    random.Random(seed).shuffle(order)
    chosen = []
    for start in range(0, len(order), 4 * design.train_rows):
        chosen += fitting(order[start:start + 4 * design.train_rows], tokenizer, template, design.max_length)
        if len(chosen) >= design.train_rows:
            break
    return chosen[:design.train_rows]


# ----------------------------------------------------------------------------------------------------------------
# training (in-process, the Python API a user calls) and evaluation (the CLIs a user runs)
# ----------------------------------------------------------------------------------------------------------------


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + f".tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_json(path: Path, data) -> None:
    _atomic_text(path, json.dumps(data, indent=2, default=str))


def train(model_dir: str, arm: Arm, lr: float, seed: int, rows: list[dict], val: list[dict] | None, design: Design,
          out: Path) -> dict:
    """One fine-tuning run; writes the converted adapter to ``out/adapter`` and returns its metrics."""
    from datasets import Dataset
    from peft import LoraConfig

    from balora_trl import BALoraConfig, BALoraSFTTrainer

    template = alpaca()
    work = out / f"train.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    args = BALoraConfig(
        str(work), max_steps=design.steps, per_device_train_batch_size=design.batch, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=design.warmup_steps, weight_decay=0.0, seed=seed, data_seed=seed,
        bf16=False, fp16=False, gradient_checkpointing=False, max_length=design.max_length, completion_only_loss=True,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        per_device_eval_batch_size=design.batch, lambda_consistency=arm.lambdas[0], lambda_diversity=arm.lambdas[1],
        lambda_svd=arm.lambdas[2], **dict(arm.balora))
    peft_config = LoraConfig(r=design.rank, lora_alpha=design.alpha, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=arm.init, task_type="CAUSAL_LM")
    trainer = BALoraSFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(to_pc(rows, template)),
                               eval_dataset=None if val is None else Dataset.from_list(to_pc(val, template)),
                               peft_config=peft_config)
    trainer.prompt_template = template
    start = time.time()
    result = trainer.train()
    seconds = time.time() - start
    metrics = {"train_seconds": seconds, "train_loss": result.training_loss, "log_history": trainer.state.log_history}
    if val is not None:
        metrics["val_loss"] = trainer.evaluate()["eval_loss"]
    adapter = work / "adapter"
    trainer.save_model(str(adapter))
    template.save(str(adapter))
    del trainer
    final = out / "adapter"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(adapter, final)
    shutil.rmtree(work, ignore_errors=True)
    return metrics


def exit_on_sigterm() -> None:
    """Turn SIGTERM (``kill <worker>``) into SystemExit, so that ``subprocess.run`` kills the running child
    (``python -m eval``, ``balora merge``) and ``balora_trl.claims.share`` releases the claim on the way out. Without
    it the child outlives its worker, the dead worker's claim is handed to another worker, and both write one answer
    file (the harness now also refuses a second writer of one output folder)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def run(cmd: list[str]) -> None:
    log(" ".join(cmd))
    subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def merge(adapter: Path, model_dir: str, out: Path) -> None:
    run([sys.executable, "-m", "balora_trl.cli", "merge", "--adapter", str(adapter), "--base", model_dir,
         "--out", str(out), "--dtype", "fp32", "--force"])


def eval_gsm8k(model: str, subset_file: Path, out: Path, design: Design) -> list[dict]:
    # The pre-registered prompt and stops are the harness's `authors_inference` protocol (gsm8k_inference.py); the
    # pre-registered scoring is the exact rule (test_acc.py), which every record also carries (`by_protocol`).
    run([sys.executable, "-m", "eval", "gsm8k", "--model", model, "--protocol", "authors_inference", "--backend",
         "transformers", "--dtype", "float32", "--max_new_tokens", str(design.gen_tokens), "--data_file",
         str(subset_file), "--output_dir", str(out), "--batch_size", str(design.eval_batch)])
    return read_jsonl(out / "gsm8k.jsonl")


def untuned_view(model_dir: str, root: Path) -> str:
    """The untuned model prompted like the tuned ones: its files linked beside an Alpaca prompt_template.json."""
    view = root / "untuned_alpaca"
    if not (view / "prompt_template.json").exists():
        view.mkdir(parents=True, exist_ok=True)
        for name in os.listdir(model_dir):
            if name != "prompt_template.json" and not (view / name).exists():
                os.symlink(os.path.join(os.path.abspath(model_dir), name), view / name)
        alpaca().save(str(view))
    return str(view)


# ----------------------------------------------------------------------------------------------------------------
# drift: KL(untuned ‖ tuned) and NLL on the untuned model's own answers (teacher forcing, float32)
# ----------------------------------------------------------------------------------------------------------------


def load_lm(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int, batch: int = 8,
           stop: tuple[str, ...] = ()) -> list[list[int]]:
    """Greedy continuations (token ids, the end-of-turn token kept when generated) of text prompts, cut before the
    token that completes the first ``stop`` string (as the harness cuts its text). The harness's decoding loop
    (``eval.decoding``: generate's tokens, finished rows leaving the batch), which returns token ids."""
    from eval.decoding import greedy_decode

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    outs = greedy_decode(model, tokenizer, encoded, max_new_tokens, {tokenizer.eos_token_id}, stop=stop,
                         batch_size=batch)
    return [cut_at_stop(tokenizer, ids, stop) if stop else ids for ids in outs]


def cut_at_stop(tokenizer, ids: list[int], stop: tuple[str, ...]) -> list[int]:
    """The longest prefix of ``ids`` whose text stays within the text before the first stop string."""
    from eval.backends import truncate_at_stop

    kept = len(truncate_at_stop(tokenizer.decode(ids), stop))
    k = len(ids)
    while k and len(tokenizer.decode(ids[:k])) > kept:
        k -= 1
    return ids[:k]


def chat_prompts(tokenizer, questions: list[str]) -> list[str]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                          add_generation_prompt=True) for q in questions]


def answer_terms(untuned, tuned, tokenizer, prompts: list[str], answers: list[list[int]]) -> dict:
    """Token-weighted KL(untuned ‖ tuned) and both models' NLL over every answer token."""
    import torch

    from balora_trl import losses

    kl = nll_tuned = nll_untuned = 0.0
    tokens = 0
    for prompt, answer in zip(prompts, answers):
        if not answer:
            continue
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + answer])
        labels = torch.tensor(answer)
        with torch.no_grad():
            ref = untuned(ids).logits[0, len(p) - 1:-1]
            new = tuned(ids).logits[0, len(p) - 1:-1]
        kl += losses.token_kl(ref, new).sum().item()
        nll_tuned += losses.token_nll(new, labels).sum().item()
        nll_untuned += losses.token_nll(ref, labels).sum().item()
        tokens += len(answer)
    return {"kl": kl / tokens, "nll": nll_tuned / tokens, "nll_untuned": nll_untuned / tokens, "tokens": tokens}


def format_kept(tokenizer, answers: list[list[int]]) -> dict:
    """Chat format kept: the answer ends with the end-of-turn token and holds no Alpaca header."""
    kept = leaked = 0
    for ids in answers:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        ended = bool(ids) and ids[-1] == tokenizer.eos_token_id
        kept += ended and "### Instruction" not in text and "### Response" not in text
        leaked += "The answer is" in text
    n = max(len(answers), 1)
    return {"format_kept": kept / n, "answer_is_leak": leaked / n}


# ----------------------------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    design: Design
    model_dir: str
    root: Path
    tokenizer: object
    val: list[dict]
    pool: list[dict]
    test_rows: list[dict]
    mt_questions: list[str]
    subset_n: int = 0
    probes: dict = field(default_factory=dict)
    records: Path | None = None  # the results folder's copy of every finished measurement (sync_records)

    def keep(self) -> None:
        if self.records is not None:
            sync_records(self.root, self.records)


def slices(ctx: Context, n: int) -> list[tuple[int, int]]:
    """The parts of the fixed permutation's first ``n`` problems, cut at the registered sizes (400 | 600 | all), so
    that a larger subset adds only its new problems to what was already generated."""
    d = ctx.design
    edges = sorted({0, n} | {e for e in (d.test_n, d.test_n_extended, len(ctx.test_rows)) if e < n})
    return list(zip(edges, edges[1:]))


def subset_file(ctx: Context, start: int, stop: int) -> Path:
    path = ctx.root / f"gsm8k_test_{start}-{stop}.jsonl"
    if not path.exists():
        rows = test_subset(ctx.test_rows, stop)[start:]
        _atomic_text(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def untuned_probes(ctx: Context) -> dict:
    """The untuned model's greedy answers (token ids): MT-Bench first turns (chat) and GSM8K problems (authors')."""
    from eval.tasks.gsm8k import GSM8K

    path = ctx.root / "untuned_probes.json"
    if path.exists():
        return json.loads(path.read_text())
    d = ctx.design
    model = load_lm(ctx.model_dir)
    chat = chat_prompts(ctx.tokenizer, ctx.mt_questions)
    protocol = GSM8K.protocols["authors_inference"]  # the registered prompt suffix and stop strings
    gsm = [alpaca().render(r["question"]) + protocol["prompt_suffix"] for r in test_subset(ctx.test_rows, d.gsm_kl_n)]
    log(f"untuned answers: {len(chat)} MT-Bench first turns, {len(gsm)} GSM8K problems")
    probes = {"chat_prompts": chat, "chat_answers": greedy(model, ctx.tokenizer, chat, d.chat_tokens),
              "gsm_prompts": gsm,
              "gsm_answers": greedy(model, ctx.tokenizer, gsm, d.gen_tokens, stop=tuple(protocol["stop"]))}
    _atomic_json(path, probes)
    return probes


def gsm8k_accuracy(ctx: Context, model_path: str, cell: Path, n: int, untuned: bool = False) -> dict:
    """GSM8K (authors' protocol) on the first ``n`` problems of the fixed permutation; each slice cached."""
    path = cell / f"gsm8k_{n}.json"
    if path.exists():
        return json.loads(path.read_text())
    d = ctx.design
    correct, cut = {}, 0
    for start, stop in slices(ctx, n):
        part = cell / f"gsm8k_{start}-{stop}.json"
        if not part.exists():
            records = eval_gsm8k(untuned_view(ctx.model_dir, ctx.root) if untuned else model_path,
                                 subset_file(ctx, start, stop), cell / f"gsm8k_{start}-{stop}", d)
            records = list({r["id"]: r for r in records}.values())  # one per problem, should a file hold repeats
            # cut: the answer used the whole budget (its re-tokenised length reaches the cap, one token of slack)
            _atomic_json(part, {
                "correct": {str(r["id"]): bool(r["by_protocol"]["authors"]["correct"]) for r in records},
                "cut_by_limit": sum(len(ctx.tokenizer(r["generation"], add_special_tokens=False)["input_ids"])
                                    >= d.gen_tokens - 1 for r in records)})
        done = json.loads(part.read_text())
        correct.update(done["correct"])
        cut += done["cut_by_limit"]
    result = {"accuracy": sum(correct.values()) / len(correct), "correct": correct, "cut_by_limit": cut,
              "n": len(correct)}
    _atomic_json(path, result)
    return result


def drift(ctx: Context, model_path: str, cell: Path) -> dict:
    """KL and NLL on the untuned model's own answers, and the tuned model's own chat answers' format; cached."""
    path = cell / "drift.json"
    if path.exists():
        return json.loads(path.read_text())
    d, probes = ctx.design, ctx.probes
    reference, tuned = load_lm(ctx.model_dir), load_lm(model_path)
    general = answer_terms(reference, tuned, ctx.tokenizer, probes["chat_prompts"], probes["chat_answers"])
    math_terms = answer_terms(reference, tuned, ctx.tokenizer, probes["gsm_prompts"], probes["gsm_answers"])
    own = greedy(tuned, ctx.tokenizer, probes["chat_prompts"], d.chat_tokens)
    result = dict(drift_kl=general["kl"], retention_nll=general["nll"], untuned_nll=general["nll_untuned"],
                  gsm_kl=math_terms["kl"], **format_kept(ctx.tokenizer, own))
    _atomic_json(path, result)
    return result


def measure_untuned(ctx: Context, n: int) -> dict:
    return {**gsm8k_accuracy(ctx, ctx.model_dir, ctx.root / "untuned", n, untuned=True), "drift_kl": 0.0,
            "gsm_kl": 0.0, **format_kept(ctx.tokenizer, ctx.probes["chat_answers"])}


def term_magnitudes(history: list[dict], lambdas: tuple[float, float, float]) -> dict:
    """Mean over logged steps of the SFT loss and λ1·KL, λ2·(−H), λ3·(−SVD share) (the trainer's logged terms)."""
    rows = [h for h in history if "ba_lora/sft_loss" in h]
    if not rows:
        return {}
    mean = lambda key: sum(h.get(key, 0.0) for h in rows) / len(rows)  # noqa: E731
    return {"sft_loss": mean("ba_lora/sft_loss"), "l1_kl": lambdas[0] * mean("ba_lora/kl"),
            "l2_neg_entropy": -lambdas[1] * mean("ba_lora/entropy"),
            "l3_neg_svd": -lambdas[2] * mean("ba_lora/svd_ratio")}


def cell_folder(ctx: Context, arm_name: str, lr: float, seed: int) -> Path:
    return ctx.root / f"{arm_name}_lr{lr:g}_s{seed}"


def trained(ctx: Context, arm_name: str, lr: float, seed: int, with_val: bool = False) -> bool:
    path = cell_folder(ctx, arm_name, lr, seed) / "train.json"
    return path.exists() and (not with_val or "val_loss" in json.loads(path.read_text()))


def measured(ctx: Context, folder: Path) -> bool:
    return (folder / f"gsm8k_{ctx.subset_n}.json").exists() and (folder / "drift.json").exists()


def shared(ctx: Context, tasks: list[tuple[str, object, object]]) -> None:
    """Run ``(name, done(), do())`` tasks through claim files in the cache root (balora_trl.claims): the same command
    started again (``--threads 1`` twice on 2 cores) takes the tasks this one has not claimed."""
    from balora_trl import claims

    claims.share([(ctx.root / f"{name}.claim", done, do) for name, done, do in tasks])


def cell(ctx: Context, arm_name: str, lr: float, seed: int, with_val: bool = False) -> dict:
    """One (arm, learning rate, seed): train (cached), then measure on the current subset (cached)."""
    arm = ARMS[arm_name]
    d = ctx.design
    folder = cell_folder(ctx, arm_name, lr, seed)
    folder.mkdir(parents=True, exist_ok=True)
    train_json = folder / "train.json"
    if not trained(ctx, arm_name, lr, seed, with_val):
        rows = training_rows(ctx.pool, seed, d, ctx.tokenizer, alpaca())
        log(f"train {arm_name} lr={lr:g} seed={seed} ({len(rows)} rows, {d.steps} steps)")
        metrics = train(ctx.model_dir, arm, lr, seed, rows, ctx.val if with_val else None, d, folder)
        metrics["terms"] = term_magnitudes(metrics["log_history"], arm.lambdas)
        _atomic_json(train_json, metrics)
        ctx.keep()
    metrics = json.loads(train_json.read_text())
    return {"arm": arm_name, "lr": lr, "seed": seed, "folder": str(folder), **metrics}


def merged_model(ctx: Context, info: dict) -> str:
    folder = Path(info["folder"])
    merged = folder / "merged"
    if not (merged / "config.json").exists():
        if not (folder / "adapter").is_dir():  # measurements restored from the results folder, weights not: retrain
            log(f"{folder.name}: no adapter in this cache, training it again (same seed, same weights)")
            (folder / "train.json").unlink()
            cell(ctx, info["arm"], info["lr"], info["seed"])
        merge(folder / "adapter", ctx.model_dir, merged)
    return str(merged)


def evaluate_cell(ctx: Context, info: dict) -> dict:
    """Accuracy on the current subset and drift of one trained cell (merged once; cached)."""
    folder = Path(info["folder"])
    if not measured(ctx, folder):
        log(f"measure {folder.name} on {ctx.subset_n} problems")
        merged = merged_model(ctx, info)
        return {**gsm8k_accuracy(ctx, merged, folder, ctx.subset_n), **drift(ctx, merged, folder)}
    return {**json.loads((folder / f"gsm8k_{ctx.subset_n}.json").read_text()),
            **json.loads((folder / "drift.json").read_text())}


def measure_all(ctx: Context, cells: list[tuple[str, int, Path]], lr: float) -> None:
    """The untuned model and every ``(arm, seed, folder)`` cell (trained, then measured, before the next starts, so
    that an interrupted run leaves complete cells) on the current subset; a second worker takes the tasks this one
    has not claimed."""
    n = ctx.subset_n
    shared(ctx, [(f"untuned_gsm8k_{n}", (ctx.root / "untuned" / f"gsm8k_{n}.json").exists,
                  lambda: measure_untuned(ctx, n))] +
           [(folder.name, lambda folder=folder: measured(ctx, folder),
             lambda arm=arm, seed=seed: (evaluate_cell(ctx, cell(ctx, arm, lr, seed)), ctx.keep()))
            for arm, seed, folder in cells])


def choose_lr(ctx: Context) -> tuple[float, list[dict]]:
    """PiSSA at seed 0 over the grid; lowest validation loss; one more point past an end of the grid (once)."""
    def runs_at(rates: list[float]) -> list[dict]:
        shared(ctx, [(f"pissa_lr{lr:g}_s0", lambda lr=lr: trained(ctx, "pissa", lr, 0, with_val=True),
                      lambda lr=lr: cell(ctx, "pissa", lr, 0, with_val=True)) for lr in rates])
        return [cell(ctx, "pissa", lr, 0, with_val=True) for lr in rates]  # cached now

    grid = list(ctx.design.lr_grid)
    runs = runs_at(grid)
    best = min(runs, key=lambda r: r["val_loss"])
    if len(grid) > 1 and best["lr"] in (grid[0], grid[-1]):
        beyond = best["lr"] / math.sqrt(10) if best["lr"] == grid[0] else best["lr"] * math.sqrt(10)
        beyond = float(f"{beyond:.3g}")
        runs += runs_at([beyond])
        best = min(runs, key=lambda r: r["val_loss"])
    return best["lr"], [{"lr": r["lr"], "val_loss": r["val_loss"]} for r in runs]


# ----------------------------------------------------------------------------------------------------------------
# statistics and report
# ----------------------------------------------------------------------------------------------------------------


def bootstrap_problems(a: dict[int, dict], b: dict[int, dict], resamples: int = 10_000) -> dict:
    """Paired by problem: the per-problem difference (a − b, correct ∈ {0, 1}) averaged over the seeds both have,
    resampled over problems (percentile interval, seed 0)."""
    import numpy as np

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    ids = sorted(set.intersection(*(set(a[s]) & set(b[s]) for s in seeds)))
    diff = np.array([[a[s][i] - b[s][i] for i in ids] for s in seeds], dtype=float).mean(axis=0)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    return {"mean": float(diff.mean()), "lo": float(np.percentile(means, 2.5)),
            "hi": float(np.percentile(means, 97.5)), "n": len(ids)}


def summarize(cells: list[dict], untuned: dict, lr: float, lr_runs: list[dict], design: Design,
              subset_n: int) -> dict:
    from lab.stats import mean_ci, paired_ci

    metrics = ("accuracy", "drift_kl", "retention_nll", "gsm_kl", "format_kept", "answer_is_leak", "cut_by_limit",
               "train_seconds")
    by_arm: dict[str, dict[int, dict]] = {}
    for c in cells:
        by_arm.setdefault(c["arm"], {})[c["seed"]] = c
    arms = {}
    for name, seeds in by_arm.items():
        arms[name] = {"label": ARMS[name].label, "seeds": sorted(seeds),
                      **{m: mean_ci([seeds[s][m] for s in seeds if m in seeds[s]]) for m in metrics}}
        terms = [seeds[s]["terms"] for s in seeds if seeds[s].get("terms")]
        if terms and any(ARMS[name].lambdas):
            arms[name]["terms"] = {k: sum(t[k] for t in terms) / len(terms) for k in terms[0]}
        if name != "pissa" and "pissa" in by_arm:
            base = by_arm["pissa"]
            arms[name]["vs_pissa"] = {m: paired_ci({s: seeds[s][m] for s in seeds if m in seeds[s]},
                                                   {s: base[s][m] for s in base if m in base[s]})
                                      for m in metrics if m != "cut_by_limit"}
            arms[name]["vs_pissa"]["accuracy_by_problem"] = bootstrap_problems(
                {s: {i: int(v) for i, v in seeds[s]["correct"].items()} for s in seeds},
                {s: {i: int(v) for i, v in base[s]["correct"].items()} for s in base})
    tests = {}
    for name, (arm, ref, metric) in HYPOTHESES.items():
        if arm in arms and "vs_pissa" in arms[arm]:
            ci = arms[arm]["vs_pissa"][metric]
            below = name == "H1"
            if not math.isfinite(ci["lo"]):
                verdict = "not enough seeds"
            elif (ci["hi"] < 0) if below else (ci["lo"] > 0):
                verdict = "supported"
            elif (ci["lo"] > 0) if below else (ci["hi"] < 0):
                verdict = "the opposite"
            else:
                verdict = "no difference shown"
            tests[name] = {"arm": arm, "vs": ref, "metric": metric, **ci, "verdict": verdict}
    return {"design": asdict(design), "design_version": DESIGN_VERSION, "lr": lr, "lr_runs": lr_runs,
            "subset_n": subset_n, "untuned": {**{k: v for k, v in untuned.items() if k != "correct"},
                                              # its NLL of its own answers (every cell has it): retention's baseline
                                              "retention_nll": next((c["untuned_nll"] for c in cells
                                                                     if "untuned_nll" in c), float("nan"))},
            "arms": arms, "tests": tests}


def _fmt(ci: dict, digits: int = 1, scale: float = 1.0) -> str:
    if not ci or not math.isfinite(ci.get("mean", float("nan"))):
        return "–"
    text = f"{ci['mean'] * scale:.{digits}f}"
    if math.isfinite(ci.get("lo", float("nan"))):
        text += f" [{ci['lo'] * scale:.{digits}f}, {ci['hi'] * scale:.{digits}f}]"
    return text


def write_report(summary: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _atomic_json(out / "results.json", summary)
    u = summary["untuned"]
    lines = [f"# SmolLM2-135M-Instruct on GSM8K: PiSSA vs BA-LoRA ({summary['design_version']})", "",
             f"Learning rate {summary['lr']:g} (PiSSA, seed 0, validation loss: "
             + ", ".join(f"{r['lr']:g} → {r['val_loss']:.4f}" for r in summary["lr_runs"]) + ").",
             f"GSM8K: the authors' protocol on {summary['subset_n']} test problems, {summary['design']['gen_tokens']} "
             "new tokens at most. Mean over seeds with 95 % t-intervals.", "",
             "| Arm | seeds | GSM8K acc. % | cut by limit | drift KL (general) | retention NLL | KL (GSM8K) | "
             "chat format kept % | 'The answer is' in chat % |", "|---|---|---|---|---|---|---|---|---|",
             f"| untuned | – | {100 * u['accuracy']:.1f} | {u['cut_by_limit']} | 0 | {u['retention_nll']:.3f} | 0 | "
             f"{100 * u['format_kept']:.1f} | {100 * u['answer_is_leak']:.1f} |"]
    for name, a in summary["arms"].items():
        lines.append(f"| {a['label']} | {len(a['seeds'])} | {_fmt(a['accuracy'], 1, 100)} | "
                     f"{_fmt(a['cut_by_limit'], 1)} | {_fmt(a['drift_kl'], 4)} | {_fmt(a['retention_nll'], 3)} | "
                     f"{_fmt(a['gsm_kl'], 4)} | {_fmt(a['format_kept'], 1, 100)} | "
                     f"{_fmt(a['answer_is_leak'], 1, 100)} |")
    lines += ["", "Paired differences to PiSSA (same seed = same data order and SVD):", "",
              "| Arm | Δ acc. % (by seed) | Δ acc. % (by problem) | Δ drift KL | Δ retention NLL | Δ KL (GSM8K) | "
              "Δ format kept % |", "|---|---|---|---|---|---|---|"]
    for name, a in summary["arms"].items():
        v = a.get("vs_pissa")
        if v:
            lines.append(f"| {a['label']} | {_fmt(v['accuracy'], 1, 100)} | {_fmt(v['accuracy_by_problem'], 1, 100)} "
                         f"| {_fmt(v['drift_kl'], 4)} | {_fmt(v['retention_nll'], 3)} | {_fmt(v['gsm_kl'], 4)} | "
                         f"{_fmt(v['format_kept'], 1, 100)} |")
    lines += ["", "Tests (pre-registered):", ""]
    for name, t in summary["tests"].items():
        lines.append(f"- {name}: {ARMS[t['arm']].label} − PiSSA, {t['metric']}: {_fmt(t, 4)} → {t['verdict']}")
    for name, a in summary["arms"].items():
        if a.get("terms"):
            t = a["terms"]
            lines.append(f"- loss terms, {a['label']} (mean over logged steps): SFT {t['sft_loss']:.4f}, "
                         f"λ1·KL {t['l1_kl']:.2e}, λ2·(−H) {t['l2_neg_entropy']:.2e}, λ3·(−SVD) {t['l3_neg_svd']:.2e}")
    if summary.get("full_test"):
        f = summary["full_test"]
        lines.append(f"- all {f['n']} GSM8K test problems (seed 0): "
                     + ", ".join(f"{k} {100 * v:.1f} %" for k, v in f.items() if k != "n"))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    figure(summary, out / "drift_vs_accuracy.png")


def figure(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    u = summary["untuned"]
    ax.scatter([100 * u["accuracy"]], [0.0], marker="*", s=160, color="black", label="untuned", zorder=3)
    for name, a in summary["arms"].items():
        acc, kl = a["accuracy"], a["drift_kl"]
        err = lambda ci, s=1.0: ([[s * (ci["mean"] - ci["lo"])], [s * (ci["hi"] - ci["mean"])]]  # noqa: E731
                                 if math.isfinite(ci.get("lo", float("nan"))) else None)
        ax.errorbar([100 * acc["mean"]], [kl["mean"]], xerr=err(acc, 100), yerr=err(kl), fmt="o", capsize=3,
                    label=a["label"])
    ax.set_xlabel(f"GSM8K accuracy % (authors' protocol, {summary['subset_n']} problems)")
    ax.set_ylabel("drift: KL(untuned ‖ tuned) per token\non the untuned model's general answers")
    ax.set_title("SmolLM2-135M-Instruct, 95 % intervals over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test of every stage (minutes)")
    p.add_argument("--model", default=MODEL, help="a .gguf file, the installed SmolLM2's short name, or a folder")
    p.add_argument("--train_file", help="GSM8K train .jsonl (default: the shipped split)")
    p.add_argument("--cache_dir", default=DEFAULT_CACHE)
    p.add_argument("--out", help=f"results folder (default {DEFAULT_OUT}; --quick: <cache>/quick_results)")
    p.add_argument("--arms", nargs="+", choices=sorted(ARMS), help="default: the design's arms")
    p.add_argument("--seeds", nargs="+", type=int, help="default: the design's seeds (0-4); 10-19 are reserved")
    p.add_argument("--report_only", action="store_true", help="no new run: report the finished cells")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--full_test", choices=sorted(ARMS), metavar="ARM",
                   help="also score the untuned model and ARM's first seed on all 1,319 GSM8K test problems")
    args = p.parse_args(argv)
    exit_on_sigterm()
    if args.seeds and any(10 <= s <= 19 for s in args.seeds):
        p.error("seeds 10-19 are reserved for an independent check (README, pre-registration)")
    design = QUICK if args.quick else Design()
    if args.arms or args.seeds:
        design = replace(design, arms=tuple(args.arms or design.arms), seeds=tuple(args.seeds or design.seeds))

    import torch
    from transformers import AutoTokenizer

    from balora_trl.gguf_models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    train_file = args.train_file or str(REPO / "balora_trl" / "data" / "gsm8k_train.jsonl")
    key_design = replace(design, arms=(), seeds=())  # adding arms or seeds keeps the finished cells
    root = Path(args.cache_dir) / f"{'quick' if args.quick else 'full'}_{design_key(key_design, model_dir, train_file)}"
    root.mkdir(parents=True, exist_ok=True)
    log(f"cache {root}")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    val, pool = train_split(read_jsonl(train_file), design)
    from eval.benchmark_rows import packaged

    test_rows = read_jsonl(packaged("gsm8k_test.jsonl"))
    mt = [json.loads(line)["turns"][0] for line in open(packaged("mt_bench_question.jsonl")) if line.strip()]
    ctx = Context(design, model_dir, root, tokenizer, val, pool, test_rows, mt[:design.mt_questions],
                  subset_n=design.test_n)
    out = Path(args.out or (root / "quick_results" if args.quick else DEFAULT_OUT))
    records = out / "cells" / root.name
    restored = sync_records(records, root)
    if restored:
        log(f"restored {restored} finished measurements from {records}")
    ctx.records = records
    if not args.report_only:
        shared(ctx, [("untuned_probes", (root / "untuned_probes.json").exists, lambda: untuned_probes(ctx))])
    ctx.probes = untuned_probes(ctx)
    ctx.keep()

    lr, lr_runs = choose_lr(ctx)
    log(f"learning rate {lr:g}: " + ", ".join(f"{r['lr']:g} → {r['val_loss']:.4f}" for r in lr_runs))
    order = [(arm, seed) for seed in design.seeds for arm in design.arms if arm in ("pissa", "ba_paper",
             "ba_anchored")] + [(arm, seed) for arm in design.arms if arm not in ("pissa", "ba_paper", "ba_anchored")
                                for seed in design.seeds]
    cells = [(arm, seed, cell_folder(ctx, arm, lr, seed)) for arm, seed in order]

    def collect() -> tuple[dict, list[dict]]:
        done = [(arm, seed) for arm, seed, folder in cells if not args.report_only or measured(ctx, folder)]
        return measure_untuned(ctx, ctx.subset_n), [{**info, **evaluate_cell(ctx, info)} for info in
                                                    (cell(ctx, arm, lr, seed) for arm, seed in done)]

    if not args.report_only:
        measure_all(ctx, cells, lr)
    untuned, results = collect()
    if results and max(r["accuracy"] for r in results) > design.extend_above and design.test_n_extended > ctx.subset_n:
        ctx.subset_n = design.test_n_extended  # pre-registered: every arm on the larger subset before any comparison
        log(f"an arm is above {design.extend_above:.0%}: every cell measured on {ctx.subset_n} problems")
        if not args.report_only:
            measure_all(ctx, cells, lr)
        untuned, results = collect()
    summary = summarize(results, untuned, lr, lr_runs, design, ctx.subset_n)
    if args.full_test:  # the untuned model and the recommended arm (seed 0) on all 1,319 problems
        n = len(test_rows)
        arm_cell = cell(ctx, args.full_test, lr, design.seeds[0])
        folder = Path(arm_cell["folder"])
        shared(ctx, [(f"untuned_gsm8k_{n}", (root / "untuned" / f"gsm8k_{n}.json").exists,
                      lambda: measure_untuned(ctx, n)),
                     (f"{folder.name}_gsm8k_{n}", (folder / f"gsm8k_{n}.json").exists,
                      lambda: gsm8k_accuracy(ctx, merged_model(ctx, arm_cell), folder, n))])
        summary["full_test"] = {"n": n, "untuned": measure_untuned(ctx, n)["accuracy"],
                                args.full_test: json.loads((folder / f"gsm8k_{n}.json").read_text())["accuracy"]}
    ctx.keep()
    write_report(summary, out)
    log(f"results in {out}")
    print((out / "results.md").read_text())
    return 0


def sync_records(src: Path, dst: Path) -> int:
    """Copy the experiment's measurements (the JSON files of the cache root and of each cell: probes, training
    metrics, GSM8K scores, drift) from ``src`` to ``dst`` where ``dst`` lacks them or holds another version; returns
    how many were copied.
    The results folder keeps them beside the report, so a clone on another machine resumes with every finished cell
    (only adapters and merged models, which are large, stay in the cache)."""
    copied = 0
    if not src.is_dir():
        return 0
    measurements = [src / "untuned_probes.json"] + [p for pattern in ("*/train.json", "*/drift.json", "*/gsm8k_*.json")
                                                    for p in sorted(src.glob(pattern))]
    for path in measurements:
        if not path.is_file() or ".tmp-" in path.name:
            continue
        target = dst / path.relative_to(src)
        text = path.read_text()
        if not target.exists() or target.read_text() != text:
            target.parent.mkdir(parents=True, exist_ok=True)
            _atomic_text(target, text)
            copied += 1
    return copied


def design_key(design: Design, model_dir: str, train_file: str) -> str:
    """The cache key: the design and a fingerprint of the model's and the data's files (size + name)."""
    files = sorted((p.name, p.stat().st_size) for p in Path(model_dir).iterdir() if p.is_file())
    return design.key(model=files, train=(Path(train_file).name, Path(train_file).stat().st_size))


if __name__ == "__main__":
    sys.exit(main())
