"""Configuration: ``BALoraConfig`` (NLG, an ``SFTConfig``) and ``BALoraNLUConfig`` (sequence classification).

Every BA-LoRA field names its symbol in the paper (arXiv 2408.04556, section 3.2). Invalid values raise
``ValueError`` when the config is built, never halfway through a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .schedules import CONSISTENCY_SCHEDULES, FOCUS_SCHEDULES, KLController

HEAD_PATHS = ("auto", "fused", "plain")
NLU_FEATURES = ("logits", "hidden")
SVD_NORMALIZERS = ("sum", "frobenius")
# Where the consistency term anchors (our extension, not the paper's); see BALoraConfig.consistency_positions.
CONSISTENCY_POSITIONS = ("all", "label_consistent")


# The largest λ accepted. Each term a λ weighs is of order 1 or more per token (KL and entropy in nats, the SVD ratio
# in (0, 1]) and so is the task NLL; beyond 2^24 the task term is below float32's relative resolution (2^-24) in the
# sum, and its gradient is lost in the regulariser's: the run trains the regulariser alone (e.g. λ1 = 1e30 trains
# with a loss of 4e28 and no error). Finite is not enough; this bound is what "the task still counts" needs.
LAMBDA_MAX = 2.0 ** 24


def _refuse_beyond_lambda_max(name: str, value: float) -> None:
    """A λ, or a value a λ schedule reaches, above `LAMBDA_MAX`."""
    if value > LAMBDA_MAX:
        raise ValueError(f"`{name}` = {value!r} is beyond any useful weight (at most {LAMBDA_MAX:.0f} = 2^24): a "
                         "term weighted that much swamps the task loss below float32's resolution, so training "
                         "fits the regulariser alone. The paper's values are 1e-4 to 1e-3.")


def _check_regularisers(cfg) -> None:
    for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        _refuse_beyond_lambda_max(name, value)
    if not isinstance(cfg.svd_top_k, int) or isinstance(cfg.svd_top_k, bool) or cfg.svd_top_k < 1:
        raise ValueError(f"`svd_top_k` (k in eq. 12) must be an integer >= 1, got {cfg.svd_top_k!r}.")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_schedules(cfg, nlg: bool) -> None:
    """The λ schedules (``balora_trl.schedules``) and, for NLG, the release's options and the KL budget."""
    consistency = CONSISTENCY_SCHEDULES if nlg else CONSISTENCY_SCHEDULES[:2]
    if cfg.lambda_consistency_schedule not in consistency:
        raise ValueError(f"`lambda_consistency_schedule` must be one of {consistency}, "
                         f"got {cfg.lambda_consistency_schedule!r}.")
    if cfg.lambda_focus_schedule not in FOCUS_SCHEDULES:
        raise ValueError(f"`lambda_focus_schedule` must be one of {FOCUS_SCHEDULES}, got {cfg.lambda_focus_schedule!r}.")
    for name in ("focus_warmup_ratio", "focus_ramp_ratio"):
        value = getattr(cfg, name)
        if not _is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"`{name}` must be a number in [0, 1] (a fraction of the run's steps), got {value!r}.")
    for name in ("lambda_consistency_end", "lambda_consistency_min", "lambda_consistency_max"):
        value = getattr(cfg, name, None)
        if value is None:
            continue
        if not _is_number(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0 or unset, got {value!r}.")
        _refuse_beyond_lambda_max(name, value)  # a schedule reaches it: the same bound as λ itself
    if cfg.svd_normalizer not in SVD_NORMALIZERS:
        raise ValueError(f"`svd_normalizer` must be one of {SVD_NORMALIZERS}, got {cfg.svd_normalizer!r}.")
    if not nlg:
        return
    k = cfg.entropy_top_k
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"`entropy_top_k` must be an integer >= 0 (0: the full vocabulary, k: the k largest logits), got {k!r}.")
    if cfg.kl_target is not None:
        if not _is_number(cfg.kl_target) or cfg.kl_target <= 0:
            raise ValueError(f"`kl_target` must be a finite number > 0 (nats per response token), got {cfg.kl_target!r}.")
        if cfg.lambda_consistency_schedule != "constant":
            raise ValueError("`kl_target` sets λ1 by a controller; it cannot be combined with "
                             f"`lambda_consistency_schedule={cfg.lambda_consistency_schedule!r}` (use 'constant').")
        if cfg.lambda_consistency <= 0:
            raise ValueError("`kl_target` needs `lambda_consistency` > 0: it is the controller's starting λ1.")
    if cfg.lambda_consistency_schedule == "adaptive" and cfg.lambda_consistency <= 0:
        raise ValueError("`lambda_consistency_schedule='adaptive'` needs `lambda_consistency` > 0 (its λ1_max by "
                         "default; the reference only runs when λ1 > 0).")
    if not _is_number(cfg.kl_horizon) or cfg.kl_horizon <= KLController.CLIP:
        raise ValueError(f"`kl_horizon` must be a finite number > {KLController.CLIP} (optimizer steps), got "
                         f"{cfg.kl_horizon!r}: the controller multiplies λ1 by 1 + e/kl_horizon with e as low as "
                         f"-{KLController.CLIP}, so a horizon <= {KLController.CLIP} drives λ1 to 0 or below.")
    low, high = cfg.consistency_bounds
    if low > high:
        raise ValueError(f"`lambda_consistency_min` ({low}) must not exceed `lambda_consistency_max` ({high}).")


