"""``BALoraSFTTrainer``: TRL's ``SFTTrainer`` with BA-LoRA's three regularisers (paper eqs. 10-13).

    L = Σ_t nll_t / D  +  λ1 · Σ_t KL(p_ref,t ‖ p_θ,t) / D  +  λ2 · Σ_t (−H(p_θ,t)) / D  +  λ3 · (n / D) · (−r_k(Z))

t runs over the n positions of this micro-batch whose next token is a trained response token (the positions
TRL's cross-entropy uses: hidden state t predicts label t+1; for conversations with ``assistant_only_loss`` the
tokens of every assistant turn, read off the same ``labels``, so the terms cover exactly what the loss covers).
D is TRL's ``num_items_in_batch``: those positions counted over every micro-batch of the optimizer step (and every
rank), or n when the model takes no loss kwargs.
Dividing token sums by D is what makes KL and entropy — like the SFT term — identical for batch 2 × accumulation 4
and batch 8 × accumulation 1. r_k(Z) = Σ_{i≤k}σ_i/Σσ of this micro-batch's [n, V] response-logit matrix Z is a
statistic of a whole matrix, not a token sum; it enters with weight n/D, so the weights add to 1 over an optimizer
step and a step made of copies of one micro-batch gives exactly that batch's term.

With ``consistency_positions="label_consistent"`` (our extension) the KL sum runs only over the positions where the
reference's top-1 token is the label (still divided by D); ``ba_lora/anchored_fraction`` logs their share. The
KL-budget controller (``kl_target``) still measures the mean KL over every response position: the drift it bounds
is the model's, and an unanchored position is not one without drift.

λ1, λ2, λ3 are those of the current optimizer step (``current_lambdas``: the schedules of ``balora_trl.schedules``,
the adaptive λ1 or the KL-budget controller), constant over the micro-batches of one step; the options of the
authors' release (top-k entropy, Frobenius SVD ratio, the KL at temperature T times T²) change the terms, on the plain
and the fused head alike.

The forward pass is patched (on top of TRL's fused-LM-head patch) so that ``model(**inputs, balora_head=fn)`` runs
the backbone, keeps only the response positions' final hidden states [n, d], and evaluates ``fn`` on them *inside*
the forward, where FSDP / ZeRO-3 have the LM-head weight gathered. No [batch, seq, V] logits are ever built.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformers import TrainerCallback
from transformers.utils import ModelOutput
from trl import SFTTrainer

from . import losses, schedules
from .config import BALoraConfig
from .checkpoints import BALoraSaveMixin
from .head import head_parameters, head_logits, _gathered_head, install_head_forward
from .reference import Reference, build_reference, is_peft_model

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
    anchored_tokens: torch.Tensor | None = None  # label-consistent anchoring: how many positions the KL anchors
    ref_entropy_sum: torch.Tensor | None = None  # adaptive λ1: Σ_t H(p_ref,t at temperature T)
    # KL budget with label-consistent anchoring: Σ_t KL_t over *every* response position (detached), what the
    # controller measures; ``kl_sum`` holds only the anchored positions' (the term as optimised)
    drift_kl_sum: torch.Tensor | None = None


@dataclass
class Lambdas:
    """The weights of one optimizer step: λ1(t), λ2(t), λ3(t) and the KL's T² factor (1 unless `kl_t2_scaling`)."""

    consistency: float
    diversity: float
    svd: float
    kl_scale: float = 1.0

    @property
    def kl_weight(self) -> float:
        """What multiplies Σ KL / D in the loss: λ1 · T² (or λ1)."""
        return self.consistency * self.kl_scale


def _warn_if_user_turns_train(dataset, args: BALoraConfig) -> None:
    """Warn (once per process: a fixed message) when TRL would put the loss, hence BA-LoRA's terms, on user turns."""
    from datasets import Dataset, IterableDataset

    from .dataset_formats import loss_covers_user_turns

    if isinstance(dataset, Dataset):
        example = dataset[0] if len(dataset) else None
    elif isinstance(dataset, IterableDataset):
        example = next(iter(dataset), None)
    else:
        return
    if example is not None and loss_covers_user_turns(example, args.assistant_only_loss, args.completion_only_loss):
        warnings.warn(
            "BA-LoRA: the training data is conversational and `assistant_only_loss` is off, so the loss and the "
            "BA-LoRA terms (KL, entropy, SVD) cover the user turns too. Set `assistant_only_loss=True` to train every "
            "assistant turn only (the chat template needs {% generation %} markers; TRL supplies them for the "
            "templates it knows).", stacklevel=3)


