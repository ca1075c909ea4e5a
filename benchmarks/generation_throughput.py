"""Generation throughput of the evaluation backends, in one run.

1. transformers: batched (``--batch_size``) vs one prompt at a time, same prompts, greedy; prints the speed-up ratio
   and checks the two give identical text.
2. transformers, greedy: the backend's loop (``eval.decoding``: a finished row leaves the batch) vs
   ``model.generate`` on whole batches (every row computed until the batch's longest is done), same batches; the
   gain is the share of steps spent on finished rows, so it shows with a real model whose answers end at different
   lengths (``--model``; the random model never ends early).
3. vLLM vs transformers (batched), when vLLM imports and CUDA is present; otherwise says it was skipped.

    python benchmarks/generation_throughput.py                       # tiny random Llama, GSM8K test questions
    python benchmarks/generation_throughput.py --model smollm2-135m-instruct --n 32 --max_new_tokens 320

Without ``--model`` a randomly initialised Llama-shaped model (``--hidden_size``, ``--layers``) with a tokenizer
trained on GSM8K is built offline: the absolute numbers are not those of a 7B model, the batched/sequential ratio
is what the benchmark measures.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from eval.backends import GenerationParams, TransformersBackend, vllm_usable  # noqa: E402
from eval.prompting import PromptFormatter  # noqa: E402


def gsm8k_questions(n: int) -> list[str]:
    """The first ``n`` questions of the GSM8K test split shipped with the harness (eval/data/gsm8k_test.jsonl)."""
    from eval.benchmark_rows import packaged, read_rows

    return [r["question"] for r in read_rows(packaged("gsm8k_test.jsonl"))][:n]


def build_model(directory: str, hidden_size: int, layers: int) -> str:
    from balora_trl.local_models import build_causal_lm, train_tokenizer
    from balora_trl.prompts import DEFAULT

    texts = gsm8k_questions(2000)
    tokenizer = train_tokenizer(texts, vocab_size=2048)
    model = build_causal_lm("llama", tokenizer, hidden_size=hidden_size, num_layers=layers,
                            num_heads=max(4, hidden_size // 64))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    DEFAULT.save(directory)
    return directory


def timed(backend, prompts, params, batch_size: int | None = None) -> tuple[list[str], float, int]:
    before = getattr(backend, "generated_tokens", 0)
    start = time.perf_counter()
    if batch_size == 1:
        outputs = [backend.generate([p], params)[0] for p in prompts]
    else:
        outputs = backend.generate(prompts, params)
    seconds = time.perf_counter() - start
    return outputs, seconds, getattr(backend, "generated_tokens", 0) - before


def whole_batches(backend, prompts, params) -> tuple[list[str], float]:
    """``model.generate`` on the backend's batches (longest prompts first), decoded as the backend decodes."""
    tok = backend.tokenizer
    encoded = [tok(text, add_special_tokens=special)["input_ids"] for text, special in map(backend._render, prompts)]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    eos = backend.model.generation_config.eos_token_id or tok.eos_token_id
    outputs: list[str] = [""] * len(prompts)
    start = time.perf_counter()
    for b in range(0, len(order), backend.batch_size):
        batch = order[b:b + backend.batch_size]
        inputs = tok.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, return_tensors="pt")
        with torch.inference_mode():
            out = backend.model.generate(**inputs, max_new_tokens=params.max_new_tokens, do_sample=False,
                                         eos_token_id=eos, pad_token_id=tok.pad_token_id)
        for i, ids in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist()):
            end = next((j for j, t in enumerate(ids) if t in (eos, tok.pad_token_id)), len(ids))
            outputs[i] = tok.decode(ids[:end], skip_special_tokens=True)
    return outputs, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model or adapter folder, or a .gguf / the installed SmolLM2's short name "
                                   "(default: build a tiny random one)")
    p.add_argument("--n", type=int, default=16, help="prompts")
    p.add_argument("--max_new_tokens", type=int, default=32)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as scratch:
        from balora_trl.gguf_models import resolve_model

        model = resolve_model(args.model) if args.model else build_model(scratch, args.hidden_size, args.layers)
        backend = TransformersBackend(model, batch_size=args.batch_size)
        # Never stop early on EOS for a random model: every prompt then costs max_new_tokens, in both modes.
        if not args.model:
            backend.model.generation_config.eos_token_id = None
        formatter = PromptFormatter.for_model(model, backend.tokenizer)
        prompts = [formatter.build([q]) for q in gsm8k_questions(args.n)]
        params = GenerationParams(max_new_tokens=args.max_new_tokens)
        backend.generate(prompts[:2], params)  # warm-up
        batched, t_batched, tok_batched = timed(backend, prompts, params)
        whole, t_whole = whole_batches(backend, prompts, params)  # right after: the same load on a shared machine
        single, t_single, tok_single = timed(backend, prompts, params, batch_size=1)

        device = backend.device if backend.device != "cpu" else f"cpu ({args.threads} threads, {platform.processor() or platform.machine()})"
        print(f"model: {args.model or f'random llama h={args.hidden_size} L={args.layers}'} | device: {device} | "
              f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy")
        print(f"transformers batched (bs={args.batch_size}): {t_batched:7.2f} s  {tok_batched / t_batched:8.1f} tok/s")
        print(f"transformers one-by-one:       {t_single:7.2f} s  {tok_single / t_single:8.1f} tok/s")
        print(f"batched / one-by-one throughput ratio: {(tok_batched / t_batched) / (tok_single / t_single):.2f}x")
        print(f"identical outputs: {batched == single}")
        print(f"generate on whole batches:     {t_whole:7.2f} s  {tok_batched / t_whole:8.1f} tok/s")
        print(f"finished rows leave the batch / whole batches throughput ratio: {t_whole / t_batched:.2f}x "
              f"(identical outputs: {whole == batched})")

        if vllm_usable():
            from eval.backends import VLLMBackend

            del backend
            torch.cuda.empty_cache()
            vllm = VLLMBackend(model)
            vllm.generate(prompts[:2], params)
            start = time.perf_counter()
            outputs = vllm.generate(prompts, params)
            t_vllm = time.perf_counter() - start
            tokens = sum(len(vllm.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
            print(f"vLLM:                          {t_vllm:7.2f} s  {tokens / t_vllm:8.1f} tok/s "
                  f"({(tokens / t_vllm) / (tok_batched / t_batched):.2f}x transformers batched)")
        else:
            print("vLLM vs transformers: skipped (vLLM not installed or no CUDA device on this machine)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
