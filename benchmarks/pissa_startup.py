"""Start-up cost of PiSSA: computed at start-up (on the fly) vs pre-initialised (`balora pissa-init`).

    python benchmarks/pissa_startup.py                               # ~220M-parameter Llama (CPU: a few minutes)
    python benchmarks/pissa_startup.py --hidden 768 --layers 12      # ~135M
    python benchmarks/pissa_startup.py --rounds 2 --json pissa_startup.json

A Llama-shaped model with random weights is built from a config and saved (float32, untimed). Then, each in its own
fresh subprocess and interleaved over ``--rounds``:

  (f) on the fly: ``balora_trl.sft`` from the original model with ``init_lora_weights: pissa_niter_N`` — PEFT runs
      the randomised SVD of every targeted weight while the trainer is built;
  (p) pre-initialised: ``balora_trl.sft`` from the `balora pissa-init` folder (residual + pissa_init/ adapter):
      no SVD; the adapter is read from disk.

Measured per run, from just before the trainer is built (imports done) to the end of the first optimizer step:
wall time, and the process's peak resident set (``ru_maxrss``; "Δ" is that peak minus the resident memory before
building, i.e. what loading, initialising and one step needed). The one-off `balora pissa-init` (same init, same r) is
timed too, in its own subprocess. On one machine without sharding, the difference is the SVD time and its float32
work space; the larger gain — loading sharded under ZeRO-3 ``zero3_init_flag`` / FSDP ``cpu_ram_efficient_loading``,
which on-the-fly PiSSA cannot use — needs several GPUs and is not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def build(folder: str, hidden: int, layers: int, vocab: int) -> int:
    """The original model (float32, random weights) and a tokenizer, saved to ``folder``; returns its size."""
    import torch

    from balora_trl.dataset_formats import SAMPLE_PATH, load_dataset_any
    from balora_trl.local_models import causal_lm_config, train_tokenizer
    from balora_trl.prompts import DEFAULT
    from transformers import AutoModelForCausalLM

    rows = load_dataset_any(str(SAMPLE_PATH)).select(range(400))
    tokenizer = train_tokenizer([DEFAULT.render(q) + " " + r for q, r in zip(rows["query"], rows["response"])],
                                vocab_size=2048, model_max_length=512)
    config = causal_lm_config("llama", vocab, hidden, layers, max(1, hidden // 64), intermediate_size=int(hidden * 2.75),
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              bos_token_id=tokenizer.eos_token_id, initializer_range=hidden ** -0.5)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def worker(args) -> None:
    """One run of the main job up to the first optimizer step; prints one JSON line."""
    from transformers import TrainerCallback

    from balora_trl.sft import SAMPLE_PATH, build_trainer, parse_args

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    argv = ["--model_name_or_path", args.model, "--dataset_name", str(SAMPLE_PATH), "--output_dir", args.out,
            "--max_train_samples", "16", "--per_device_train_batch_size", "2", "--max_length", "256",
            "--max_steps", "1", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
            "--activation_checkpointing", "false", "--lora_r", str(args.r), "--lora_alpha", str(args.r),
            "--init_lora_weights", args.init, "--dataset_num_proc", "1"]
    script_args, training_args, model_args = parse_args(argv)
    marks = {}

    class FirstStep(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if "step" not in marks:
                marks["step"] = time.perf_counter()
                marks["peak"] = _peak_kib()
                control.should_training_stop = True

    rss0 = _rss_kib()
    t0 = time.perf_counter()
    trainer, _ = build_trainer(script_args, training_args, model_args, callbacks=[FirstStep()])
    t_built = time.perf_counter()
    trainer.train()
    print(json.dumps({"mode": args.worker, "build_s": t_built - t0, "to_first_step_s": marks["step"] - t0,
                      "peak_mib": marks["peak"] / 1024, "delta_mib": (marks["peak"] - rss0) / 1024,
                      "rss_before_mib": rss0 / 1024, "reference": trainer.reference.kind}))


def run(command: list[str]) -> dict:
    result = subprocess.run(command, capture_output=True, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                                     TOKENIZERS_PARALLELISM="false"))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--init", default="pissa_niter_4", help="the same init for both (BA-LoRA's default)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    with tempfile.TemporaryDirectory() as tmp:
        original, pre = os.path.join(tmp, "original"), os.path.join(tmp, "pissa")
        params = build(original, args.hidden, args.layers, args.vocab)
        print(f"model: Llama, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}: {params / 1e6:.0f}M "
              f"parameters (float32); r = {args.r}, init {args.init}, {args.threads} threads", flush=True)
        t0 = time.perf_counter()
        code = (f"import resource, json, torch; torch.set_num_threads({args.threads}); "
                "from balora_trl.pissa_init import pissa_init; "
                f"pissa_init({original!r}, {pre!r}, r={args.r}, lora_alpha={args.r}, init={args.init!r}, progress=False); "
                "print(json.dumps({'peak_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))")
        offline = run([sys.executable, "-c", code])
        offline["wall_s"] = time.perf_counter() - t0
        print(f"balora pissa-init (one-off, subprocess wall incl. imports): {offline['wall_s']:.1f} s, "
              f"peak RSS {offline['peak_mib']:.0f} MiB", flush=True)
        results = {"f": [], "p": []}
        for _ in range(args.rounds):
            for mode, model in (("f", original), ("p", pre)):
                results[mode].append(run([sys.executable, __file__, "--worker", mode, "--model", model,
                                          "--out", os.path.join(tmp, f"run_{mode}"), "--r", str(args.r),
                                          "--init", args.init, "--threads", str(args.threads)]))
                print(json.dumps(results[mode][-1]), flush=True)

    names = {"f": "on the fly (SVD at start-up)", "p": "pre-initialised (pissa-init)"}
    print("\n| start-up to the first optimizer step | wall (s) | of which building the trainer (s) | "
          "peak RSS (MiB) | Δ RSS (MiB) |\n|---|---|---|---|---|")
    for mode in ("f", "p"):
        rows = results[mode]
        med = {k: statistics.median(r[k] for r in rows) for k in ("to_first_step_s", "build_s", "peak_mib", "delta_mib")}
        print(f"| {names[mode]} | {med['to_first_step_s']:.1f} | {med['build_s']:.1f} | {med['peak_mib']:.0f} | "
              f"{med['delta_mib']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "parameters": params, "pissa_init": offline, "runs": results}, f, indent=2)


if __name__ == "__main__":
    main()
