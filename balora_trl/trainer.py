"""``BALoraSFTTrainer``: TRL's ``SFTTrainer`` with BA-LoRA's three regularisers (paper eqs. 10-13).

    L = Σ_t nll_t / D  +  λ1 · Σ_t KL(p_ref,t ‖ p_θ,t) / D  +  λ2 · Σ_t (−H(p_θ,t)) / D  +  λ3 · (n / D) · (−r_k(Z))

t runs over the n positions of this micro-batch whose next token is a trained response token (the positions
TRL's cross-entropy uses: hidden state t predicts label t+1). D is TRL's ``num_items_in_batch``: those positions
counted over every micro-batch of the optimizer step (and every rank), or n when the model takes no loss kwargs.
Dividing token sums by D is what makes KL and entropy — like the SFT term — identical for batch 2 × accumulation 4
and batch 8 × accumulation 1. r_k(Z) = Σ_{i≤k}σ_i/Σσ of this micro-batch's [n, V] response-logit matrix Z is a
statistic of a whole matrix, not a token sum; it enters with weight n/D, so the weights add to 1 over an optimizer
step and a step made of copies of one micro-batch gives exactly that batch's term.

The forward pass is patched (on top of TRL's fused-LM-head patch) so that ``model(**inputs, balora_head=fn)`` runs
the backbone, keeps only the response positions' final hidden states [n, d], and evaluates ``fn`` on them *inside*
the forward, where FSDP / ZeRO-3 have the LM-head weight gathered. No [batch, seq, V] logits are ever built.
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput
from trl import SFTTrainer

from . import losses
from .config import BALoraConfig
from .export import BALoraSaveMixin
from .reference import Reference, build_reference, is_peft_model

try:  # gathers a ZeRO-3-partitioned head for the duration of the head computation
    from trl.trainer.utils import maybe_gather_lm_head_ctx
except ImportError:  # pragma: no cover
    from contextlib import nullcontext as maybe_gather_lm_head_ctx  # type: ignore[assignment]


@dataclass
class BALoraHeadOutput(ModelOutput):
    """What the patched forward returns: per-micro-batch sums over the response positions."""

    num_tokens: torch.Tensor | None = None
    nll_sum: torch.Tensor | None = None
    kl_sum: torch.Tensor | None = None
    entropy_sum: torch.Tensor | None = None
    svd_ratio: torch.Tensor | None = None
    hidden: torch.Tensor | None = None  # reference pass: response-position hidden states [n, d]
    ref_logits: torch.Tensor | None = None  # reference pass with its own head: [n, V]


def _logit_transform(config) -> tuple[float, float | None]:
    """(scale, soft-cap) the model applies after its linear head (Cohere/Granite scaling, Gemma-2 soft-capping)."""
    text_config = config.get_text_config()
    scale = getattr(text_config, "logit_scale", None)
    if scale is None and getattr(text_config, "logits_scaling", None):
        scale = 1.0 / text_config.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text_config, "final_logit_softcapping", None)


def head_parameters(module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's (weight, bias) as plain tensors (FSDP2 shards them as DTensors)."""
    head = module.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


