"""``python -m eval TASK --model PATH ...`` (and ``balora eval``, which calls :func:`main`).

TASK is one of gsm8k, math, humaneval, mbpp, mt_bench, or several joined by commas (one model load for all).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .backends import BACKENDS, GenerationParams, load_backend, resolve_backend
from .prompting import PromptFormatter
from .report import ResultStore
from .runner import run_task
from .tasks import TASKS
from .tasks.base import Generator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description="Evaluate a merged model or an adapter on the "
                                "BA-LoRA paper's benchmarks.")
    p.add_argument("task", help=f"one of {', '.join(TASKS)}, or several joined by commas")
    p.add_argument("--model", required=True, help="merged model folder, adapter folder, hub id, or the served "
                   "model's name with --backend openai (a local folder still supplies the prompt template)")
    p.add_argument("--base_model", help="base for an adapter (default: base_model_name_or_path of adapter_config.json)")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: openai if --base_url, else vllm if it imports and CUDA is present, else transformers")
    g.add_argument("--base_url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    g.add_argument("--api_key", help="for --base_url (default: $OPENAI_API_KEY or 'EMPTY')")
    g.add_argument("--served_model_name", help="model name the server knows (default: --model)")
    g.add_argument("--batch_size", type=int, default=16, help="transformers batch size")
    g.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM GPUs per model")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    g.add_argument("--trust_remote_code", action="store_true")
    s = p.add_argument_group("sampling")
    s.add_argument("--max_new_tokens", type=int, help="default per task (gsm8k/code 512, math/mt_bench 1024)")
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top_p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable); the prompt "
                   "template's instruction header is always one")
    d = p.add_argument_group("data and output")
    d.add_argument("--data_file", help="local .jsonl/.json/.parquet/.csv instead of the Hub (runs offline)")
    d.add_argument("--dataset", help="another Hub dataset id for the task")
    d.add_argument("--limit", type=int, help="first N samples only")
    d.add_argument("--output_dir", help="default: eval_results/<model folder name>")
    d.add_argument("--overwrite", action="store_true", help="discard earlier results instead of resuming")
    d.add_argument("--chunk_size", type=int, default=64, help="samples generated and scored per saved chunk")
    c = p.add_argument_group("code execution (humaneval, mbpp)")
    c.add_argument("--timeout", type=float, default=10.0, help="seconds per program (wall clock)")
    c.add_argument("--memory_mb", type=int, default=1024)
    c.add_argument("--workers", type=int, help="programs run in parallel (default: min(8, CPUs))")
    j = p.add_argument_group("judge (mt_bench)")
    j.add_argument("--judge_model", help="e.g. gpt-4; any model an OpenAI-compatible endpoint serves")
    j.add_argument("--judge_base_url", help="default: the OpenAI API")
    j.add_argument("--judge_api_key")
    j.add_argument("--judge_retries", type=int, default=2, help="re-asks for a judgment without [[rating]]")
    j.add_argument("--judge_max_tokens", type=int, default=2048)
    j.add_argument("--judge_concurrency", type=int, default=8)
    return p


def _task_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise SystemExit(f"Unknown task(s) {unknown or spec!r}; choose from {', '.join(TASKS)}.")
    return names


def _make_task(name: str, args):
    kwargs = dict(data_file=args.data_file, dataset=args.dataset, limit=args.limit)
    if name in ("humaneval", "mbpp"):
        kwargs.update(timeout_s=args.timeout, memory_mb=args.memory_mb, workers=args.workers)
    if name == "mt_bench":
        if not args.judge_model:
            raise SystemExit("mt_bench needs --judge_model (and --judge_base_url for a self-hosted judge).")
        from .tasks.mt_bench import Judge

        kwargs["judge"] = Judge(args.judge_model, args.judge_base_url, args.judge_api_key, retries=args.judge_retries,
                                max_tokens=args.judge_max_tokens, concurrency=args.judge_concurrency)
    return TASKS[name](**kwargs)


def _run_config(task, args, formatter, params) -> dict:
    """The settings that change a sample's result; a resumed run must match them."""
    config = dict(task=task.name, model=args.model, base_model=args.base_model, prompt=formatter.describe(),
                  max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
                  seed=params.seed, stop=list(params.stop), data_file=args.data_file, dataset=args.dataset)
    if task.name in ("humaneval", "mbpp"):
        config.update(timeout=args.timeout, memory_mb=args.memory_mb)
    if task.name == "mt_bench":
        config.update(judge_model=args.judge_model, judge_max_tokens=args.judge_max_tokens)
    return config


def run(args) -> dict:
    """Evaluate; returns {task: summary}."""
    names = _task_names(args.task)
    tasks = [_make_task(n, args) for n in names]  # fail on bad task options before loading a model
    backend_name = resolve_backend(args.backend, args.base_url)
    backend = load_backend(
        backend_name, args.model, base_model=args.base_model, base_url=args.base_url, api_key=args.api_key,
        served_model_name=args.served_model_name, batch_size=args.batch_size,
        tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, seed=args.seed,
        concurrency=args.concurrency, trust_remote_code=args.trust_remote_code)
    model_dir = args.model if os.path.isdir(args.model) else None
    formatter = PromptFormatter.for_model(model_dir, backend.tokenizer, assume_chat=backend.tokenizer is None)
    output_dir = args.output_dir or os.path.join("eval_results", os.path.basename(os.path.normpath(args.model)))
    summaries = {}
    for task in tasks:
        stop = tuple(dict.fromkeys([*formatter.stop_strings(), *args.stop]))
        params = GenerationParams(max_new_tokens=args.max_new_tokens or task.max_new_tokens,
                                  temperature=args.temperature, top_p=args.top_p, stop=stop, seed=args.seed)
        store = ResultStore(output_dir, task.name, _run_config(task, args, formatter, params), args.overwrite)
        summary = run_task(task, Generator(backend, formatter, params), store, chunk_size=args.chunk_size,
                           meta=dict(model=args.model, backend=backend_name, prompt_format=formatter.mode))
        summaries[task.name] = summary
        with open(store.table_path) as f:
            print(f.read(), file=sys.stderr)
        print(f"[{task.name}] per-sample: {store.records_path}\n[{task.name}] summary: {store.summary_path}",
              file=sys.stderr)
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    summaries = run(args)
    print(json.dumps({name: {k: v for k, v in s.items() if k != "categories"} for name, s in summaries.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
