"""The adapter lifecycle: checkpoints that resume exactly, a standard adapter as the final output, merged checkpoints.

Three forms of a trained BA-LoRA model exist on disk:

* **Checkpoints** (``checkpoint-N/``) stay in the trained parameterisation so training resumes exactly. For PiSSA /
  OLoRA (which rewrite the base weights into a residual W_res = W − s·B₀A₀) the checkpoint's adapter only means
  something on that residual; the frozen initial adapter (``balora_reference/``, the KL reference) is saved beside
  it, and on resume it is restored from there rather than re-derived.
* **The final output** (``trainer.save_model(dir)``, ``trainer.push_to_hub()``) is a standard PEFT adapter for the
  *original* base model. A PiSSA/OLoRA adapter is converted to a LoRA delta,
  ΔW = s·(BA − B₀A₀) = s·[B | −B₀]·[A ; A₀], i.e. a LoRA of rank 2r (α doubled, so s is unchanged).
  Beside it: ``balora_config.json`` (λ1-3, k, T, reference kind, LM head), ``prompt_template.json`` and a
  TRL-style ``README.md`` model card.
* **Merged checkpoints** (``balora merge`` / :func:`merge`): base + adapter folded into plain sharded safetensors
  that ``AutoModelForCausalLM.from_pretrained`` and ``vllm serve`` load, with no PEFT files or fields.

Every folder is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the previous output or the new one under the target name, never a mixture or a half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass, field

import torch

from .prompts import FILENAME as PROMPT_TEMPLATE_FILE
from .prompts import PLACEHOLDER, PromptTemplate
from .reference import REFERENCE_ADAPTER, is_peft_model

BALORA_CONFIG_FILE = "balora_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_BIN_FILE = "adapter_model.bin"
# The initial adapter of a weight-rewriting init when it is not kept as the `balora_reference` adapter (explicit
# `ref_model`): saved in checkpoints as a plain file, so the Trainer does not load it as an adapter.
INITIAL_ADAPTER_FILE = "balora_initial_adapter.safetensors"
TRAINER_STATE_FILE = "trainer_state.json"

# Initialisations that rewrite the base weights into a residual (PEFT's names); LoftQ quantises instead.
RESIDUAL_INITS = ("pissa", "olora", "corda", "lora_ga")
# Of those, the ones PEFT recomputes identically from the original weights when it loads a residual-form adapter.
DETERMINISTIC_RESIDUAL_INITS = ("pissa", "olora")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

BALORA_PAPER = {
    "title": "BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language Models",
    "id": "2408.04556",
    "citation": """@article{chang2024balora,
  title   = {{BA-LoRA: Bias-Alleviating Low-Rank Adaptation to Mitigate Catastrophic Inheritance in Large Language Models}},
  author  = {Yupeng Chang and Yi Chang and Yuan Wu},
  journal = {arXiv preprint arXiv:2408.04556},
  year    = {2024}
}""",
}

# Files a final adapter / merged model folder consists of. When the target folder holds anything else (the run's
# checkpoint-N/ folders, logs), the new files replace these in place instead of the whole folder being swapped.
_OUTPUT_FILES = {
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_BIN_FILE, BALORA_CONFIG_FILE, PROMPT_TEMPLATE_FILE, "README.md",
    "training_args.bin", "config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "tokenizer.model", "processor_config.json", "preprocessor_config.json",
}
_SHARD = re.compile(r"^(model|pytorch_model)-\d+-of-\d+\.(safetensors|bin)$")
# Config keys PEFT or adapter loading can leave on a transformers config; never written into a merged config.json.
_PEFT_CONFIG_KEYS = ("peft_config", "adapter_config", "_hf_peft_config_loaded", "peft_type", "base_model_name_or_path",
                     "auto_mapping", "active_adapter", "active_adapters")


# ----------------------------------------------------------------------------------------------------------------
# Atomic folders
# ----------------------------------------------------------------------------------------------------------------


def _is_output_file(name: str) -> bool:
    return name in _OUTPUT_FILES or bool(_SHARD.match(name))


def _sibling(target: str, tag: str) -> str:
    return f"{target}.{tag}-{os.getpid()}"


def _fsync_tree(path: str) -> None:
    """Flush the staged files to disk before they are renamed into place (best effort)."""
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            except OSError:
                pass
            finally:
                os.close(fd)


def _swap_in(staging: str, target: str) -> None:
    """Rename ``staging`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    old = _sibling(target, "old")
    if os.path.lexists(old):
        shutil.rmtree(old)
    os.rename(target, old)
    try:
        os.rename(staging, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _replace_in_place(staging: str, target: str) -> None:
    """Move the staged files into a folder that also holds other things (checkpoints, logs).

    Each file lands by an atomic rename. The adapter's (or model's) config is removed first and put back last, so
    during the swap the folder reads as "no model" (loading fails loudly) rather than as old weights with a new
    config or the reverse.
    """
    staged = sorted(os.listdir(staging))
    marker = ADAPTER_CONFIG_FILE if ADAPTER_CONFIG_FILE in staged else "config.json"
    if os.path.lexists(os.path.join(target, marker)):
        os.remove(os.path.join(target, marker))
    for name in staged:
        if name == marker:
            continue
        dst = os.path.join(target, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(staging, name), dst)
    for name in os.listdir(target):  # files of the previous output the new one does not have
        path = os.path.join(target, name)
        if name not in staged and name != marker and _is_output_file(name) and os.path.isfile(path):
            os.remove(path)
    if marker in staged:
        os.replace(os.path.join(staging, marker), os.path.join(target, marker))
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str, replace_all: bool = False):
    """Yield an empty staging folder beside ``target``; when the block completes it becomes ``target``.

    If the block raises (or the process dies), ``target`` is exactly as before and no partial folder carries its
    name. An existing ``target`` made only of output files (or any ``target`` with ``replace_all``) is replaced as a
    whole: renamed to ``<target>.old-<pid>``, the staging folder renamed to ``target``, the old one deleted (a kill
    between the two renames leaves both complete folders under those names and nothing under ``target``). One that
    also holds other entries (a run folder with ``checkpoint-N/``) keeps them and has its output files replaced one
    by one (see ``_replace_in_place``).
    """
    target = os.path.abspath(target)
    if os.path.isfile(target):
        raise ValueError(f"{target} is a file, not a folder.")
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = _sibling(target, "tmp")
    if os.path.lexists(staging):
        shutil.rmtree(staging)
    os.makedirs(staging)
    try:
        yield staging
        _fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    staged = set(os.listdir(staging))
    foreign = [] if replace_all or not os.path.isdir(target) else [
        name for name in os.listdir(target) if not _is_output_file(name) and name not in staged
    ]
    cwd = os.getcwd()
    holds_cwd = cwd == target or cwd.startswith(target + os.sep)  # never rename the working directory away
    if foreign or (holds_cwd and not replace_all):
        _replace_in_place(staging, target)
    else:
        _swap_in(staging, target)


def _write_text_atomic(path: str, text: str) -> None:
    tmp = _sibling(path, "tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False, default=str)
        f.write("\n")


# ----------------------------------------------------------------------------------------------------------------
# PiSSA / OLoRA -> LoRA conversion
# ----------------------------------------------------------------------------------------------------------------


def rewrites_base_weights(peft_config) -> bool:
    """True for initialisations that train on a residual base (PiSSA, OLoRA, CorDA, LoRA-GA)."""
    init = getattr(peft_config, "init_lora_weights", None)
    return isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS)


def _factor(key: str) -> str | None:
    if key.endswith(".lora_A.weight") or key.endswith(".lora_embedding_A"):
        return "A"
    if key.endswith(".lora_B.weight") or key.endswith(".lora_embedding_B"):
        return "B"
    if key.endswith(".lora_B.bias"):
        return "bias"
    return None


def residual_to_lora(config, trained: dict, initial: dict):
    """Turn an adapter trained on a residual base into a standard LoRA for the original base.

    W = W_res + s·B₀A₀ and the trained model is W_res + s·BA, so the trained model is W + s·(BA − B₀A₀)
    = W + s·[B | −B₀]·[A ; A₀]: a LoRA of rank 2r. α is doubled (×√2 with rsLoRA) so the scale s stays the same.
    Returns ``(config, state)``; neither input is modified. Weights outside the LoRA factors (``modules_to_save``)
    are kept as they are.
    """
    if getattr(config, "peft_type", None) is not None and str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"Only LoRA adapters can be converted to a LoRA delta, not {config.peft_type}.")
    if getattr(config, "use_dora", False):
        raise ValueError("A DoRA adapter on a PiSSA/OLoRA residual has no exact LoRA equivalent on the original base; "
                         "load it on the residual model or merge it from the training checkpoint instead.")
    state = {}
    for key, value in trained.items():
        kind = _factor(key)
        if kind is None:
            state[key] = value
            continue
        if key not in initial:
            raise ValueError(f"The initial adapter has no tensor {key!r}: it does not belong to this adapter.")
        start = initial[key].to(device=value.device, dtype=value.dtype)
        if kind == "A":
            state[key] = torch.cat([value, start], dim=0)
        elif kind == "B":
            state[key] = torch.cat([value, -start], dim=1)
        else:
            state[key] = value - start
    config = copy.deepcopy(config)
    factor = math.sqrt(2.0) if config.use_rslora else 2
    config.r = config.r * 2
    config.lora_alpha = config.lora_alpha * factor
    config.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
    config.alpha_pattern = {k: v * factor for k, v in (config.alpha_pattern or {}).items()}
    config.init_lora_weights = True  # loading must not re-run PiSSA on the (original) base
    config.inference_mode = True
    return config, state


def _adapter_state(peft_model, adapter_name: str, state_dict=None) -> dict:
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, state_dict=state_dict, adapter_name=adapter_name)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _save_safetensors(state: dict, path: str) -> None:
    import safetensors.torch

    # Safetensors refuses aliased or non-contiguous tensors.
    seen, clean = set(), {}
    for key, value in state.items():
        value = value.contiguous()
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset()) if value.numel() else None
        if ptr in seen:
            value = value.clone()
        seen.add(ptr)
        clean[key] = value
    safetensors.torch.save_file(clean, path, metadata={"format": "pt"})


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        import safetensors.torch

        return safetensors.torch.load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _adapter_weights_path(directory: str) -> str | None:
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_BIN_FILE):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    return None


def initial_adapter_from_dir(directory: str) -> dict | None:
    """The initial adapter saved in a BA-LoRA checkpoint (``balora_reference/`` or the plain file), else None."""
    sub = _adapter_weights_path(os.path.join(directory, REFERENCE_ADAPTER))
    if sub is not None:
        return _load_state(sub)
    if os.path.isfile(os.path.join(directory, INITIAL_ADAPTER_FILE)):
        return _load_state(os.path.join(directory, INITIAL_ADAPTER_FILE))
    return None


def write_adapter(directory: str, config, state: dict, auto_mapping: dict | None = None) -> None:
    """A standard PEFT adapter folder: ``adapter_model.safetensors`` + ``adapter_config.json``."""
    config = copy.deepcopy(config)
    config.inference_mode = True
    _save_safetensors(state, os.path.join(directory, ADAPTER_WEIGHTS_FILE))
    kwargs = {"auto_mapping_dict": auto_mapping} if auto_mapping and config.task_type is None else {}
    config.save_pretrained(directory, **kwargs)


def standard_adapter_from_dir(directory: str):
    """``(config, state, converted)`` of the adapter in ``directory`` as a standard adapter for the original base.

    A residual-form (PiSSA/OLoRA) adapter is converted when its initial adapter is saved beside it (a BA-LoRA
    checkpoint); ``converted`` is False when the adapter is returned as it is.
    """
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(directory)
    weights = _adapter_weights_path(directory)
    if weights is None:
        raise ValueError(f"No adapter weights ({ADAPTER_WEIGHTS_FILE}) in {directory}.")
    state = _load_state(weights)
    if not rewrites_base_weights(config):
        return config, state, False
    initial = initial_adapter_from_dir(directory)
    if initial is None:
        return config, state, False
    config, state = residual_to_lora(config, state, initial)
    return config, state, True


# ----------------------------------------------------------------------------------------------------------------
# Metadata and model card
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class ExportInfo:
    """What was written: describes the adapter in ``balora_config.json`` and the model card."""

    kind: str  # "lora_adapter" | "full_model" | "checkpoint"
    init_lora_weights: str | bool | None = None
    trained_rank: int | None = None
    saved_rank: int | None = None
    lora_alpha: float | None = None
    converted_from_residual: bool = False
    target_modules: list | str | None = None
    base_model: str | None = None
    notes: list[str] = field(default_factory=list)


def _prompt_template(trainer) -> PromptTemplate | None:
    template = getattr(trainer, "prompt_template", None)
    if template is None or isinstance(template, PromptTemplate):
        return template
    if isinstance(template, dict):
        return PromptTemplate(name=template["name"], template=template.get("template"))
    raise TypeError(f"`trainer.prompt_template` must be a PromptTemplate, got {type(template).__name__}.")


def _base_model_id(model) -> str | None:
    """The original base model's path / hub id, as the adapter records it."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        name = model.peft_config[model.active_adapter].base_model_name_or_path
        if name:
            return name
        model = model.get_base_model()
    return getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None


def _base_description(model) -> dict:
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    config = inner.config
    text = config.get_text_config()
    return {
        "name_or_path": _base_model_id(model),
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(inner).__name__]),
        "vocab_size": getattr(text, "vocab_size", None),
        "hidden_size": getattr(text, "hidden_size", None),
    }


def _head_description(trainer, model) -> dict:
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    head = inner.get_output_embeddings()
    info = {"path": getattr(trainer, "_path", None)}
    if head is not None:
        info.update(
            tied=bool(getattr(inner.config.get_text_config(), "tie_word_embeddings", False)),
            trainable=bool(head.weight.requires_grad),
            shape=list(getattr(head.weight, "ds_shape", None) or head.weight.shape),
        )
    return info


def balora_metadata(trainer, model, info: ExportInfo) -> dict:
    """The content of ``balora_config.json``: the BA-LoRA hyperparameters, reference, LM head, adapter, base."""
    from . import __version__

    hyper = dict(getattr(trainer.args, "balora_hyperparameters", {}) or {})
    reference = getattr(trainer, "reference", None)
    data = {
        **hyper,
        "head": _head_description(trainer, model),
        "reference": reference.kind if reference is not None else None,
        "adapter": {k: v for k, v in asdict(info).items() if k not in ("notes", "base_model")},
        "base_model": _base_description(model),
        "global_step": trainer.state.global_step,
        "balora_trl_version": __version__,
    }
    template = _prompt_template(trainer)
    if template is not None:
        data["prompt_template"] = template.name
    return data


def _eval_results(trainer) -> dict:
    results = {}
    for entry in getattr(trainer.state, "log_history", []) or []:
        results.update({k: v for k, v in entry.items() if k.startswith("eval_")
                        and not k.endswith(("_runtime", "_per_second", "num_tokens"))})
    extra = getattr(trainer, "eval_results", None)
    if isinstance(extra, dict):
        results.update(extra)
    return results


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _modules_summary(modules) -> str:
    if isinstance(modules, str):
        return f"`{modules}`"
    names = sorted({str(m).rsplit(".", 1)[-1] for m in modules or []})
    return ", ".join(f"`{n}`" for n in names) or "none"


def _dataset_name(trainer, dataset_name):
    if dataset_name:
        return dataset_name
    name = getattr(trainer, "dataset_name", None)
    if name:
        return name
    info = getattr(getattr(trainer, "train_dataset", None), "info", None)
    return getattr(info, "dataset_name", None) or None


def balora_card_section(trainer, model, info: ExportInfo, dataset_name=None) -> str:
    """The BA-LoRA part of the model card (markdown)."""
    args = trainer.args
    hyper = getattr(args, "balora_hyperparameters", {}) or {}
    reference = getattr(trainer, "reference", None)
    lines = ["## BA-LoRA", "",
             f"Trained with BA-LoRA ([arXiv {BALORA_PAPER['id']}](https://arxiv.org/abs/{BALORA_PAPER['id']})): "
             "L = L_sft + λ1·KL(p_pretrained ‖ p_θ) + λ2·(−H(p_θ)) + λ3·(−Σ_{i≤k}σ_i/Σσ), over the response tokens.",
             "", "| term | value |", "|---|---|"]
    names = {"lambda_consistency": "λ1 consistency (KL to the pretrained model)",
             "lambda_diversity": "λ2 diversity (−entropy)", "lambda_svd": "λ3 SVD (top-k singular-value ratio)",
             "svd_top_k": "k (top singular values)", "kl_temperature": "KL temperature T"}
    for key, value in hyper.items():
        lines.append(f"| {names.get(key, key)} | {_fmt(value)} |")
    if reference is not None:
        lines.append(f"| reference (p_pretrained) | {reference.kind} |")
    if getattr(trainer, "_path", None):
        lines.append(f"| LM-head path | {trainer._path} |")
    lines += ["", "### Adapter", ""]
    if info.kind == "lora_adapter":
        lines.append(f"- Initialisation: `{info.init_lora_weights}`; trained rank r = {info.trained_rank}, "
                     f"α = {_fmt(info.lora_alpha)}; target modules: {_modules_summary(info.target_modules)}.")
        if info.converted_from_residual:
            lines.append(
                f"- **Saved as a LoRA delta against the original base model, rank {info.saved_rank} = 2 × "
                f"{info.trained_rank}.** {info.init_lora_weights} trains on a residual base W_res = W − s·B₀A₀; the "
                "saved adapter is [B | −B₀]·[A ; A₀] (α doubled, same scale), so it loads with "
                "`PeftModel.from_pretrained(<original base>, ...)` and reproduces the trained model exactly.")
        else:
            lines.append(f"- Saved as trained (rank {info.saved_rank}); it applies to the unmodified base model.")
    elif info.kind == "full_model":
        lines.append("- Full fine-tuning: this folder holds the complete model.")
    lines += [f"- {note}" for note in info.notes]
    lines += ["", "### Recipe", ""]
    if info.base_model:
        lines.append(f"- Base model: `{info.base_model}`")
    data = _dataset_name(trainer, dataset_name)
    rows = len(trainer.train_dataset) if getattr(trainer, "train_dataset", None) is not None and hasattr(
        trainer.train_dataset, "__len__") else None
    if data or rows:
        lines.append(f"- Data: {data or 'training set'}" + (f" ({rows} examples)" if rows else ""))
    steps = f"{trainer.state.global_step} optimizer steps" if trainer.state.global_step else "not trained yet"
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    scheduler = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    lines.append(f"- {steps}; learning rate {_fmt(args.learning_rate)} ({scheduler}), "
                 f"batch {args.per_device_train_batch_size} × accumulation {args.gradient_accumulation_steps} per "
                 f"device, max length {getattr(args, 'max_length', None)}, {precision}, seed {args.seed}.")
    template = _prompt_template(trainer)
    if template is not None:
        lines += ["", "### Prompt template", "", f"`{template.name}` (saved as `{PROMPT_TEMPLATE_FILE}`)"]
        if template.template:
            lines += ["", "```text", template.template, "```"]
    results = _eval_results(trainer)
    if results:
        lines += ["", "### Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in results.items()]
    if info.kind == "lora_adapter":
        base = info.base_model or "<base model>"
        lines += ["", "### Usage", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "<this folder or repo>")', "```", "",
                  "Or fold it into a standalone checkpoint for `vllm serve`: "
                  "`balora merge --adapter <this folder> --out merged/`."]
    return "\n".join(lines) + "\n"


