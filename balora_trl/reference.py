"""Where the pretrained distribution p_pretrained (the "reference") comes from, without a second base model.

"Pretrained" means the model *before fine-tuning*. With PEFT that is the base model plus the adapter as it was
at the start:

* ``AdapterDisabled`` — the adapter starts at zero (plain LoRA: B = 0), so base + adapter = base, and the model
  with its adapter layers switched off is the reference. Costs nothing.
* ``InitialAdapter`` — the adapter starts non-zero (PiSSA and OLoRA rewrite the base weights into a residual
  W_res = W − B₀A₀; a resumed or user-supplied adapter is also non-zero). "Adapter disabled" would then be the
  residual model, *not* the pretrained one. The reference is base + a frozen copy of the initial adapter, kept
  as a second PEFT adapter (r·(in + out) numbers per layer; the base weights stay in memory once).
* ``SeparateModel`` — an explicit ``ref_model`` (module or path), or, for full fine-tuning without PEFT, a
  frozen copy made at start (the only case that holds the weights twice: there is no base to share).

Every reference runs in eval mode (no dropout) and under ``torch.no_grad``; it never receives gradients, and
switching to it never changes any parameter's ``requires_grad`` (FSDP / ZeRO-3 register the trainable set once).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from torch import nn

REFERENCE_ADAPTER = "balora_reference"


def is_peft_model(model) -> bool:
    """``model`` is a PEFT model (adapters, a reference adapter to switch to); the trainers and the export use this."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