def head_logits(module, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own next-token logits for ``hidden`` [n, d], in float32 (plain path)."""
    weight, bias = head_parameters(module)
    logits = losses.project(hidden, weight, bias)
    scale, softcap = _logit_transform(module.config)
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _gathered_head(module):
    """The LM head's parameters gathered for the block (ZeRO-3 partitions them outside their own forward)."""
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


class BALoraSFTTrainer(BALoraSaveMixin, SFTTrainer):
    """[`~trl.SFTTrainer`] with the BA-LoRA regularisers. Same constructor, plus:

    Args:
        ref_model (`PreTrainedModel` or `str`, *optional*):
            The pretrained reference for the KL term. By default it needs no second model: the PEFT model with its
            adapter disabled (zero-initialised LoRA) or with a frozen copy of its initial adapter (PiSSA and any
            other non-zero start); for full fine-tuning, a frozen copy of the starting weights.
    """

    _tag_names = ["trl", "sft", "ba-lora"]
    _name = "BA-LoRA SFT"

    def __init__(self, model, args: BALoraConfig | None = None, *pargs, ref_model=None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = BALoraConfig(f"{str(name).rstrip('/').split('/')[-1]}-BA-LoRA")
        elif not isinstance(args, BALoraConfig):
            raise TypeError(f"`args` must be a BALoraConfig (an SFTConfig with the BA-LoRA fields), got {type(args).__name__}.")
        super().__init__(model, args, *pargs, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("BA-LoRA does not yet add the MoE router auxiliary loss; set `router_aux_loss_coef=0`.")
        if self.compute_loss_func is not None or self.args.loss_type != "nll" or self.args.label_smoothing_factor:
            raise ValueError("BA-LoRA's task term is TRL's token NLL: `compute_loss_func`, `loss_type` other than "
                             "'nll' and label smoothing are not supported.")

        needs_reference = self.args.lambda_consistency > 0
        self.reference: Reference | None = None
        if needs_reference or ref_model is not None or is_peft_model(self.model):
            # With PEFT the reference is at most a copy of the (small) initial adapter; it is also what the
            # PiSSA -> LoRA conversion at save time starts from, so it is kept even when λ1 = 0.
            self.reference = build_reference(self.model, ref_model, self.args.model_init_kwargs)
            if self.reference.holds_second_model:
                install_head_forward(self.reference.ref_model)  # on the inner module, before any wrapping
                self.reference.ref_model = self._prepare_reference_model(self.reference.ref_model)
        install_head_forward(self._causal_lm())
        self._path = self._choose_head_path()
        self._on_svd_fallback = losses.svd_fallback_warner(lambda: self.state.global_step)

    # ----------------------------------------------------------------------------------------------------------
    # set-up helpers
    # ----------------------------------------------------------------------------------------------------------

    def _prepare_reference_model(self, ref_model):
        """Place a separate reference like TRL's trainers do: sharded under ZeRO-3 / FSDP, else on the device."""
        if self.is_deepspeed_enabled:
            from trl.models import prepare_deepspeed

            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models import prepare_fsdp

            return prepare_fsdp(ref_model, self.accelerator)
        return ref_model.to(self.accelerator.device)

    def _causal_lm(self):
        """The transformers model (inside the PEFT wrapper, if any) whose forward is patched."""
        return self.model.get_base_model() if is_peft_model(self.model) else self.model

    def _shares_head(self) -> bool:
        """Reference and policy use the very same frozen LM head, so the reference only needs hidden states."""
        head = self._causal_lm().get_output_embeddings()
        return (self.reference is not None and not self.reference.holds_second_model
                and not head.weight.requires_grad)

    def _choose_head_path(self) -> str:
        wanted = self.args.head_path
        if wanted == "plain":
            return "plain"
        try:
            from .fused import head_supports_fused
        except ImportError:
            if wanted == "fused":
                raise ValueError("`head_path='fused'` needs balora_trl.fused, which failed to import.") from None
            return "plain"
        ok, reason = head_supports_fused(self._causal_lm())
        if ok and self.args.lambda_consistency > 0 and not self._shares_head():
            ok, reason = False, "the reference has its own LM head (separate ref model or trained head)"
        if not ok:
            if wanted == "fused":
                raise ValueError(f"`head_path='fused'` is not possible for this model: {reason}.")
            warnings.warn(f"BA-LoRA uses the plain LM-head path (materialised response logits): {reason}.", stacklevel=3)
            return "plain"
        return "fused"

    # ----------------------------------------------------------------------------------------------------------
    # the head computations (run inside the patched forward)
    # ----------------------------------------------------------------------------------------------------------

    def _reference_head(self, module, hidden, labels):
        if self._shares_head():  # the policy pass recomputes reference logits from [n, d] with the shared head
            return BALoraHeadOutput(hidden=hidden.detach())
        with _gathered_head(module):
            return BALoraHeadOutput(ref_logits=head_logits(module, hidden).detach())

    def _svd_term(self, compute, *args) -> torch.Tensor:
        """r_k by ``compute``, with the Gram-eigenvalue fallback of :func:`losses.svd_ratio_robust` (warned once)."""
        return losses.svd_ratio_robust(compute, args, self.args.svd_top_k, self._on_svd_fallback)

    def _policy_head(self, ref: BALoraHeadOutput | None):
        cfg = self.args
        want_entropy, want_svd = cfg.lambda_diversity > 0, cfg.lambda_svd > 0

        def head(module, hidden, labels):
            out = BALoraHeadOutput(num_tokens=labels.new_tensor(labels.numel()))
            with _gathered_head(module):
                if self._path == "fused":
                    from .fused import fused_head_terms, svd_ratio_frozen_head

                    weight, bias = head_parameters(module)
                    # compute_loss weighs the three sums by (1, λ1, −λ2) (times a common 1/D): announcing it lets
                    # the fused backward keep one gradient vector per token instead of three.
                    nll, kl, entropy = fused_head_terms(
                        hidden, weight, bias, labels, ref_hidden=None if ref is None else ref.hidden,
                        temperature=cfg.kl_temperature, entropy=want_entropy,
                        grad_weights=(1.0, cfg.lambda_consistency, -cfg.lambda_diversity),
                    )
                    if want_svd and labels.numel() > 0:
                        out.svd_ratio = self._svd_term(svd_ratio_frozen_head, hidden, weight, bias)
                else:
                    logits = head_logits(module, hidden)
                    ref_logits = None
                    if ref is not None:
                        ref_logits = ref.ref_logits if ref.ref_logits is not None else head_logits(module, ref.hidden)
                    nll = losses.token_nll(logits, labels)
                    kl = None if ref_logits is None else losses.token_kl(ref_logits, logits, cfg.kl_temperature)
                    entropy = losses.token_entropy(logits) if want_entropy else None
                    if want_svd and labels.numel() > 0:
                        out.svd_ratio = self._svd_term(losses.svd_ratio, logits)
            out.nll_sum = nll.sum()
            out.kl_sum = None if kl is None else kl.sum()
            out.entropy_sum = None if entropy is None else entropy.sum()
            return out

        return head

    # ----------------------------------------------------------------------------------------------------------
    # the loss
    # ----------------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        cfg = self.args
        mode = "train" if self.model.training else "eval"
        inputs = {k: v for k, v in inputs.items() if k != "use_cache"}

        ref = None
        if cfg.lambda_consistency > 0:
            with self.reference.activate(self.model):
                ref = self.reference.model(model)(**inputs, balora_head=self._reference_head)
        out = model(**inputs, balora_head=self._policy_head(ref))

        n = out.num_tokens.to(torch.float32)
        denom = n if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=n.device, dtype=torch.float32)
        denom = denom.clamp(min=1)  # a step with no response token adds a finite zero, not 0/0
        sft = out.nll_sum / denom
        terms = {"sft": sft}
        if out.kl_sum is not None:
            terms["kl"] = cfg.lambda_consistency * out.kl_sum / denom
        if out.entropy_sum is not None:
            terms["entropy"] = -cfg.lambda_diversity * out.entropy_sum / denom
        if out.svd_ratio is not None:
            terms["svd"] = -cfg.lambda_svd * out.svd_ratio * (n / denom)
        loss = sum(terms.values())
        # Like TRL: `num_items_in_batch` counts every rank's tokens and DDP averages gradients over ranks.
        if cfg.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        losses.check_finite_loss(loss, terms, self.state.global_step)
        self._record_metrics(mode, out, inputs)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _record_metrics(self, mode: str, out: BALoraHeadOutput, inputs) -> None:
        """Token-weighted means over the micro-batch (gathered over ranks); TRL's `log` averages the window."""
        present = {"sft_loss": out.nll_sum, "kl": out.kl_sum, "entropy": out.entropy_sum}
        names = [k for k, v in present.items() if v is not None]
        stats = torch.stack([out.num_tokens.float()] + [present[k].detach().float() for k in names])
        stats = self.accelerator.gather_for_metrics(stats.unsqueeze(0)).sum(0)
        count = stats[0].item()
        if count > 0:
            for name, value in zip(names, stats[1:].tolist()):
                self._metrics[mode][f"ba_lora/{name}"].append(value / count)
        if out.svd_ratio is not None:
            ratio = self.accelerator.gather_for_metrics(out.svd_ratio.detach().float().reshape(1)).mean()
            self._metrics[mode]["ba_lora/svd_ratio"].append(ratio.item())
        if mode == "train":  # TRL's `num_tokens`: every attended token, prompt included
            mask = inputs.get("attention_mask")
            local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(), device=stats.device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(local.reshape(1)).sum().item())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