def build_model_card(trainer, model, info: ExportInfo, model_name=None, dataset_name=None, tags=None) -> str:
    """TRL's model card for the trainer, with ``library_name: peft`` for adapters and the BA-LoRA section."""
    from trl.trainer.utils import generate_model_card

    tags = {tags} if isinstance(tags, str) else set(tags or [])
    tags.update(getattr(trainer, "_tag_names", []) or [])
    if info.kind == "lora_adapter":
        tags.update({"lora", "peft"})
        if info.converted_from_residual or (isinstance(info.init_lora_weights, str)
                                            and info.init_lora_weights.startswith("pissa")):
            tags.add("pissa")
    base = info.base_model if info.base_model and not os.path.isdir(info.base_model) else None
    card = generate_model_card(
        base_model=base,
        model_name=model_name or os.path.basename(os.path.abspath(trainer.args.output_dir)),
        hub_model_id=getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id or "<repo id>",
        dataset_name=_dataset_name(trainer, dataset_name),
        tags=sorted(tags),
        wandb_url=None,
        trackio_url=None,
        trainer_name=getattr(trainer, "_name", "BA-LoRA SFT"),
        trainer_citation=BALORA_PAPER["citation"],
        paper_title=BALORA_PAPER["title"],
        paper_id=BALORA_PAPER["id"],
    )
    if info.kind == "lora_adapter":
        card.data.library_name = "peft"
    text = str(card)
    if base is None:  # a local or unnamed base: TRL's template would print a link to "None"
        text = text.replace("[None](https://huggingface.co/None)", f"`{info.base_model or 'an unnamed base model'}`")
    section = balora_card_section(trainer, model, info, dataset_name)
    marker = "### Framework versions"
    if marker in text:
        text = text.replace(marker, section + "\n" + marker, 1)
    else:
        text = text.rstrip() + "\n\n" + section
    return text


