"""Helpers for the harness's tests and benchmarks: a tiny offline model folder and a local server to talk to.

Nothing here downloads: the tokenizer is trained on the shipped MT-Bench questions, the model is randomly
initialised (:mod:`balora_trl.local_models`).
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time

from balora_trl.prompts import DEFAULT, PromptTemplate

from .benchmark_rows import packaged, read_rows


def tiny_model_dir(directory: str, template: PromptTemplate | None = DEFAULT, family: str = "llama",
                   hidden_size: int = 32, num_layers: int = 2, seed: int = 0, extra_text: list[str] = ()) -> str:
    """Save a random tiny causal LM + trained tokenizer (+ ``prompt_template.json``) into ``directory``."""
    from balora_trl.local_models import build_causal_lm, train_tokenizer

    texts = [t for row in read_rows(packaged("mt_bench_question.jsonl")) for t in row["turns"]] + list(extra_text)
    tokenizer = train_tokenizer(texts, vocab_size=512)
    model = build_causal_lm(family, tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if template is not None:
        template.save(directory)
    return directory


@contextlib.contextmanager
def serve(model_dir: str, *args: str, startup_timeout_s: float = 240.0):
    """Run ``python -m eval.serve --model model_dir --port 0 *args`` on 127.0.0.1; yields its base URL."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-m", "eval.serve", "--model", model_dir, "--host", "127.0.0.1",
                             "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"eval.serve did not start within {startup_timeout_s:.0f}s") from None
            if line.startswith("serving "):
                yield line.split(" at ", 1)[1].strip()
                break
            if proc.poll() is not None:
                raise RuntimeError(f"eval.serve exited with {proc.returncode} before serving")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