LAMBDA_STATE_KEY = "BALoraLambdas"  # where the λ1 controller's state lives in trainer_state.json


class _LambdaStepCallback(TrainerCallback):
    """Ends each optimizer step for the λ1 that depend on measurements (KL budget, adaptive λ1): sums the step's
    statistics over ranks, updates λ1 for the next step and stores the state in ``TrainerState.stateful_callbacks``
    (so every checkpoint's trainer_state.json holds it); ``on_train_begin`` restores it on resume."""

    def __init__(self, trainer: "BALoraSFTTrainer"):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._restore_lambda_state(state.stateful_callbacks.get(LAMBDA_STATE_KEY))

    def on_step_end(self, args, state, control, **kwargs):
        state.stateful_callbacks[LAMBDA_STATE_KEY] = self.trainer._end_lambda_step()


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
        _warn_if_user_turns_train(kwargs.get("train_dataset", pargs[1] if len(pargs) > 1 else None), args)
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
        self._init_lambdas()

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
        return BALoraHeadOutput(ref_logits=head_logits(module, hidden).detach())

    def _svd_term(self, compute, *args) -> torch.Tensor:
        """r_k by ``compute``, with the Gram-eigenvalue fallback of :func:`losses.svd_ratio_robust` (warned once)."""
        return losses.svd_ratio_robust(compute, args, self.args.svd_top_k, self._on_svd_fallback,
                                       self.args.svd_normalizer)

    # ----------------------------------------------------------------------------------------------------------
    # λ1, λ2, λ3 of the current optimizer step (balora_trl.schedules)
    # ----------------------------------------------------------------------------------------------------------

    def _init_lambdas(self) -> None:
        cfg = self.args
        vocab = self._causal_lm().config.get_text_config().vocab_size
        if cfg.entropy_top_k > vocab:
            raise ValueError(f"`entropy_top_k` ({cfg.entropy_top_k}) exceeds the vocabulary size ({vocab}).")
        self._vocab_size = vocab
        self._kl_controller = None
        self._ref_entropy: float | None = None  # adaptive λ1: H̄_ref of the previous optimizer step
        self._step_stats: torch.Tensor | None = None  # Σ KL, Σ H_ref, n over this step's micro-batches (local)
        self._measures = cfg.kl_target is not None or cfg.lambda_consistency_schedule == "adaptive"
        if self._measures:
            self._restore_lambda_state(None)
            self.add_callback(_LambdaStepCallback(self))

    def _restore_lambda_state(self, state: dict | None) -> None:
        """Back to the start (``None``) or to a checkpoint's state."""
        cfg = self.args
        if cfg.kl_target is not None:
            self._kl_controller = schedules.KLController(cfg.lambda_consistency, cfg.kl_target, cfg.kl_horizon,
                                                         *cfg.consistency_bounds)
        self._ref_entropy, self._step_stats = None, None
        if state:
            if self._kl_controller is not None and state.get("kl_controller"):
                self._kl_controller.load_state_dict(state["kl_controller"])
            self._ref_entropy = state.get("ref_entropy")

    def _end_lambda_step(self) -> dict:
        """Called once per optimizer step on every rank (the same collective whatever the batch held)."""
        stats = self._step_stats
        if stats is None:
            stats = torch.zeros(3, dtype=torch.float64, device=self.accelerator.device)
        kl_sum, entropy_sum, count = self.accelerator.reduce(stats, reduction="sum").tolist()
        self._step_stats = None
        if count > 0:
            if self._kl_controller is not None:
                self._kl_controller.update(kl_sum / count)
            if self.args.lambda_consistency_schedule == "adaptive":
                self._ref_entropy = entropy_sum / count
        return {"kl_controller": None if self._kl_controller is None else self._kl_controller.state_dict(),
                "ref_entropy": self._ref_entropy}

    def current_lambdas(self) -> Lambdas:
        """λ1, λ2, λ3 at the current optimizer step t = ``state.global_step`` of T = ``state.max_steps``: the same
        for every micro-batch of a step (t only advances after the optimizer step)."""
        cfg = self.args
        lambda1, lambda2, lambda3 = schedules.scheduled_lambdas(cfg, self.state.global_step, self.state.max_steps)
        if self._kl_controller is not None:
            lambda1 = self._kl_controller.value
        elif cfg.lambda_consistency_schedule == "adaptive":
            low, high = cfg.consistency_bounds
            lambda1 = high if self._ref_entropy is None else schedules.adaptive_lambda(
                low, high, self._ref_entropy, self._vocab_size)
        return Lambdas(lambda1, lambda2, lambda3, cfg.kl_temperature ** 2 if cfg.kl_t2_scaling else 1.0)

    def _anchor(self, out: BALoraHeadOutput, label_consistent) -> torch.Tensor | None:
        """The bool [n] positions the KL anchors (``label_consistent()``, computed only when asked for) and their
        count in ``out``, or None when every position is anchored (``consistency_positions="all"``)."""
        if self.args.consistency_positions == "all":
            return None
        mask = label_consistent()
        out.anchored_tokens = mask.sum()
        return mask

    def _policy_head(self, ref: BALoraHeadOutput | None, lam: Lambdas | None = None, ref_entropy: bool = False,
                     drift_kl: bool = False):
        """The head function of the policy's forward. ``ref_entropy``: also Σ H(p_ref) (adaptive λ1); ``drift_kl``:
        also the KL summed over every response position where the term anchors only some (the KL budget)."""
        cfg = self.args
        lam = self.current_lambdas() if lam is None else lam
        want_entropy, want_svd = cfg.lambda_diversity > 0, cfg.lambda_svd > 0
        top_k = cfg.entropy_top_k  # 0: eq. 11's full-vocabulary entropy

        def head(module, hidden, labels):
            out = BALoraHeadOutput(num_tokens=labels.new_tensor(labels.numel()))
            with _gathered_head(module, fused=self._path == "fused"):
                if self._path == "fused":
                    from .fused import fused_head_terms, reference_top1, svd_ratio_frozen_head

                    weight, bias = head_parameters(module)
                    kl_mask = None if ref is None else self._anchor(
                        out, lambda: reference_top1(ref.hidden, weight, bias) == labels)
                    # compute_loss weighs the three sums by (1, λ1(s)·c_T, −λ2(s)) (times a common 1/D): announcing
                    # it lets the fused backward keep one gradient vector per token instead of three. The top-k
                    # entropy is not among them: it has its own pass (fused_topk_entropy).
                    nll, kl, entropy = fused_head_terms(
                        hidden, weight, bias, labels, ref_hidden=None if ref is None else ref.hidden, kl_mask=kl_mask,
                        temperature=cfg.kl_temperature, entropy=want_entropy and not top_k,
                        grad_weights=(1.0, lam.kl_weight, -lam.diversity),
                    )
                    if drift_kl and kl_mask is not None:
                        out.drift_kl_sum = kl.detach().sum()
                        free = ~kl_mask
                        if bool(free.any()):  # the unanchored rows' KL, measured only (no gradient)
                            with torch.no_grad():
                                free_kl = fused_head_terms(hidden[free].detach(), weight, bias, labels[free],
                                                           ref_hidden=ref.hidden[free],
                                                           temperature=cfg.kl_temperature)[1]
                            out.drift_kl_sum = out.drift_kl_sum + free_kl.sum()
                    if want_entropy and top_k:
                        from .fused import fused_topk_entropy

                        entropy = fused_topk_entropy(hidden, weight, bias, top_k)
                    if ref_entropy and ref is not None:
                        from .fused import fused_entropy

                        out.ref_entropy_sum = fused_entropy(ref.hidden, weight, bias,
                                                            temperature=cfg.kl_temperature).sum()
                    if want_svd and labels.numel() > 0:
                        out.svd_ratio = self._svd_term(svd_ratio_frozen_head, hidden, weight, bias)
                else:
                    logits = head_logits(module, hidden)
                    ref_logits = None
                    if ref is not None:
                        ref_logits = ref.ref_logits if ref.ref_logits is not None else head_logits(module, ref.hidden)
                    nll = losses.token_nll(logits, labels)
                    kl_mask = None if ref_logits is None else self._anchor(
                        out, lambda: losses.label_consistent(ref_logits, labels))
                    if kl_mask is not None:
                        kl = losses.anchored_token_kl(ref_logits, logits, kl_mask, cfg.kl_temperature)
                        if drift_kl:
                            with torch.no_grad():
                                out.drift_kl_sum = losses.token_kl(ref_logits, logits, cfg.kl_temperature).sum()
                    else:
                        kl = None if ref_logits is None else losses.token_kl(ref_logits, logits, cfg.kl_temperature)
                    entropy = None
                    if want_entropy:
                        entropy = losses.token_entropy_topk(logits, top_k) if top_k else losses.token_entropy(logits)
                    if ref_entropy and ref_logits is not None:
                        out.ref_entropy_sum = losses.token_entropy(
                            ref_logits.float() / cfg.kl_temperature).sum().detach()
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

        lam = self.current_lambdas()
        ref = None
        if cfg.lambda_consistency > 0:
            with self.reference.activate(self.model):
                ref = self.reference.model(model)(**inputs, balora_head=self._reference_head)
        adaptive = mode == "train" and cfg.lambda_consistency_schedule == "adaptive"
        drift = mode == "train" and self._kl_controller is not None and cfg.consistency_positions != "all"
        out = model(**inputs, balora_head=self._policy_head(ref, lam, ref_entropy=adaptive, drift_kl=drift))

        n = out.num_tokens.to(torch.float32)
        denom = n if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, device=n.device, dtype=torch.float32)
        denom = denom.clamp(min=1)  # a step with no response token adds a finite zero, not 0/0
        sft = out.nll_sum / denom
        terms = {"sft": sft}
        if out.kl_sum is not None:
            terms["kl"] = lam.kl_weight * out.kl_sum / denom
        if out.entropy_sum is not None:
            terms["entropy"] = -lam.diversity * out.entropy_sum / denom
        if out.svd_ratio is not None:
            terms["svd"] = -lam.svd * out.svd_ratio * (n / denom)
        loss = sum(terms.values())
        # Like TRL: `num_items_in_batch` counts every rank's tokens and DDP averages gradients over ranks.
        if cfg.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())

        # Every rank reduces its non-finite flag, so all raise together (one raising alone would hang the rest).
        losses.check_finite_loss(loss, terms, self.state.global_step,
                                 reduce=lambda flag: self.accelerator.reduce(flag, "sum"))
        self._record_metrics(mode, out, inputs)
        if mode == "train":
            self._record_lambdas(lam, out)

        if return_outputs:
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            return loss, outputs
        return loss

    def _record_lambdas(self, lam: Lambdas, out: BALoraHeadOutput) -> None:
        """Log the step's effective λ1, λ2, λ3 (λ1 without the T² factor) and add the micro-batch's KL and
        reference-entropy sums to the step's statistics (KL budget, adaptive λ1)."""
        metrics = self._metrics["train"]
        for name, value in (("consistency", lam.consistency), ("diversity", lam.diversity), ("svd", lam.svd)):
            metrics[f"ba_lora/lambda_{name}"].append(value)
        if self._measures:
            zero = out.num_tokens.new_zeros((), dtype=torch.float64)
            kl_sum = out.kl_sum if out.drift_kl_sum is None else out.drift_kl_sum  # the controller's K̄: all positions
            stats = torch.stack([zero if v is None else v.detach().to(torch.float64)
                                 for v in (kl_sum, out.ref_entropy_sum, out.num_tokens)])
            self._step_stats = stats if self._step_stats is None else self._step_stats + stats

    def _record_metrics(self, mode: str, out: BALoraHeadOutput, inputs) -> None:
        """Token-weighted means over the micro-batch, summed over ranks; TRL's `log` averages the window.

        One gather of one fixed-shape vector per call, whatever the batch holds: every rank must issue the same
        collectives in the same order, or multi-GPU training hangs (or pairs one rank's SVD ratio with another's
        token count). Which sums are present depends on the configuration only; the SVD ratio, which a micro-batch
        without a trained token does not have, travels as (ratio, 1) or (0, 0) and is averaged over the ranks that
        have one. ``gather`` rather than ``gather_for_metrics``: the rows are ranks, not samples, so the latter's
        end-of-dataloader truncation (meant for duplicated samples) would drop ranks.
        """
        present = {"sft_loss": out.nll_sum, "kl": out.kl_sum, "entropy": out.entropy_sum,
                   "anchored_fraction": out.anchored_tokens}
        names = [k for k, v in present.items() if v is not None]
        count = out.num_tokens.float()
        has_ratio = out.svd_ratio is not None
        ratio = out.svd_ratio.detach().float().reshape(()) if has_ratio else count.new_zeros(())
        mask = inputs.get("attention_mask")  # TRL's `num_tokens`: every attended token, prompt included
        attended = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel())
        stats = torch.stack([count] + [present[k].detach().float().reshape(()) for k in names]
                            + [ratio, count.new_tensor(float(has_ratio)), attended.to(count)])
        totals = self.accelerator.gather(stats.unsqueeze(0)).sum(0).tolist()
        total_count, sums, (ratio_sum, ratios, attended_total) = totals[0], totals[1:-3], totals[-3:]
        if total_count > 0:
            for name, value in zip(names, sums):
                self._metrics[mode][f"ba_lora/{name}"].append(value / total_count)
        if ratios > 0:
            self._metrics[mode]["ba_lora/svd_ratio"].append(ratio_sum / ratios)
        if mode == "train":
            self._total_train_tokens += int(round(attended_total))
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