@contextmanager
def _eval_mode(module: nn.Module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def adapter_is_zero(peft_model) -> bool:
    """True when the active adapter cannot change the model's output yet: every LoRA B (or embedding B) is 0.

    Only LoRA-family layers are inspected; any other tuner type counts as non-zero (safe: the frozen-copy reference
    is correct for every initialisation, the toggle only for a zero one).
    """
    from peft.tuners.lora import LoraLayer

    name = peft_model.active_adapter
    if peft_model.peft_config[name].peft_type.value != "LORA":
        return False
    found = False
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for store in (module.lora_B, getattr(module, "lora_embedding_B", {})):
            if name in store:
                found = True
                weight = store[name].weight if isinstance(store[name], nn.Module) else store[name]
                if torch.count_nonzero(weight.detach()) > 0:
                    return False
    return found


class Reference:
    """Base class: ``activate()`` is a context in which ``model(...)`` is the reference; ``model`` is what to call."""

    kind: str = ""
    holds_second_model = False

    def model(self, policy: nn.Module) -> nn.Module:
        return policy

    @contextmanager
    def activate(self, policy_unwrapped: nn.Module):
        with torch.no_grad(), _eval_mode(policy_unwrapped):
            yield

    def describe(self) -> str:
        return self.kind


class AdapterDisabled(Reference):
    """The adapter switched off: the model's output is the base model's (right when the adapter starts at zero)."""

    kind = "adapter_disabled"

    @contextmanager
    def activate(self, policy_unwrapped):
        """Flip the switch the adapter layers' forward reads (``_disable_adapters``) for the block, then restore it.

        PEFT's ``disable_adapter()`` gives the same outputs but also sets ``requires_grad`` off on every adapter weight
        and back on at exit — every step — and back on even for a weight that was frozen. FSDP's flat parameters and
        ZeRO-3 register the trainable parameters once; flipping the switch alone leaves ``requires_grad`` exactly as
        the optimizer and the distributed wrapper registered it (as :class:`InitialAdapter` does).
        """
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper  # modules_to_save / trainable-token wrappers

        layers = [m for m in policy_unwrapped.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        previous = [m.__dict__.get("_disable_adapters") for m in layers]
        for layer in layers:
            layer._disable_adapters = True
        try:
            with torch.no_grad(), _eval_mode(policy_unwrapped):
                yield
        finally:
            for layer, value in zip(layers, previous):
                if value is None:
                    del layer._disable_adapters  # back to the class default
                else:
                    layer._disable_adapters = value


class InitialAdapter(Reference):
    """A frozen copy of the adapter as it was at construction, activated in place of the trained one."""

    kind = "initial_adapter"

    def __init__(self, peft_model):
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        self.trained_adapter = peft_model.active_adapter
        config = copy.deepcopy(peft_model.peft_config[self.trained_adapter])
        # The copy must not re-run a weight-rewriting initialisation (PiSSA would factor the residual again).
        config.init_lora_weights = False
        config.lora_dropout = 0.0
        config.inference_mode = True
        if REFERENCE_ADAPTER in peft_model.peft_config:
            peft_model.delete_adapter(REFERENCE_ADAPTER)
        peft_model.add_adapter(REFERENCE_ADAPTER, config)
        # A pre-initialised PiSSA (balora_trl.pissa_init) hands over (B₀, A₀) exactly as saved: TRL may already have
        # cast the trainable copy to bf16 (QLoRA), and the reference must stay the original model.
        state = getattr(peft_model, "balora_initial_state", None)
        if state is None:
            state = get_peft_model_state_dict(peft_model, adapter_name=self.trained_adapter)
        set_peft_model_state_dict(peft_model, state, adapter_name=REFERENCE_ADAPTER)
        materialise_meta_adapter(peft_model, state, REFERENCE_ADAPTER)
        # add_adapter leaves the trained adapter active; make sure nothing of the copy is trainable.
        for name, param in peft_model.named_parameters():
            if f".{REFERENCE_ADAPTER}." in name or name.endswith(f".{REFERENCE_ADAPTER}"):
                param.requires_grad_(False)
        peft_model.set_adapter(self.trained_adapter)

    @contextmanager
    def activate(self, policy_unwrapped):
        """Route every adapter layer to the frozen copy for the duration of the block.

        PEFT's ``set_adapter`` would also flip ``requires_grad`` on both adapters, which FSDP's flat parameters and
        DeepSpeed ZeRO-3 do not allow between steps; switching the layers' active-adapter attribute leaves the
        trainable parameters exactly as the optimizer and the distributed wrapper registered them.
        """
        switched = []
        for module in policy_unwrapped.modules():
            active = getattr(module, "_active_adapter", None)
            if active is None or module is policy_unwrapped:
                continue
            names = [active] if isinstance(active, str) else list(active)
            if self.trained_adapter in names:
                switched.append((module, active))
                module._active_adapter = REFERENCE_ADAPTER if isinstance(active, str) else [REFERENCE_ADAPTER]
        try:
            with torch.no_grad(), _eval_mode(policy_unwrapped):
                yield
        finally:
            for module, active in switched:
                module._active_adapter = active


class SeparateModel(Reference):
    kind = "ref_model"
    holds_second_model = True

    def __init__(self, ref_model: nn.Module, kind: str = "ref_model"):
        self.kind = kind
        self.ref_model = ref_model.eval()
        for param in self.ref_model.parameters():
            param.requires_grad_(False)

    def model(self, policy):
        return self.ref_model

    @contextmanager
    def activate(self, policy_unwrapped):
        with torch.no_grad():
            yield


def materialise_meta_adapter(peft_model, state: dict, adapter_name: str) -> None:
    """Give adapter ``adapter_name`` real tensors from ``state`` (PEFT keys without the adapter name) where the base
    was built on the meta device (FSDP's ``cpu_ram_efficient_loading`` on ranks > 0 under transformers 4.x: rank 0
    broadcasts the weights when FSDP wraps, but the adapters and the reference's frozen copy must be real before)."""
    for key, param in peft_model.named_parameters():
        if param.device.type != "meta" or f".{adapter_name}." not in key:
            continue
        file_key = key.replace(f".{adapter_name}.", ".")
        if file_key in state:
            module_name, attr = key.rsplit(".", 1)
            module = peft_model.get_submodule(module_name)
            setattr(module, attr, nn.Parameter(state[file_key].to(param.dtype), requires_grad=param.requires_grad))


def keep_4bit_weights_unpacked(model: nn.Module) -> None:
    """Switch off bitsandbytes' CPU inference repacking of 4-bit weights in ``model``.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight into a CPU-only layout at its first
    forward under ``no_grad`` in eval mode (every reference pass is one) and unpacks it again in ``state_dict()``
    (every checkpoint). That round trip is not lossless: measured on a 4-layer NF4 Llama, the logits moved by up to
    4.3 after one ``state_dict()``, so the reference would drift away from the model it stands for. The plain
    dequantising path is the one training uses anyway. A no-op without bitsandbytes or on a GPU.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def build_reference(model: nn.Module, ref_model: nn.Module | str | None = None, model_init_kwargs=None) -> Reference:
    """Choose how the reference distribution is obtained for ``model`` (called before training starts)."""
    keep_4bit_weights_unpacked(model)
    if ref_model is not None:
        if isinstance(ref_model, str):
            from transformers import AutoModelForCausalLM

            kwargs = dict(model_init_kwargs or {})
            kwargs.setdefault("dtype", next(model.parameters()).dtype)
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model, **kwargs)
        keep_4bit_weights_unpacked(ref_model)
        return SeparateModel(ref_model)
    if is_peft_model(model):
        config = model.peft_config[model.active_adapter]
        if config.is_prompt_learning:
            raise ValueError(
                f"BA-LoRA needs an adapter that acts on the weights (LoRA, PiSSA, DoRA, ...); {config.peft_type.value} "
                "is a prompt-learning method. Pass `ref_model=` explicitly to use it."
            )
        return AdapterDisabled() if adapter_is_zero(model) else InitialAdapter(model)
    # Full fine-tuning: there is no frozen base to share, so keep a frozen copy of the starting weights.
    return SeparateModel(copy.deepcopy(model), kind="frozen_copy")
