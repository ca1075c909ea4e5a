"""Models that are not the one being trained are built outside DeepSpeed ZeRO-3's collective initialisation.

Once ``accelerate launch`` has chosen DeepSpeed ZeRO-3, the training arguments install transformers' DeepSpeed
config for the whole process (accelerate's ``set_deepspeed_weakref``, whatever ``zero3_init_flag`` says). From then
on every ``from_config`` / ``from_pretrained`` runs under ``deepspeed.zero.Init``, which partitions each parameter as
it is created and broadcasts among all ranks. That is right for the model being trained, which every rank loads
together. It is wrong for two other kinds of model:

* one built on a single rank (the embedded default's base, built and saved by rank 0 while the other ranks wait in
  a barrier): rank 0 waits in a broadcast no other rank joins, and the job hangs with no error;
* a weightless meta-device skeleton used to check an adapter's shapes (``merging.validate_base``,
  ``pissa_init.resolve_targets``): ZeRO-3's initialisation cannot partition a meta tensor ("Cannot copy out of meta
  tensor; no data!").

:func:`outside_zero3_init` removes transformers' DeepSpeed config for such a build and puts it back after; the
models built inside are plain local models. transformers has no public switch for this, so the module-level
reference it keeps (``_hf_deepspeed_config_weak_ref``) is read and restored through its own set/unset functions.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def outside_zero3_init():
    """Within the block, transformers sees no DeepSpeed config: ``is_deepspeed_zero3_enabled()`` is False and models
    are built as plain local modules on this process alone. A no-op without DeepSpeed."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = None if ref is None else ref()
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def meta_skeleton(config, trust_remote_code: bool = False):
    """The causal LM of ``config`` on the meta device (no weight allocated or read), outside ZeRO-3's init."""
    from transformers import AutoModelForCausalLM

    with outside_zero3_init(), torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