# ----------------------------------------------------------------------------------------------------------------
# The trainer mix-in
# ----------------------------------------------------------------------------------------------------------------


def _trained_adapter(peft_model) -> str:
    name = peft_model.active_adapter
    if name == REFERENCE_ADAPTER:
        raise RuntimeError("The BA-LoRA reference adapter is active outside a reference pass.")
    return name


@torch.no_grad()
def _rebase_residual(peft_model, adapter_name: str, fresh: dict, restored: dict) -> None:
    """Make the residual base match a restored initial adapter: W_res += s·(B₀'A₀' − B₀A₀).

    A fresh PiSSA/OLoRA init recomputes W_res = W − s·B₀'A₀'. When the checkpoint's B₀A₀ differ (randomised SVD,
    another machine), the base must be W − s·B₀A₀ for the checkpoint's adapter to mean what it meant.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import transpose

    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        key_a, key_b = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        if key_a not in fresh or key_a not in restored:
            continue
        if torch.equal(fresh[key_a], restored[key_a]) and torch.equal(fresh[key_b], restored[key_b]):
            continue
        weight = module.get_base_layer().weight
        scale = module.scaling[adapter_name]
        delta = fresh[key_b].float() @ fresh[key_a].float() - restored[key_b].float() @ restored[key_a].float()
        delta = transpose(delta * scale, module.fan_in_fan_out).to(weight.device)
        weight.data = (weight.data.float() + delta).to(weight.dtype)


class BALoraSaveMixin:
    """Save, resume and export behaviour of the BA-LoRA trainers (mixed in before TRL's trainer).

    * ``save_model(dir)`` / ``push_to_hub()`` write a standard adapter for the original base (PiSSA/OLoRA converted
      to a rank-2r LoRA), ``balora_config.json``, ``prompt_template.json`` (when ``trainer.prompt_template`` is set)
      and the model card; never the ``balora_reference`` adapter. The model in memory is not modified.
    * ``checkpoint-N/`` keeps the trained parameterisation and the reference adapter, and is written under a
      temporary name and renamed when complete.
    * ``train(resume_from_checkpoint=...)`` restores the reference adapter from the checkpoint (and, for a
      randomised PiSSA init, the residual base it belongs to).
    """

    _balora_saving_checkpoint = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._balora_initial_state: dict | None = None
        self._balora_deferred_pushes: list[str] = []
        self.balora_export_info: ExportInfo | None = None
        model = self.accelerator.unwrap_model(self.model)
        if is_peft_model(model) and rewrites_base_weights(model.peft_config[model.active_adapter]):
            # The adapter as it starts (before any step): what the PiSSA -> LoRA conversion subtracts. Kept on the
            # CPU (r·(in + out) numbers per layer), also when no `balora_reference` adapter holds it.
            self._balora_initial_state = _adapter_state(model, model.active_adapter)

    # -- what the conversion starts from --------------------------------------------------------------------------

    def _initial_adapter_state(self, model, state_dict=None) -> dict | None:
        if REFERENCE_ADAPTER in model.peft_config:
            try:
                state = _adapter_state(model, REFERENCE_ADAPTER, state_dict)
            except (KeyError, RuntimeError):
                state = {}
            if state and all(v.numel() > 0 for v in state.values()):
                return state
        return self._balora_initial_state

    def _standard_adapter(self, model, state_dict=None):
        """``(config, state, info)`` of the trained adapter as a standard adapter for the original base."""
        name = _trained_adapter(model)
        config = copy.deepcopy(model.peft_config[name])
        state = _adapter_state(model, name, state_dict)
        info = ExportInfo(kind="lora_adapter", init_lora_weights=config.init_lora_weights, trained_rank=config.r,
                          saved_rank=config.r, lora_alpha=config.lora_alpha, base_model=_base_model_id(model),
                          target_modules=sorted(config.target_modules) if isinstance(config.target_modules, set)
                          else config.target_modules)
        if rewrites_base_weights(config):
            initial = self._initial_adapter_state(model, state_dict)
            if initial is None:
                raise RuntimeError(f"No initial adapter is known for this {config.init_lora_weights} adapter; it "
                                   "cannot be converted to a LoRA for the original base.")
            if getattr(config, "use_dora", False):
                warnings.warn("DoRA on a PiSSA/OLoRA residual has no exact LoRA form on the original base: the "
                              "adapter is saved as trained and only reproduces the model on the residual base.",
                              stacklevel=3)
                info.notes.append("DoRA + residual init: saved as trained; it needs the residual base model.")
            else:
                config, state = residual_to_lora(config, state, initial)
                info.converted_from_residual = True
                info.saved_rank = config.r
        config.base_model_name_or_path = info.base_model
        config.inference_mode = True
        return config, state, info

    @staticmethod
    def _auto_mapping(model) -> dict:
        inner = type(model.get_base_model())
        return {"base_model_class": inner.__name__, "parent_library": inner.__module__}

    # -- writing ---------------------------------------------------------------------------------------------------

    def _save_processing_and_args(self, directory: str) -> None:
        if self.processing_class is not None:
            self.processing_class.save_pretrained(directory)
        elif getattr(getattr(self, "data_collator", None), "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(directory)
        torch.save(self.args, os.path.join(directory, "training_args.bin"))

    def _write_metadata(self, directory: str, model, info: ExportInfo, card: bool = True) -> None:
        _write_json(os.path.join(directory, BALORA_CONFIG_FILE), balora_metadata(self, model, info))
        template = _prompt_template(self)
        if template is not None:
            template.save(directory)
        if card:
            with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as f:
                f.write(build_model_card(self, model, info))

    def _export(self, output_dir: str, state_dict=None) -> ExportInfo:
        """Write the final output (standard adapter or full model, metadata, card) atomically into ``output_dir``."""
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if is_peft_model(model):
            config, state, info = self._standard_adapter(model, state_dict)
            with atomic_directory(output_dir) as staging:
                write_adapter(staging, config, state, self._auto_mapping(model))
                self._save_processing_and_args(staging)
                self._write_metadata(staging, model, info)
        else:
            info = ExportInfo(kind="full_model", base_model=_base_model_id(model))
            with atomic_directory(output_dir) as staging:
                super()._save(staging, state_dict=state_dict)
                self._write_metadata(staging, model, info)
        self.balora_export_info = info
        return info

    def _save(self, output_dir: str | None = None, state_dict=None):
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self._balora_saving_checkpoint:
            # Resumable form: every adapter (the trained one at the root, `balora_reference/` beside it).
            super()._save(output_dir, state_dict=state_dict)
            if self.args.should_save:
                model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
                if is_peft_model(model) and self._balora_initial_state is not None \
                        and REFERENCE_ADAPTER not in model.peft_config:
                    _save_safetensors(self._balora_initial_state, os.path.join(output_dir, INITIAL_ADAPTER_FILE))
                _write_json(os.path.join(output_dir, BALORA_CONFIG_FILE),
                            balora_metadata(self, model, ExportInfo(kind="checkpoint")))
                template = _prompt_template(self)
                if template is not None:
                    template.save(output_dir)
            return
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not self.args.should_save:
            if not is_peft_model(model) and getattr(self, "is_distributed_loading_by_transformers", False):
                super()._save(output_dir, state_dict=state_dict)  # joins the collective gathers; writes nothing
            return
        self._export(output_dir, state_dict)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None,
                          tags: str | list[str] | None = None, **kwargs) -> None:
        """TRL's model card plus the BA-LoRA section, written to ``args.output_dir/README.md``."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        info = self.balora_export_info
        if info is None:
            if is_peft_model(model):
                config = model.peft_config[_trained_adapter(model)]
                residual = rewrites_base_weights(config) and not getattr(config, "use_dora", False)
                info = ExportInfo(kind="lora_adapter", init_lora_weights=config.init_lora_weights,
                                  trained_rank=config.r, saved_rank=2 * config.r if residual else config.r,
                                  lora_alpha=config.lora_alpha, converted_from_residual=residual,
                                  base_model=_base_model_id(model), target_modules=config.target_modules)
            else:
                info = ExportInfo(kind="full_model", base_model=_base_model_id(model))
        os.makedirs(self.args.output_dir, exist_ok=True)
        dataset_name = dataset_name or kwargs.get("dataset")  # transformers' `push_to_hub(dataset=...)` spelling
        text = build_model_card(self, model, info, model_name=model_name, dataset_name=dataset_name, tags=tags)
        _write_text_atomic(os.path.join(self.args.output_dir, "README.md"), text)

    # -- checkpoints -----------------------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """The Trainer's checkpoint, written to ``_tmp-checkpoint-N/`` and renamed to ``checkpoint-N`` when whole.

        ``get_last_checkpoint`` (``resume_from_checkpoint=True``) and checkpoint rotation only see complete
        checkpoints; a kill mid-save leaves an ignored ``_tmp-...`` folder, removed by the next save of that step.
        """
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final = os.path.join(run_dir, name)
        staging_root = os.path.join(run_dir, f"_tmp-{name}")
        if self.args.should_save and os.path.lexists(staging_root):
            shutil.rmtree(staging_root)
        self.accelerator.wait_for_everyone()
        self._balora_saving_checkpoint = True
        self._get_output_dir = lambda trial=None: staging_root  # the Trainer joins the folder name to this
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
            self._balora_saving_checkpoint = False
        staged = os.path.join(staging_root, name)
        best = self.state.best_model_checkpoint
        if best and os.path.abspath(best).startswith(os.path.abspath(staging_root) + os.sep):
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.relpath(best, staging_root))
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_FILE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            _fsync_tree(staged)
            _swap_in(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        pushes, self._balora_deferred_pushes = self._balora_deferred_pushes, []
        for _ in pushes:
            self._push_from_checkpoint(final)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Push like the Trainer, but the model files at the top of the repo are the converted standard adapter."""
        if self._balora_saving_checkpoint:  # wait until the checkpoint has its final name
            self._balora_deferred_pushes.append(checkpoint_folder)
            return
        model = self.accelerator.unwrap_model(self.model)
        config = model.peft_config[_trained_adapter(model)] if is_peft_model(model) else None
        if config is None or not rewrites_base_weights(config) or getattr(config, "use_dora", False):
            return super()._push_from_checkpoint(checkpoint_folder)
        import transformers.trainer as hf_trainer
        from transformers.trainer_utils import HubStrategy, SaveStrategy

        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        output_dir = self.args.output_dir
        trained_rank, init = config.r, config.init_lora_weights
        config, state, converted = standard_adapter_from_dir(checkpoint_folder)
        info = ExportInfo(kind="lora_adapter", init_lora_weights=init, trained_rank=trained_rank, saved_rank=config.r,
                          lora_alpha=config.lora_alpha, converted_from_residual=converted,
                          base_model=_base_model_id(model), target_modules=config.target_modules)
        with atomic_directory(output_dir) as staging:
            write_adapter(staging, config, state, self._auto_mapping(model))
            self._save_processing_and_args(staging)
            self._write_metadata(staging, model, info)
        step = self.state.global_step if self.args.save_strategy == SaveStrategy.STEPS else int(self.state.epoch or 0)
        message = f"Training in progress, {'step' if self.args.save_strategy == SaveStrategy.STEPS else 'epoch'} {step}"
        api = hf_trainer.hf_api()
        jobs = [api.upload_folder(repo_id=self.hub_model_id, folder_path=output_dir, commit_message=message,
                                  token=self.args.hub_token, run_as_future=True, revision=self.args.hub_revision,
                                  ignore_patterns=["_*", "checkpoint-*", "*.tmp-*", "*.old-*"])]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            path_in_repo = ("last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT
                            else os.path.basename(checkpoint_folder))
            jobs.append(api.upload_folder(repo_id=self.hub_model_id, folder_path=checkpoint_folder,
                                          path_in_repo=path_in_repo, commit_message=message + ", checkpoint",
                                          token=self.args.hub_token, run_as_future=True,
                                          revision=self.args.hub_revision))
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = hf_trainer.PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    # -- resuming --------------------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The Trainer's adapter loading (it loads every adapter folder, `balora_reference/` included), plus:

        the initial adapter the conversion subtracts is the checkpoint's, and the residual base is moved to it when
        this run's fresh PiSSA/OLoRA init came out differently (randomised SVD).
        """
        target = model if model is not None else self.model
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        peft_model = self.accelerator.unwrap_model(target)
        if not is_peft_model(peft_model):
            return
        for name, param in peft_model.named_parameters():  # the Trainer's set_adapter may flip requires_grad
            if f".{REFERENCE_ADAPTER}." in name or name.endswith(f".{REFERENCE_ADAPTER}"):
                param.requires_grad_(False)
        restored = initial_adapter_from_dir(resume_from_checkpoint)
        fresh = self._balora_initial_state
        if restored is None or fresh is None:
            return
        restored = {k: v.to("cpu") for k, v in restored.items()}
        _rebase_residual(peft_model, _trained_adapter(peft_model), fresh, restored)
        self._balora_initial_state = restored


# ----------------------------------------------------------------------------------------------------------------
# Merging
# ----------------------------------------------------------------------------------------------------------------


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
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    return {k: tuple(v.shape) for k, v in _load_state(path).items()}


def _module_io(module) -> tuple[int, int] | None:
    """(fan-in, fan-out) of a layer LoRA can target, from its (meta) weight."""
    from torch import nn

    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels, module.out_channels
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight [in, out]
        return tuple(module.weight.shape)
    weight = getattr(module, "weight", None)
    if weight is not None and weight.dim() == 2:
        return weight.shape[1], weight.shape[0]
    return None


def validate_base(adapter_dir: str, base: str, base_config=None, adapter_config=None, trust_remote_code=False) -> None:
    """Raise ``ValueError`` naming the mismatch when ``base`` is not the model the adapter was trained on.

    Checks the architecture recorded beside the adapter and every adapter tensor's shape against the base model's
    layers, built on the meta device from the config (no weight is read).
    """
    from transformers import AutoModelForCausalLM

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
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(base_config, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001
        raise ValueError(f"{base!r} is not a causal language model transformers can build: {error}") from error
    modules = dict(skeleton.named_modules())
    params = dict(skeleton.named_parameters(remove_duplicate=False))  # tied heads keep their own name
    prefix = "base_model.model."
    problems = []
    for key, shape in _adapter_shapes(adapter_dir).items():
        inner = key[len(prefix):] if key.startswith(prefix) else key
        kind = _factor(key)
        if kind is None:  # a fully trained module (modules_to_save) or an embedding copy
            name = inner.replace(".modules_to_save", "").replace("modules_to_save.", "")
            if name in params:
                if tuple(params[name].shape) != shape:
                    problems.append(f"{name}: adapter {list(shape)} vs base {list(params[name].shape)}")
            elif not any(tag in name for tag in ("lora_", "token_adapter", "trainable_tokens")):
                problems.append(f"{name}: not a parameter of the base model")
            continue
        module_name = inner.rsplit(".lora_", 1)[0]
        module = modules.get(module_name)
        if module is None:
            problems.append(f"{module_name}: the base model has no such layer")
            continue
        io = _module_io(module)
        if io is None or kind == "bias":
            continue
        fan_in, fan_out = io
        if kind == "A" and shape[1] != fan_in:
            problems.append(f"{module_name}: adapter input size {shape[1]} vs base {fan_in}")
        if kind == "B" and shape[0] != fan_out:
            problems.append(f"{module_name}: adapter output size {shape[0]} vs base {fan_out}")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"Base model mismatch: the adapter in {adapter_dir} does not fit {base!r} ({shown}).")


def chat_template_from_prompt(template: PromptTemplate) -> str | None:
    """A chat template that renders a user turn with the training prompt (for chat endpoints such as vLLM's)."""
    if template.is_chat or not template.template:
        return None
    prefix, suffix = template.template.split(PLACEHOLDER)
    if "{% endraw %}" in prefix + suffix:
        return None
    return ("{% for message in messages %}{% if message['role'] == 'user' %}"
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
             "It loads with `AutoModelForCausalLM.from_pretrained` and serves with `vllm serve <this folder>`; "
             "it needs no PEFT.", ""]
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
            elif not str(adapter_config.init_lora_weights).lower() in DETERMINISTIC_RESIDUAL_INITS:
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
        chat = chat_template_from_prompt(template)
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