@dataclass
class BALoraConfig(SFTConfig):
    r"""
    [`~trl.SFTConfig`] plus the BA-LoRA regularisers for causal language models (paper eqs. 10-13):

        L = L_sft + λ1 · KL(p_pretrained ‖ p_θ) + λ2 · (−H(p_θ)) + λ3 · (−Σ_{i≤k} σ_i / Σ_j σ_j)

    KL and entropy are means over the response positions (the positions TRL's cross-entropy trains), σ the
    singular values of the batch's matrix of those positions' logits. Loss is on the response only by default:
    TRL trains only the completion of prompt/completion data, the form every format in `balora_trl.dataset_formats`
    becomes. A λ of 0 switches its term off at no cost (no reference forward for λ1 = 0, no SVD for λ3 = 0).

    Parameters:
        lambda_consistency (`float`, defaults to `1e-4`):
            λ1, weight of the consistency term KL(p_pretrained ‖ p_θ), eq. 10.
        lambda_diversity (`float`, defaults to `3e-4`):
            λ2, weight of the diversity term −H(p_θ), eq. 11.
        lambda_svd (`float`, defaults to `1e-4`):
            λ3, weight of the SVD term −Σ_{i≤k} σ_i / Σ_j σ_j, eq. 12.
        svd_top_k (`int`, defaults to `10`):
            k in eq. 12. The paper leaves k open; 10 is the authors' released code's value. A batch has
            hundreds to thousands of response positions, so k = 10 keeps the term about the dominant directions
            of the logit matrix rather than only its first (the mean-logit direction).
        kl_temperature (`float`, defaults to `1.0`):
            T in KL(softmax(z_ref/T) ‖ softmax(z/T)). 1.0 is the paper's term (release: 2.0).
        kl_t2_scaling (`bool`, defaults to `False`):
            Multiply the KL term by T² (distillation's convention, which keeps its gradient's scale independent
            of T; release: on). The term is then λ1 · T² · KL.
        lambda_consistency_schedule (`str`, defaults to `"constant"`):
            How λ1 moves (formulas in `balora_trl.schedules`): `"constant"` (paper); `"cosine"`
            λ1(t) = λ1_end + (λ1 − λ1_end)·½(1 + cos(π t/T)), t the optimizer step, T the run's steps (release);
            `"adaptive"` λ1 = λ1_min + (λ1_max − λ1_min)·(1 − clamp(H̄_ref / log V, 0, 1)), H̄_ref the reference's
            mean entropy at temperature T over the previous optimizer step's response positions (the release
            uses the current micro-batch; a λ constant over the step keeps accumulation exact; step 0 uses λ1_max).
        lambda_consistency_end (`float`, *optional*):
            λ1_end of the cosine schedule; unset: 0.1 · λ1 (release).
        lambda_consistency_min, lambda_consistency_max (`float`, *optional*):
            Bounds of λ1 for `"adaptive"` (unset: 0.1 · λ1 and λ1, release) and for the KL controller (unset:
            0.01 · λ1 and 10: while the KL is under budget λ1 shrinks, and a floor keeps it able to climb back).
        lambda_focus_schedule (`str`, defaults to `"constant"`):
            Factor f(t) on λ2 and λ3, with W = ⌊focus_warmup_ratio·T⌋, R = max(1, ⌊focus_ramp_ratio·T⌋):
            `"constant"` f = 1 (paper); `"linear_warmup"` f = t/W for t < W, then 1; `"quadratic_warmup"`
            f = (t/W)² for t < W, then 1; `"two_phase"` f = 0 for t < W, (t − W)/R up to W + R, then 1 (release).
        focus_warmup_ratio (`float`, defaults to `0.1`): W / T (release script: 0.2).
        focus_ramp_ratio (`float`, defaults to `0.05`): R / T of `"two_phase"` (release: 0.05).
        entropy_top_k (`int`, defaults to `0`):
            0: eq. 11's entropy over the whole vocabulary. k ≥ 1: the entropy of the softmax over each position's
            k largest logits, H_k = −Σ_{v∈top-k} q_v log q_v, q = softmax(z_topk) (release: 20); its gradient
            reaches those k logits only.
        svd_normalizer (`str`, defaults to `"sum"`):
            Denominator of the SVD ratio: `"sum"` Σ_j σ_j (eq. 12 as written) or `"frobenius"`
            ‖Z‖_F = (Σ_j σ_j²)^½ (release).
        kl_target (`float`, *optional*):
            A KL budget in nats per response token (ours, beyond the release): λ1 then starts at
            `lambda_consistency` and is set after every optimizer step by a proportional multiplicative controller
            (Ziegler et al. 2019) so that the measured mean KL(p_ref ‖ p_θ) at temperature T stays near the target:
            λ1 ← clamp(λ1·(1 + clip(K̄/target − 1, ±0.2)/kl_horizon), λ1_min, λ1_max). Saved in checkpoints.
        kl_horizon (`float`, defaults to `10`):
            The controller's horizon in optimizer steps (smaller reacts faster); > 0.2, the clip, so that the
            factor 1 + e/kl_horizon stays > 0 (at 0.2 one step below target would set λ1 to 0 for good).
            With `consistency_positions="label_consistent"` K̄ is still the mean KL over *all* response
            positions, anchored or not: the budget bounds the model's drift from the reference, as without the
            option, and a position the term does not anchor does not count as zero drift.
        head_path (`str`, defaults to `"auto"`):
            How the LM-head terms are computed. `"fused"`: in token × vocabulary tiles from the hidden states,
            never materialising logits. `"plain"`: materialise the response positions' logits (the reference
            implementation). `"auto"`: fused where the head is a plain frozen linear map, plain otherwise.
        consistency_positions (`str`, defaults to `"all"`):
            Which response positions the consistency term anchors. `"all"`: every one (eq. 10, the paper's term).
            `"label_consistent"` (*our extension, not the paper's method*): only the positions where the
            reference's most likely token is the label, a_t = 1[argmax_v p_ref,t(v) = y_t]:

                λ1 · Σ_t a_t · KL(p_ref,t ‖ p_θ,t) / D

            D is unchanged (all response positions), so λ1 keeps its meaning per response token. Left out are the
            positions where the data corrects a pretrained error, where the KL would hold the old answer back.
            With no position anchored the term is 0 and costs no reference-head work beyond the argmax. The
            trainer logs `ba_lora/anchored_fraction` = Σ_t a_t / (response positions); `ba_lora/kl` is then the
            mean of a_t · KL_t over the response positions (the term as optimised, before λ1).
            A softer variant was considered and not added: anchoring to p_ref with the probabilities of the label
            and of the top-1 token swapped (equal to p_ref where a_t = 1). Its KL is KL(p_ref ‖ p_θ) −
            (p_ref(top1) − p_ref(y))·(log p_θ(y) − log p_θ(top1)): the full anchor plus a second, λ1-weighted
            push towards the label on top of the SFT term, i.e. not "anchor less" but "anchor and relabel".
        resume_incomplete_checkpoint (`bool`, defaults to `False`):
            Resume from a checkpoint that lacks its adapter, optimizer, scheduler or initial adapter, those parts
            starting afresh (each named in a warning). Off, such a checkpoint is refused with the file named (see
            `balora_trl.checkpoints.checkpoint_problems`): transformers would silently train on from the initial
            adapter, or restart the learning-rate schedule. A damaged file or a missing trainer state is refused
            either way.
    """

    lambda_consistency: float = field(
        default=1e-4, metadata={"help": "λ1: weight of KL(p_pretrained ‖ p_θ) over response tokens (eq. 10)."}
    )
    lambda_diversity: float = field(
        default=3e-4, metadata={"help": "λ2: weight of the negative entropy −H(p_θ) over response tokens (eq. 11)."}
    )
    lambda_svd: float = field(
        default=1e-4, metadata={"help": "λ3: weight of −Σ_{i≤k}σ_i/Σσ of the batch's response logits (eq. 12)."}
    )
    svd_top_k: int = field(default=10, metadata={"help": "k in eq. 12: how many top singular values to reward."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Temperature T of both distributions in the KL."})
    kl_t2_scaling: bool = field(default=False, metadata={"help": "Multiply the KL term by T² (release: on)."})
    lambda_consistency_schedule: str = field(
        default="constant",
        metadata={"help": "λ1 over training: 'constant', 'cosine' or 'adaptive' (reference entropy).",
                  "choices": CONSISTENCY_SCHEDULES},
    )
    lambda_consistency_end: float | None = field(
        default=None, metadata={"help": "Final λ1 of the cosine schedule (default 0.1·λ1)."}
    )
    lambda_consistency_min: float | None = field(
        default=None, metadata={"help": "Lower bound of λ1 (adaptive: default 0.1·λ1; KL controller: 0.01·λ1)."}
    )
    lambda_consistency_max: float | None = field(
        default=None, metadata={"help": "Upper bound of λ1 (adaptive: default λ1; KL controller: 10)."}
    )
    lambda_focus_schedule: str = field(
        default="constant",
        metadata={"help": "Factor on λ2, λ3: 'constant', 'linear_warmup', 'quadratic_warmup' or 'two_phase'.",
                  "choices": FOCUS_SCHEDULES},
    )
    focus_warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up W as a fraction of the steps."})
    focus_ramp_ratio: float = field(default=0.05, metadata={"help": "'two_phase' ramp R as a fraction of the steps."})
    entropy_top_k: int = field(
        default=0, metadata={"help": "Entropy over each position's k largest logits (0: whole vocabulary)."}
    )
    svd_normalizer: str = field(
        default="sum",
        metadata={"help": "SVD ratio denominator: 'sum' (Σσ, eq. 12) or 'frobenius' (‖Z‖_F).",
                  "choices": SVD_NORMALIZERS},
    )
    kl_target: float | None = field(
        default=None, metadata={"help": "KL budget (nats per response token); λ1 then follows a controller."}
    )
    kl_horizon: float = field(default=10.0, metadata={"help": "KL controller horizon in optimizer steps."})
    head_path: str = field(
        default="auto",
        metadata={"help": "LM-head computation: 'auto', 'fused' (tiled, no logits) or 'plain'.", "choices": HEAD_PATHS},
    )
    consistency_positions: str = field(
        default="all",
        metadata={"help": "Positions the KL anchors: 'all' (eq. 10) or 'label_consistent' (only where the "
                          "reference's top-1 token is the label; our extension).", "choices": CONSISTENCY_POSITIONS},
    )
    resume_incomplete_checkpoint: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint that lacks its adapter, optimizer, scheduler or initial adapter, "
                          "those parts starting afresh (each named in a warning). Off: such a checkpoint is refused "
                          "with the missing file named."},
    )

    def __post_init__(self):
        _check_regularisers(self)
        _check_schedules(self, nlg=True)
        if not isinstance(self.kl_temperature, (int, float)) or not (
            math.isfinite(self.kl_temperature) and self.kl_temperature > 0
        ):
            raise ValueError(f"`kl_temperature` must be a finite number > 0, got {self.kl_temperature!r}.")
        if self.head_path not in HEAD_PATHS:
            raise ValueError(f"`head_path` must be one of {HEAD_PATHS}, got {self.head_path!r}.")
        if self.consistency_positions not in CONSISTENCY_POSITIONS:
            raise ValueError(f"`consistency_positions` must be one of {CONSISTENCY_POSITIONS}, "
                             f"got {self.consistency_positions!r}.")
        super().__post_init__()

    @property
    def consistency_bounds(self) -> tuple[float, float]:
        """(λ1_min, λ1_max) with the defaults filled in: 0.1·λ1 and λ1 (adaptive), 0.01·λ1 and 10 (KL controller)."""
        if self.kl_target is not None:
            low, high = 0.01 * self.lambda_consistency, 10.0
        else:
            low, high = 0.1 * self.lambda_consistency, self.lambda_consistency
        return (low if self.lambda_consistency_min is None else self.lambda_consistency_min,
                high if self.lambda_consistency_max is None else self.lambda_consistency_max)

    def _active_schedule_settings(self) -> dict:
        """The schedule settings that the chosen schedules use (the others change nothing)."""
        out = {}
        if self.lambda_consistency_schedule == "cosine":
            out["lambda_consistency_end"] = (0.1 * self.lambda_consistency if self.lambda_consistency_end is None
                                             else self.lambda_consistency_end)
        if self.lambda_consistency_schedule == "adaptive" or self.kl_target is not None:
            out["lambda_consistency_bounds"] = list(self.consistency_bounds)
        if self.kl_target is not None:
            out.update(kl_target=self.kl_target, kl_horizon=self.kl_horizon)
        if self.lambda_focus_schedule != "constant":
            out["focus_warmup_ratio"] = self.focus_warmup_ratio
        if self.lambda_focus_schedule == "two_phase":
            out["focus_ramp_ratio"] = self.focus_ramp_ratio
        return out

    @property
    def balora_hyperparameters(self) -> dict:
        """The BA-LoRA fields, as saved beside the adapter."""
        return {
            "lambda_consistency": self.lambda_consistency,
            "lambda_diversity": self.lambda_diversity,
            "lambda_svd": self.lambda_svd,
            "svd_top_k": self.svd_top_k,
            "kl_temperature": self.kl_temperature,
            "kl_t2_scaling": self.kl_t2_scaling,
            "entropy_top_k": self.entropy_top_k,
            "svd_normalizer": self.svd_normalizer,
            "lambda_consistency_schedule": self.lambda_consistency_schedule,
            "lambda_focus_schedule": self.lambda_focus_schedule,
            **self._active_schedule_settings(),
            "consistency_positions": self.consistency_positions,
        }


