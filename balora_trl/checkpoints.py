"""The trainers' save path: checkpoints that resume exactly, the final output as a standard adapter, atomic folders.

* **Checkpoints** (``checkpoint-N/``) stay in the trained parameterisation so training resumes exactly. For PiSSA /
  OLoRA (which rewrite the base weights into a residual W_res = W − s·B₀A₀) the checkpoint's adapter only means
  something on that residual; the frozen initial adapter (``balora_reference/``, the KL reference) is saved beside
  it, and on resume it is restored from there rather than re-derived.
* **The final output** (``trainer.save_model(dir)``, ``trainer.push_to_hub()``) is a standard PEFT adapter for the
  *original* base model (PiSSA/OLoRA converted to a rank-2r LoRA, :mod:`balora_trl.conversion`), with
  ``balora_config.json``, ``prompt_template.json`` and a model card (:mod:`balora_trl.model_card`).

Every folder is written under a temporary name and renamed into place, so a process killed at any moment leaves
either the previous output or the new one under the target name, never a mixture or a half-written file.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import glob
import json
import os
import re
import shutil
import sys
import warnings
import zipfile

import torch
from transformers import TrainerCallback

from .conversion import (
    ADAPTER_BIN_FILE,
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    BALORA_CONFIG_FILE,
    INITIAL_ADAPTER_FILE,
    TRAINER_STATE_FILE,
    _adapter_state,
    _save_safetensors,
    initial_adapter_from_dir,
    residual_to_lora,
    rewrites_base_weights,
    standard_adapter_from_dir,
    write_adapter,
)
from .model_card import ExportInfo, _base_model_id, _prompt_template, balora_metadata, build_model_card
from .prompts import FILENAME as PROMPT_TEMPLATE_FILE
from .reference import REFERENCE_ADAPTER, adapter_is_zero, is_peft_model

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


# ----------------------------------------------------------------------------------------------------------------
# Atomic folders
# ----------------------------------------------------------------------------------------------------------------


def _is_output_file(name: str) -> bool:
    return name in _OUTPUT_FILES or bool(_SHARD.match(name))


def _sibling(target: str, tag: str) -> str:
    return f"{target}.{tag}-{os.getpid()}"


class DiskFullError(OSError):
    """A write failed because the disk holding ``path`` is full: ``no space left on <path>``."""

    def __init__(self, path: str):
        super().__init__(errno.ENOSPC, f"no space left on {path}")
        self.path = path

    def __str__(self) -> str:
        return f"no space left on {self.path} (free some space, or set output_dir on another disk)"


_LOW_SPACE = 16 * 2 ** 20  # bytes free under which a failed write is put down to a full disk


def disk_full(error: BaseException, path: str) -> DiskFullError | None:
    """``DiskFullError(path)`` when ``error`` (or one it was raised from or during) is a full disk, else None.

    An ``OSError`` says so by its errno (ENOSPC, EDQUOT), safetensors' ``SafetensorError`` in its message ("No space
    left on device (os error 28)"); torch's zip writer does not (``RuntimeError: ... file write failed``, then
    ``unexpected pos N vs M`` while closing), so a failed write there counts as a full disk when the disk holding
    ``path`` has under 16 MiB left.
    """
    seen, chain = set(), error
    torch_write = False
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        if isinstance(chain, DiskFullError):
            return chain
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            return DiskFullError(path)
        if re.search(r"No space left on device|os error 28\b", str(chain)):  # safetensors' SafetensorError
            return DiskFullError(path)
        if isinstance(chain, RuntimeError) and re.search(r"file write failed|unexpected pos|failed writing",
                                                         str(chain)):
            torch_write = True
        chain = chain.__cause__ or chain.__context__
    if torch_write:
        probe = path
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        with contextlib.suppress(OSError):
            if shutil.disk_usage(probe or ".").free < _LOW_SPACE:
                return DiskFullError(path)
    return None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_leftovers(target: str, say=None) -> list[str]:
    """Remove what an interrupted write of ``target`` left beside it, and say so.

    ``<target>.tmp-PID`` (a staging folder or file: a whole output or residual model that never got its name) and
    ``<target>.old-PID`` (the previous output, moved aside for the swap) of a process that is no longer running. A
    ``.old-PID`` with no ``target`` is the previous output that a kill between the two renames of `_swap_in` left
    without a name: it is put back instead. Folders of a live process (a run still writing) are left alone. Returns
    the messages (also printed on stderr by default).
    """
    target = os.path.abspath(target)
    say = say or (lambda message: print(message, file=sys.stderr))
    messages = []
    for path in sorted(glob.glob(glob.escape(target) + ".tmp-*") + glob.glob(glob.escape(target) + ".old-*")):
        tag, _, pid = path[len(target) + 1:].partition("-")
        if tag not in ("tmp", "old") or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if tag == "old" and not os.path.lexists(target):
            os.rename(path, target)
            messages.append(f"{target} restored from {os.path.basename(path)}, moved aside by an interrupted save.")
        else:
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
            messages.append(f"Removed {path}, left by an interrupted {'write' if tag == 'tmp' else 'save'} "
                            f"(process {pid}).")
    for message in messages:
        say(message)
    return messages


def clean_run_leftovers(run_dir: str, say=None) -> list[str]:
    """`clean_leftovers` for a run folder: ``_tmp-checkpoint-N/`` (a checkpoint whose save was interrupted: never
    resumed from), and the leftovers beside each ``checkpoint-N`` and beside the run folder (the final output)."""
    say = say or (lambda message: print(message, file=sys.stderr))
    messages = []
    if os.path.isdir(run_dir):
        for name in sorted(os.listdir(run_dir)):
            path = os.path.join(run_dir, name)
            if name.startswith("_tmp-checkpoint-") and os.path.isdir(path):
                shutil.rmtree(path)
                messages.append(f"Removed {path}, an incomplete checkpoint left by an interrupted save.")
                say(messages[-1])
        bases = {re.split(r"\.(?:old|tmp)-", name)[0] for name in os.listdir(run_dir) if name.startswith("checkpoint-")}
        for name in sorted(bases):
            messages += clean_leftovers(os.path.join(run_dir, name), say)
    messages += clean_leftovers(run_dir, say)
    return messages


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
    except BaseException as error:
        full = disk_full(error, target) if isinstance(error, Exception) else None
        shutil.rmtree(staging, ignore_errors=True)
        if full is not None:
            raise full from error
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
# What a checkpoint must hold to be resumed from
# ----------------------------------------------------------------------------------------------------------------

RUN_STATE_KEY = "BALoraRun"  # the loss and token counts a resumed run continues, in trainer_state.json


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from exactly (missing or damaged file); one line naming the file."""


