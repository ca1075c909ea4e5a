"""The model's LM head, run apart from its forward: its parameters, its logits on given hidden states, the check that
the model's own logits are exactly ``hidden · Wᵀ + b`` (what the fused path computes), and the patched forward that
hands the response positions' hidden states to a head computation inside the model's forward (where FSDP / ZeRO-3
have the head's weight gathered). Used by the trainer (:mod:`balora_trl.trainer`) and by the fused head
(:mod:`balora_trl.fused`), below both.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from . import losses

try:  # gathers a ZeRO-3-partitioned head for the duration of the head computation
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError:  # pragma: no cover
    from contextlib import nullcontext as maybe_gather_lm_head_ctx  # type: ignore[assignment]


def head_parameters(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight, bias) as plain tensors (FSDP2 shards them as DTensors)."""
    head = module.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


class _GivenHidden:
    """Stands in for the backbone inside :func:`run_own_head`: called, it returns the given hidden states as the
    backbone's output; every attribute is the real backbone's (Falcon-H1's forward reads
    ``self.model.lm_head_multiplier``)."""

    def __init__(self, backbone, hidden: torch.Tensor):
        self._backbone, self._hidden, self.calls = backbone, hidden, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return _HiddenOutput(self._hidden)

    def __getattr__(self, name):
        return getattr(self._backbone, name)


class _HiddenOutput:
    """The backbone's output as a causal LM's forward reads it: ``.last_hidden_state`` or ``[0]``; every other field
    (cache, hidden_states, attentions, router_logits, ...) is None."""

    def __init__(self, hidden: torch.Tensor):
        self.last_hidden_state = hidden

    def __getitem__(self, key):
        if key in (0, "last_hidden_state"):
            return self.last_hidden_state
        raise KeyError(key)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def get(self, key, default=None):
        value = getattr(self, key)
        return default if value is None else value


def run_own_head(module, hidden: torch.Tensor, head_call=None) -> torch.Tensor:
    """Logits [n, V] for final hidden states ``hidden`` [n, d] by the model's *own* code: ``type(module).forward``
    with the backbone standing aside (it returns ``hidden``) for the duration of the call.

    So whatever a family does between the backbone and the logits — Gemma-2's soft-cap, Cohere's ``logit_scale``,
    Granite's division and HyperCLOVA X's multiplication by ``logits_scaling``, Falcon-H1's ``lm_head_multiplier``,
    MiniCPM3's pre-head scaling, Muse's ``output_multiplier`` — is what the model itself runs, not a per-family
    re-implementation. The LM head is called as the module it is, so ZeRO-3's and FSDP's hooks gather its weight
    for the forward and again for the backward (and a PEFT-wrapped head routes to the active adapter).
    ``head_call(x)``, when given, replaces the head's forward inside that call. Only instance attributes change
    for the call (no hook is added, the module tree is unchanged), and they are restored on exit.
    """
    prefix = getattr(module, "base_model_prefix", "")
    backbone = module._modules.get(prefix) if prefix else None
    head = module.get_output_embeddings()
    if backbone is None or head is None:
        raise ValueError(f"BA-LoRA cannot run {type(module).__name__}'s LM-head code on hidden states: it has no "
                         f"backbone `{prefix}` or no output embeddings.")
    stub = _GivenHidden(backbone, hidden.unsqueeze(0))
    inputs = []
    own_forward, had_forward = head.forward, "forward" in head.__dict__

    def forward(x):
        inputs.append(x)
        return own_forward(x) if head_call is None else head_call(x)

    module.__dict__[prefix] = stub  # shadows the registered submodule for attribute lookup only
    head.forward = forward
    try:
        out = type(module).forward(module)
    except TypeError as error:  # a forward that insists on its inputs (remote code) cannot be driven this way
        raise ValueError(f"BA-LoRA cannot run {type(module).__name__}'s LM-head code on hidden states: its forward "
                         f"needs arguments ({error}).") from error
    finally:
        del module.__dict__[prefix]
        if had_forward:
            head.forward = own_forward
        else:
            del head.forward
    logits = out[0] if isinstance(out, tuple) else getattr(out, "logits", None)
    if stub.calls != 1 or len(inputs) != 1 or logits is None or tuple(logits.shape[:2]) != (1, hidden.shape[0]):
        raise ValueError(f"BA-LoRA cannot run {type(module).__name__}'s LM-head code on hidden states: its forward "
                         "does not map the backbone's output to logits through its output embeddings once.")
    return logits[0]