@dataclass
class BALoraNLUConfig(TrainingArguments):
    r"""
    [`~transformers.TrainingArguments`] plus the BA-LoRA regularisers for sequence classification (eqs. 5-9):

        L = L_task + λ1 · mean‖F_p/‖F_p‖ − F_f/‖F_f‖‖² + λ2 · (1/D) Σ_{i≠j} C(F_f)_ij² + λ3 · (−Σ_{i≤k}σ_i/Σσ)

    Parameters:
        lambda_consistency (`float`, defaults to `1e-4`): λ1, eq. 5.
        lambda_diversity (`float`, defaults to `4e-4`): λ2, eqs. 6-7.
        lambda_svd (`float`, defaults to `1e-4`): λ3, eq. 8.
        svd_top_k (`int`, defaults to `1`):
            k in eq. 8. The logit matrix of a classifier has at most `num_labels` columns, so only k = 1 leaves
            something to trade off for binary tasks.
        regulariser_features (`str`, defaults to `"logits"`):
            F in eqs. 5-8: `"logits"` (the paper's choice) or `"hidden"`, the pooled last-hidden features the
            classifier reads. With 2-3 classes the logit covariance has 2-6 off-diagonal entries, so the diversity
            term says little; the hidden features give it D = hidden_size dimensions to decorrelate.
        lambda_consistency_schedule (`str`, defaults to `"constant"`): `"constant"` or `"cosine"` λ1(t), as in
            [`BALoraConfig`]; `lambda_consistency_end` (default 0.1 · λ1) its final value.
        lambda_focus_schedule (`str`, defaults to `"constant"`), focus_warmup_ratio (`0.1`), focus_ramp_ratio
            (`0.05`): the factor on λ2 and λ3, as in [`BALoraConfig`].
        svd_normalizer (`str`, defaults to `"sum"`): Σσ (eq. 8) or `"frobenius"` ‖F‖_F, as in [`BALoraConfig`].
        feature_dump_steps (`list[int]`, defaults to `[]`):
            Optimizer steps at which the last-hidden features and labels of the evaluation set are saved as .npy
            under `<output_dir>/features/` (for t-SNE); -1 means the end of training.
        consistency_examples (`str`, defaults to `"all"`):
            Which examples eq. 5 anchors. `"all"`: every one (the paper). `"label_consistent"` (*our extension,
            not the paper's method*; single-label classification only): only the examples whose reference
            prediction is the label, a_m = 1[argmax_c z_ref,m,c = y_m], as (1/M) Σ_m a_m ‖F_p,m/‖F_p,m‖ −
            F_f,m/‖F_f,m‖‖² (M unchanged). It is meaningful only when the reference's classifier already predicts
            these labels (a `ref_model` trained for the task, or an adapter on a classifier whose head was
            trained): with the usual new, randomly initialised head the reference's prediction agrees with the
            label by chance (~1/num_labels), whatever the pretrained features know, so the mask only thins the
            term out at random. The trainer logs `ba_lora/anchored_fraction`.
    """

    lambda_consistency: float = field(default=1e-4, metadata={"help": "λ1: normalised-logit MSE weight (eq. 5)."})
    lambda_diversity: float = field(default=4e-4, metadata={"help": "λ2: off-diagonal covariance weight (eqs. 6-7)."})
    lambda_svd: float = field(default=1e-4, metadata={"help": "λ3: top-k singular value ratio weight (eq. 8)."})
    svd_top_k: int = field(default=1, metadata={"help": "k in eq. 8."})
    regulariser_features: str = field(
        default="logits",
        metadata={"help": "F in eqs. 5-8: 'logits' or 'hidden' (pooled features).", "choices": NLU_FEATURES},
    )
    feature_dump_steps: list[int] = field(
        default_factory=list, metadata={"help": "Steps at which to dump eval features for t-SNE (-1: end)."}
    )
    lambda_consistency_schedule: str = field(
        default="constant", metadata={"help": "λ1 over training: 'constant' or 'cosine'.",
                                      "choices": CONSISTENCY_SCHEDULES[:2]}
    )
    lambda_consistency_end: float | None = field(
        default=None, metadata={"help": "Final λ1 of the cosine schedule (default 0.1·λ1)."}
    )
    lambda_focus_schedule: str = field(
        default="constant",
        metadata={"help": "Factor on λ2, λ3: 'constant', 'linear_warmup', 'quadratic_warmup' or 'two_phase'.",
                  "choices": FOCUS_SCHEDULES},
    )
    focus_warmup_ratio: float = field(default=0.1, metadata={"help": "Warm-up W as a fraction of the steps."})
    focus_ramp_ratio: float = field(default=0.05, metadata={"help": "'two_phase' ramp R as a fraction of the steps."})
    svd_normalizer: str = field(
        default="sum", metadata={"help": "SVD ratio denominator: 'sum' (eq. 8) or 'frobenius'.",
                                 "choices": SVD_NORMALIZERS}
    )
    consistency_examples: str = field(
        default="all",
        metadata={"help": "Examples eq. 5 anchors: 'all' or 'label_consistent' (only where the reference predicts "
                          "the label; our extension).", "choices": CONSISTENCY_POSITIONS},
    )

    def __post_init__(self):
        _check_regularisers(self)
        _check_schedules(self, nlg=False)
        if self.consistency_examples not in CONSISTENCY_POSITIONS:
            raise ValueError(f"`consistency_examples` must be one of {CONSISTENCY_POSITIONS}, "
                             f"got {self.consistency_examples!r}.")
        if self.regulariser_features not in NLU_FEATURES:
            raise ValueError(
                f"`regulariser_features` must be one of {NLU_FEATURES}, got {self.regulariser_features!r}."
            )
        super().__post_init__()
