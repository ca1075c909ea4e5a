"""Start-up checks: what a configuration needs that this machine lacks is reported before anything is loaded.

QLoRA (``load_in_4bit`` / ``load_in_8bit``) needs bitsandbytes and a CUDA GPU (4-bit also runs on the CPU with
bitsandbytes >= 0.50); ``attn_implementation: flash_attention_2`` needs flash-attn, a CUDA GPU and a 16-bit compute
dtype; a ``report_to`` integration needs its package. Each missing piece raises `PreflightError` naming what to
install or change — at start-up, never halfway through a run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys

INIT_LORA_WEIGHTS = ("true", "false", "gaussian", "pissa", "pissa_niter_<n>", "olora", "orthogonal")

_REPORTERS = {  # report_to value -> (importable modules, any of which is enough; what to install)
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard"),
    "wandb": (("wandb",), "pip install wandb"),
    "trackio": (("trackio",), "pip install trackio"),
    "mlflow": (("mlflow",), "pip install mlflow"),
    "comet_ml": (("comet_ml",), "pip install comet_ml"),
}


class PreflightError(RuntimeError):
    """The configuration needs something this machine does not have."""


# What a user's mistake raises before any work starts: a bad value, file or configuration (ValueError: our checks,
# TRL's and transformers' argument checks, the data loaders), what this machine lacks (PreflightError), a path that
# does not exist or cannot be read (OSError). The commands print these as one line; BALORA_DEBUG=1 shows the traceback.
USER_ERRORS = (ValueError, PreflightError, OSError)


def debug_requested() -> bool:
    """BALORA_DEBUG=1 (set by `balora --debug`): user errors keep their traceback."""
    return os.environ.get("BALORA_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def report_user_error(error: BaseException) -> int:
    """Print ``error: MESSAGE`` on stderr and return the exit code 2 (a usage error, as argparse's); with
    BALORA_DEBUG=1, raise ``error`` again instead, with its traceback."""
    if debug_requested():
        raise error
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        message = f"{error.strerror}: {error.filename}"
    else:
        message = str(error).strip() or type(error).__name__
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # one line, whoever wrote it
    print(f"error: {message}", file=sys.stderr)
    return 2


def is_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# bitsandbytes quantizes and runs 4-bit layers on the CPU from this version on (measured here with 0.50.2: NF4
# QLoRA and QPiSSA train, and the QPiSSA reference is closer to the original than NF4 of the original).
BNB_CPU_4BIT = "0.50"


def bitsandbytes_version():
    """The installed bitsandbytes version (a ``packaging`` Version, comparable with ``Version(BNB_CPU_4BIT)``), or
    ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        return Version(version("bitsandbytes"))
    except PackageNotFoundError:
        return None


def parse_init_lora_weights(value):
    """``init_lora_weights`` as PEFT takes it: True/False or one of the initialisation names."""
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("true", "1", "yes", "lora"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    if text in ("gaussian", "pissa", "olora", "orthogonal") or re.fullmatch(r"pissa_niter_\d+", text):
        return text
    raise PreflightError(
        f"init_lora_weights={value!r} is not supported here; use one of {', '.join(INIT_LORA_WEIGHTS)} "
        "(BA-LoRA's recipes use pissa_niter_4: PiSSA with a 4-iteration fast SVD)."
    )


def check_model_path(name_or_path: str | None) -> None:
    """A ``model_name_or_path`` that can only be a local path (absolute, ``./``, ``~``, or more than one ``/``: a Hub id
    is ``name`` or ``namespace/name``) must be an existing folder; otherwise the Hub client answers with
    "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"."""
    if not name_or_path:
        return
    path = os.path.expanduser(str(name_or_path))
    if os.path.isfile(path):
        raise ValueError(f"model_name_or_path {name_or_path} is a file; give the model's folder.")
    local = os.path.isabs(path) or str(name_or_path).startswith((".", "~")) or path.count("/") > 1
    if local and not os.path.isdir(path):
        raise ValueError(f"No such model folder: {name_or_path}")


def check(model_args, training_args, init_lora_weights=None) -> None:
    """Raise ValueError for a model path that does not exist, then `PreflightError` for the requirements of the
    configuration this machine cannot meet."""
    check_model_path(getattr(model_args, "model_name_or_path", None))
    problems = []
    quantized = getattr(model_args, "load_in_4bit", False) or getattr(model_args, "load_in_8bit", False)
    if quantized:
        bits = "load_in_4bit" if model_args.load_in_4bit else "load_in_8bit"
        from packaging.version import Version

        bnb = (bitsandbytes_version() or Version("0")) if is_available("bitsandbytes") else None
        if bnb is None:
            problems.append(f"`{bits}` (QLoRA) needs bitsandbytes: pip install 'balora-trl[quant]'")
        elif not cuda_available() and (model_args.load_in_8bit or bnb < Version(BNB_CPU_4BIT)):
            cpu = ("8-bit training needs one" if model_args.load_in_8bit else
                   f"on the CPU, 4-bit needs bitsandbytes >= {BNB_CPU_4BIT} (installed: {bnb})")
            problems.append(f"`{bits}` (QLoRA) needs a CUDA GPU, none is visible (torch.cuda.is_available() is "
                            f"False); {cpu}")
        if not model_args.use_peft:
            problems.append(f"`{bits}` needs `use_peft: true`: a quantized base cannot be fully fine-tuned")
        init = parse_init_lora_weights(init_lora_weights) if init_lora_weights is not None else None
        if isinstance(init, str) and init.startswith("pissa"):
            problems.append(
                f"`{bits}` with init_lora_weights={init!r}: PEFT computes PiSSA's SVD on unquantized weights only. "
                "For QPiSSA, factor the model once with `balora pissa-init --model M --out DIR` and train with "
                "`--model_name_or_path DIR` (its residual is quantised); or use `init_lora_weights: true` for QLoRA"
            )

    attn = getattr(model_args, "attn_implementation", None) or ""
    if attn in ("flash_attention_2", "flash_attention_3"):
        module, extra = ("flash_attn", "pip install 'balora-trl[flash]' --no-build-isolation") if attn.endswith("2") \
            else ("flash_attn_interface", "build flash-attention 3 (hopper/) from github.com/Dao-AILab/flash-attention")
        if not is_available(module):
            problems.append(f"`attn_implementation: {attn}` needs {module}: {extra}")
        if not cuda_available():
            problems.append(f"`attn_implementation: {attn}` needs a CUDA GPU; none is visible")
        sixteen_bit = (getattr(model_args, "dtype", None) in ("bfloat16", "float16")
                       or training_args.bf16 or training_args.fp16)
        if not sixteen_bit:
            problems.append(
                f"`attn_implementation: {attn}` computes in fp16/bf16 only, but the model is float32 without mixed "
                "precision: set `dtype: bfloat16` (PEFT keeps the adapters in float32) or `bf16: true`, or use "
                "`attn_implementation: sdpa`"
            )

    for name in training_args.report_to or []:
        if name in _REPORTERS:
            modules, install = _REPORTERS[name]
            if not any(is_available(m) for m in modules):
                problems.append(f"`report_to: {name}` needs {modules[0]}: {install}")

    if problems:
        raise PreflightError("This configuration cannot start here: " + "; ".join(problems) + ".")