def _damaged(path: str) -> str | None:
    """Why the file at ``path`` cannot be read back (truncated or not in its format), or None. safetensors: its
    header must cover the file; torch's ``.pt``/``.pth``/``.bin`` (zip archives): a central directory whose members
    fit in the file."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                f.keys()
        elif path.endswith((".pt", ".pth", ".bin")):
            if zipfile.is_zipfile(path):
                # The central directory sits at the end, so a truncated archive has none; its members must also fit
                # the file. Cheap (no data read): an optimizer.pt of full fine-tuning is tens of GB.
                size = os.path.getsize(path)
                with zipfile.ZipFile(path) as archive:
                    short = [i.filename for i in archive.infolist() if i.header_offset + i.compress_size > size]
                if short:
                    return f"its member {short[0]} runs past the end of the file"
            else:  # torch.save has written zip archives since torch 1.6; a legacy file must at least load
                try:
                    torch.load(path, map_location="cpu", weights_only=False)
                except Exception:  # noqa: BLE001
                    return "not a complete torch.save archive"
        elif path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
    except Exception as error:  # noqa: BLE001 - any failure to read it is the answer
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    return None


def _first(folder: str, names) -> str | None:
    return next((os.path.join(folder, n) for n in names if os.path.exists(os.path.join(folder, n))), None)


def checkpoint_problems(checkpoint: str, peft: bool, reference: str | None, deepspeed: bool = False,
                        fsdp: bool = False) -> tuple[list[str], list[str]]:
    """``(missing, damaged)``: what of a resumable checkpoint is absent, and which present files cannot be read.

    A resumable checkpoint holds the trainer state, the trained weights (the adapter, or the model), the optimizer
    and the learning-rate scheduler (the Trainer's own files; DeepSpeed keeps the optimizer in ``global_step*/``,
    FSDP in ``optimizer_0/``) and, for an adapter that starts non-zero, the initial adapter (``reference``:
    ``balora_reference/`` or the plain file). transformers checks none of these: with ``balora_reference/`` present
    it treats a checkpoint without its adapter as valid and trains on from the initial adapter; without
    ``optimizer.pt`` it restarts the learning-rate schedule.
    """
    missing, damaged = [], []

    def need(label: str, names):
        path = _first(checkpoint, names)
        if path is None:
            missing.append(f"{label} ({os.path.join(checkpoint, names[0])})")
        elif os.path.isfile(path):
            why = _damaged(path)
            if why:
                damaged.append(f"{path} ({why})")

    need("trainer state", [TRAINER_STATE_FILE])
    if peft:
        need("adapter", [ADAPTER_WEIGHTS_FILE, ADAPTER_BIN_FILE])
    elif not deepspeed and not fsdp:
        need("model weights", ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                               "pytorch_model.bin.index.json"])
    if deepspeed:
        if not glob.glob(os.path.join(glob.escape(checkpoint), "global_step*")):
            missing.append(f"DeepSpeed state ({os.path.join(checkpoint, 'global_step*')})")
    else:
        need("optimizer", ["optimizer.pt", "optimizer.bin", "optimizer_0"])
        need("scheduler", ["scheduler.pt"])
    if reference == REFERENCE_ADAPTER:
        need("initial adapter", [os.path.join(REFERENCE_ADAPTER, ADAPTER_WEIGHTS_FILE),
                                 os.path.join(REFERENCE_ADAPTER, ADAPTER_BIN_FILE)])
        need("initial adapter config", [os.path.join(REFERENCE_ADAPTER, ADAPTER_CONFIG_FILE)])
    elif reference == INITIAL_ADAPTER_FILE:
        need("initial adapter", [INITIAL_ADAPTER_FILE])
    return missing, damaged


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
    from peft.utils.integrations import gather_params_ctx
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
        with gather_params_ctx(weight, modifier_rank=0):  # a ZeRO-3 weight partitioned at load: whole here
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
        if is_peft_model(model) and (rewrites_base_weights(model.peft_config[model.active_adapter])
                                     or not adapter_is_zero(model)):
            # The adapter as it starts (before any step), kept on the CPU (r·(in + out) numbers per layer): what the
            # PiSSA -> LoRA conversion subtracts and what a checkpoint's `balora_reference/` holds. Never read back
            # from the state dict the Trainer hands `_save`: under ZeRO-3 that is consolidated without the frozen
            # parameters, and PEFT then returns the *trained* adapter under the reference's name.
            # A pre-initialised PiSSA (balora_trl.pissa_init) brings (B₀, A₀) exactly as saved.
            preset = getattr(model, "balora_initial_state", None)
            self._balora_initial_state = (_adapter_state(model, model.active_adapter) if preset is None
                                          else {k: v.detach().to("cpu") for k, v in preset.items()})
        self._balora_resumed_loss = False
        self.add_callback(_RunStateCallback(self))

    # -- what the conversion starts from --------------------------------------------------------------------------

    def _standard_adapter(self, model, state_dict=None):
        """``(config, state, info)`` of the trained adapter as a standard adapter for the original base."""
        name = _trained_adapter(model)
        config = copy.deepcopy(model.peft_config[name])
        state = _adapter_state(model, name, state_dict)
        info = ExportInfo(kind="lora_adapter", init_lora_weights=config.init_lora_weights, trained_rank=config.r,
                          saved_rank=config.r, lora_alpha=config.lora_alpha, base_model=_base_model_id(model),
                          target_modules=sorted(config.target_modules) if isinstance(config.target_modules, set)
                          else config.target_modules)
        info.notes.extend(getattr(model, "balora_export_notes", ()))  # e.g. balora_trl.pissa_init's
        if rewrites_base_weights(config):
            initial = self._balora_initial_state
            if initial is None:
                raise RuntimeError(f"No initial adapter is known for this {config.init_lora_weights} adapter; it "
                                   "cannot be converted to a LoRA for the original base.")
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
                if is_peft_model(model) and self._balora_initial_state is not None:
                    self._write_initial_adapter(output_dir, model)
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

    def _write_initial_adapter(self, output_dir: str, model) -> None:
        """The checkpoint's copy of the initial adapter, always from the tensors kept since start-up.

        PEFT wrote ``balora_reference/`` from the state dict the Trainer passed; under ZeRO-3 that dict lacks the
        frozen adapter and PEFT falls back to the trained one, so its weights file is replaced here.
        """
        if REFERENCE_ADAPTER in model.peft_config:
            folder = os.path.join(output_dir, REFERENCE_ADAPTER)
            os.makedirs(folder, exist_ok=True)
            if os.path.isfile(os.path.join(folder, ADAPTER_BIN_FILE)):
                os.remove(os.path.join(folder, ADAPTER_BIN_FILE))
            _save_safetensors(self._balora_initial_state, os.path.join(folder, ADAPTER_WEIGHTS_FILE))
            if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG_FILE)):
                model.peft_config[REFERENCE_ADAPTER].save_pretrained(folder)
        elif rewrites_base_weights(model.peft_config[_trained_adapter(model)]):
            _save_safetensors(self._balora_initial_state, os.path.join(output_dir, INITIAL_ADAPTER_FILE))

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
                residual = rewrites_base_weights(config)
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
        self.state.stateful_callbacks[RUN_STATE_KEY] = self._run_state()  # every rank: _run_state gathers
        self._balora_saving_checkpoint = True
        self._get_output_dir = lambda trial=None: staging_root  # the Trainer joins the folder name to this
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:  # nothing half-written stays behind (a full disk would stay full)
            full = disk_full(error, run_dir)
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            if full is not None:
                raise full from error
            raise
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
        if config is None or not rewrites_base_weights(config):
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
        self._restore_initial_adapter(resume_from_checkpoint, peft_model, load_reference=False)

    def _restore_initial_adapter(self, checkpoint: str, peft_model, load_reference: bool) -> None:
        """Make the checkpoint's initial adapter this run's: the conversion's B₀A₀, the residual base (rebased when
        a randomised PiSSA init came out differently) and, with ``load_reference``, the reference adapter's weights
        (the Trainer's adapter loading does that otherwise)."""
        restored = initial_adapter_from_dir(checkpoint)
        fresh = self._balora_initial_state
        if restored is None or fresh is None:
            return
        restored = {k: v.to("cpu") for k, v in restored.items()}
        trained = _trained_adapter(peft_model)
        if rewrites_base_weights(peft_model.peft_config[trained]):
            _rebase_residual(peft_model, trained, fresh, restored)
        if load_reference and REFERENCE_ADAPTER in peft_model.peft_config:
            from peft import set_peft_model_state_dict

            with torch.no_grad():
                set_peft_model_state_dict(peft_model, restored, adapter_name=REFERENCE_ADAPTER)
        self._balora_initial_state = restored

    def resume_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint folder ``resume_from_checkpoint`` names (``True``: the last of ``output_dir``), checked.

        Raises `CheckpointError` (one line, naming the folder or file) when there is no such folder, when a file is
        damaged (truncated), and when a part is missing — the adapter, optimizer, scheduler or initial adapter —
        unless ``args.resume_incomplete_checkpoint`` is set: those parts then start afresh, each named in a warning.
        The trainer state is always required (the Trainer reads it unconditionally)."""
        if resume_from_checkpoint in (None, False, "", "false", "False"):
            return None
        from transformers.trainer_utils import get_last_checkpoint

        if resume_from_checkpoint is True or str(resume_from_checkpoint).lower() == "true":
            run_dir = self.args.output_dir
            checkpoint = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
            if checkpoint is None:
                raise CheckpointError(f"resume_from_checkpoint=true, but {os.path.abspath(run_dir)} holds no "
                                      "checkpoint-N folder to resume from.")
        else:
            checkpoint = str(resume_from_checkpoint)
            if not os.path.isdir(checkpoint):
                raise CheckpointError(f"resume_from_checkpoint: {checkpoint} "
                                      f"{'is a file, not' if os.path.exists(checkpoint) else 'is not'} a checkpoint "
                                      "folder.")
        model = self.accelerator.unwrap_model(self.model)
        peft = is_peft_model(model)
        reference = None
        if peft and self._balora_initial_state is not None:
            reference = (REFERENCE_ADAPTER if REFERENCE_ADAPTER in model.peft_config
                         else INITIAL_ADAPTER_FILE if rewrites_base_weights(model.peft_config[_trained_adapter(model)])
                         else None)
        missing, damaged = checkpoint_problems(checkpoint, peft, reference,
                                               deepspeed=getattr(self, "is_deepspeed_enabled", False),
                                               fsdp=getattr(self, "is_fsdp_enabled", False))
        if damaged:
            raise CheckpointError(f"Cannot resume from {checkpoint}: {damaged[0]} is damaged (truncated by an "
                                  "interrupted copy or a full disk?); resume from another checkpoint.")
        if any(m.startswith("trainer state") for m in missing):
            raise CheckpointError(f"Cannot resume from {checkpoint}: it has no {TRAINER_STATE_FILE} (the step, "
                                  "the log history and the λ state); resume from another checkpoint.")
        if missing and not getattr(self.args, "resume_incomplete_checkpoint", False):
            raise CheckpointError(f"Cannot resume exactly from {checkpoint}: missing {'; '.join(missing)}. Resume "
                                  "from another checkpoint, or set resume_incomplete_checkpoint=true to continue "
                                  "with the missing part(s) started afresh.")
        warned = self.__dict__.setdefault("_balora_resume_warned", set())
        for part in missing:
            message = (f"Resuming from the incomplete checkpoint {checkpoint} (resume_incomplete_checkpoint): "
                       f"missing {part}, started afresh.")
            if message not in warned:
                warned.add(message)
                warnings.warn(message, stacklevel=2)
        return checkpoint

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Train, resuming exactly from a checked checkpoint (`resume_checkpoint`); rank 0 first removes what an
        interrupted earlier run left in ``output_dir`` (`clean_run_leftovers`).

        DeepSpeed resumes from its own files, which exclude frozen parameters, and never calls
        ``_load_from_checkpoint``: the checkpoint's initial adapter is restored here, before the model is wrapped."""
        checkpoint = self.resume_checkpoint(resume_from_checkpoint)
        if self.args.should_save:
            clean_run_leftovers(self.args.output_dir)
        if checkpoint and getattr(self, "is_deepspeed_enabled", False):
            model = self.accelerator.unwrap_model(self.model)
            if is_peft_model(model):
                self._restore_initial_adapter(checkpoint, model, load_reference=True)
        result = super().train(checkpoint, *args, **kwargs)
        if self._balora_resumed_loss and "train_loss" in getattr(result, "metrics", {}):
            from transformers.trainer_utils import TrainOutput

            result = TrainOutput(result.global_step, result.metrics["train_loss"], result.metrics)
        return result

    # -- what transformers does not carry over a resume -------------------------------------------------------------

    def _run_state(self) -> dict:
        """The running sums a resumed run must continue (transformers and TRL restart them at each ``train()``):
        the logged loss sum (``train_loss``), the loss not logged yet and the last logged step (the next ``loss``
        record's window), TRL's ``num_tokens`` and the metric window not logged yet. The pending loss is each
        rank's partial sum averaged over ranks, as the Trainer's next log averages it (a collective: every rank)."""
        from transformers.trainer_pt_utils import nested_gather

        pending = getattr(self, "_tr_loss", None)
        pending = 0.0 if pending is None else nested_gather(pending.detach().clone(), self.args.parallel_mode)
        pending = pending if isinstance(pending, float) else pending.float().mean().item()
        window = getattr(self, "_metrics", {}).get("train", {})
        return {"total_loss": getattr(self, "_total_loss_scalar", 0.0), "pending_loss": pending,
                "last_logged_step": getattr(self, "_globalstep_last_logged", self.state.global_step),
                "num_tokens": getattr(self, "_total_train_tokens", None),
                "metrics_window": {k: list(v) for k, v in window.items()}}

    def _restore_run_state(self, saved: dict) -> None:
        self._total_loss_scalar = float(saved.get("total_loss", 0.0))
        if getattr(self, "_tr_loss", None) is not None:
            self._tr_loss += saved.get("pending_loss", 0.0)
        self._globalstep_last_logged = saved.get("last_logged_step", self.state.global_step)
        if saved.get("num_tokens") is not None and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = saved["num_tokens"]
        if hasattr(self, "_metrics") and saved.get("metrics_window") is not None:
            self._metrics["train"].clear()
            self._metrics["train"].update({k: list(v) for k, v in saved["metrics_window"].items()})
        self._balora_resumed_loss = True

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The run's ``train_loss`` over all its steps, also when it was resumed (the Trainer divides the loss of
        this ``train()`` call's steps by their count; `_restore_run_state` put the earlier ones in the sum)."""
        if "train_loss" in logs and self._balora_resumed_loss and self.state.global_step > 0:
            logs["train_loss"] = self._total_loss_scalar / self.state.global_step
        super().log(logs, *args, **kwargs)

    def _run_epoch(self, *args, **kwargs):
        """No step past ``max_steps``: resumed from the last checkpoint of a ``max_steps`` run (mid-epoch), the
        Trainer's epoch loop would run one step before looking at ``max_steps`` (global_step 13 of 12)."""
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            self.model.train()  # as after a step: TRL's final log merges the train metrics in train mode only
            return None
        return super()._run_epoch(*args, **kwargs)


class _RunStateCallback(TrainerCallback):
    """Puts the checkpoint's running sums back (`BALoraSaveMixin._restore_run_state`) once the Trainer has reset
    them, at the start of a resumed ``train()``."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        saved = state.stateful_callbacks.get(RUN_STATE_KEY)
        self.trainer._balora_resumed_loss = False
        if saved and state.global_step > 0:
            self.trainer._restore_run_state(saved)
