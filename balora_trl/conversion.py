"""PiSSA / OLoRA -> LoRA: adapters trained on a residual base as standard adapters for the original base.

PiSSA and OLoRA rewrite each targeted base weight into a residual W_res = W − s·B₀A₀ and train the adapter on it.
A checkpoint keeps that form (it resumes exactly) with the frozen initial adapter (B₀, A₀) beside it, in
``balora_reference/`` or :data:`INITIAL_ADAPTER_FILE`. The form the world loads is a LoRA delta against the
*original* weights, ΔW = s·(BA − B₀A₀) = s·[B | −B₀]·[A ; A₀]: a LoRA of rank 2r (α doubled, so s is unchanged).

This module holds the adapter file names, the conversion and the adapter files' reading and writing; the trainer's
save path (:mod:`balora_trl.checkpoints`) and ``balora merge`` (:mod:`balora_trl.merging`) both use it.
"""

from __future__ import annotations

import copy
import math
import os

import torch

from .reference import REFERENCE_ADAPTER

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

    DoRA converts the same way: its output m·V/‖V‖_c depends on the adapted weight V = W_res + s·BA only, which
    the rank-2r delta reproduces on the original base (V = W + s·(BA − B₀A₀)); the trained magnitude m is kept.
    """
    if getattr(config, "peft_type", None) is not None and str(getattr(config.peft_type, "value", config.peft_type)) != "LORA":
        raise ValueError(f"Only LoRA adapters can be converted to a LoRA delta, not {config.peft_type}.")
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


def unreadable_weights(path: str, error: BaseException) -> ValueError:
    """The one-line user error for a weights file that cannot be parsed (a cut-off download or copy, a wrong file)."""
    kind = "safetensors" if path.endswith(".safetensors") else "PyTorch weights"
    return ValueError(f"Cannot read {path}: it is probably truncated or not a {kind} file ({error}).")


def _load_state(path: str) -> dict:
    if path.endswith(".safetensors"):
        import safetensors.torch
        from safetensors import SafetensorError

        try:
            return safetensors.torch.load_file(path, device="cpu")
        except SafetensorError as error:
            raise unreadable_weights(path, error) from error
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise unreadable_weights(path, error) from error


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