def head_logits(module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own next-token logits for ``hidden`` [n, d], in float32 (plain path; :func:`run_own_head`).

    A plain ``nn.Linear`` head is evaluated as ``hidden · Wᵀ + b`` in float32 inside its own call, so the family's
    transform then runs on float32 logits too; any other head (LoRA on the head, ``modules_to_save``, a quantised
    layer, a head already hooked by accelerate's device map) runs its own forward and its output is upcast.
    """
    head = module.get_output_embeddings()
    if type(head) is torch.nn.Linear and "forward" not in head.__dict__:
        logits = run_own_head(module, hidden if hidden.dtype == torch.float64 else hidden.float(),
                              lambda x: losses.project(x, *head_parameters(module)))
    else:
        logits = run_own_head(module, hidden)
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def own_logits_are_head_output(module) -> tuple[bool, str]:
    """(True, "") when the model's forward feeds the backbone's output to its LM head unchanged and returns the
    head's output unchanged — the logits are ``hidden · Wᵀ + b``, what the fused path computes. Otherwise (False,
    reason). Probed with :func:`run_own_head`: a head that records its input and returns a known tensor spanning
    ±60 (beyond any soft-cap), so no weight is read (a ZeRO-3-partitioned head is fine)."""
    head = module.get_output_embeddings()
    d, vocab = head.in_features, head.out_features
    device = head.weight.device if head.weight.device.type != "meta" else torch.device("cpu")
    hidden = torch.linspace(-2.0, 2.0, 3 * d, device=device).reshape(3, d)
    known = torch.linspace(-60.0, 60.0, 3 * vocab, device=device).reshape(1, 3, vocab)
    seen = []

    def head_call(x):
        seen.append(x)
        return known

    try:
        with torch.no_grad():
            logits = run_own_head(module, hidden, head_call)
    except Exception as error:  # noqa: BLE001 - any failure means the fused path cannot stand in for the forward
        return False, f"its forward could not be run on given hidden states ({type(error).__name__}: {error})"
    if not torch.equal(seen[0].reshape(hidden.shape), hidden):
        return False, "the model's forward transforms the hidden states before its LM head"
    if not torch.equal(logits, known[0]):
        return False, "the model's forward transforms its LM head's output (scaling or soft-capping)"
    return True, ""


def _gathered_head(module, fused: bool = True):
    """The LM head's parameters gathered for the block, for the fused path, which reads the weight directly (ZeRO-3
    partitions it outside the head's own forward). The plain path needs nothing: :func:`head_logits` calls the head
    as a module, whose own ZeRO-3 hooks gather the weight for the forward and again for the backward (a weight
    gathered here would be released before the backward)."""
    if not fused:
        return contextlib.nullcontext()
    head = module.get_output_embeddings()
    return maybe_gather_lm_head_ctx(*[p for p in (head.weight, head.bias) if p is not None])


def install_head_forward(model) -> None:
    """Let ``model(..., labels=..., balora_head=fn)`` return ``fn(model, hidden[n, d], labels[n])``.

    Without ``balora_head`` the forward is the previous one (TRL's patch, or the model's own), so generation and
    TRL's code paths are unchanged. Installed once per model instance.
    """
    if getattr(model, "_balora_head_forward", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, balora_head=None, **kwargs):
        if balora_head is None:
            return previous(*args, **kwargs)
        labels = kwargs.pop("labels")
        shift_labels = kwargs.pop("shift_labels", None)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = self.get_output_embeddings()
        labels = labels.to(head.weight.device)
        mask = labels != -100
        return balora_head(self, hidden.to(head.weight.device)[mask], labels[mask])

    model.forward = types.MethodType(forward, model)
    model._balora_head_forward = True
