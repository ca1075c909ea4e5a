"""Configuration: ``BALoraConfig`` (NLG, an ``SFTConfig``) and ``BALoraNLUConfig`` (sequence classification).

Every BA-LoRA field names its symbol in the paper (arXiv 2408.04556, section 3.2). Invalid values raise
``ValueError`` when the config is built, never halfway through a run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

HEAD_PATHS = ("auto", "fused", "plain")
NLU_FEATURES = ("logits", "hidden")


def _check_regularisers(cfg) -> None:
    for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    if not isinstance(cfg.svd_top_k, int) or isinstance(cfg.svd_top_k, bool) or cfg.svd_top_k < 1:
        raise ValueError(f"`svd_top_k` (k in eq. 12) must be an integer >= 1, got {cfg.svd_top_k!r}.")


@dataclass
class BALoraConfig(SFTConfig):
    r"""
    [`~trl.SFTConfig`] plus the BA-LoRA regularisers for causal language models (paper eqs. 10-13):

        L = L_sft + λ1 · KL(p_pretrained ‖ p_θ) + λ2 · (−H(p_θ)) + λ3 · (−Σ_{i≤k} σ_i / Σ_j σ_j)

    KL and entropy are means over the response positions (the positions TRL's cross-entropy trains), σ the
    singular values of the batch's matrix of those positions' logits. Loss is on the response only by default:
    TRL trains only the completion of prompt/completion data, the form every format in `balora_trl.data`
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
            T in KL(softmax(z_ref/T) ‖ softmax(z/T)). 1.0 is the paper's term; no T² factor is applied.
        head_path (`str`, defaults to `"auto"`):
            How the LM-head terms are computed. `"fused"`: in token × vocabulary tiles from the hidden states,
            never materialising logits. `"plain"`: materialise the response positions' logits (the reference
            implementation). `"auto"`: fused where the head is a plain frozen linear map, plain otherwise.
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
    head_path: str = field(
        default="auto",
        metadata={"help": "LM-head computation: 'auto', 'fused' (tiled, no logits) or 'plain'.", "choices": HEAD_PATHS},
    )

    def __post_init__(self):
        _check_regularisers(self)
        if not isinstance(self.kl_temperature, (int, float)) or not (
            math.isfinite(self.kl_temperature) and self.kl_temperature > 0
        ):
            raise ValueError(f"`kl_temperature` must be a finite number > 0, got {self.kl_temperature!r}.")
        if self.head_path not in HEAD_PATHS:
            raise ValueError(f"`head_path` must be one of {HEAD_PATHS}, got {self.head_path!r}.")
        super().__post_init__()

    @property
    def balora_hyperparameters(self) -> dict:
        """The BA-LoRA fields, as saved beside the adapter."""
        return {
            "lambda_consistency": self.lambda_consistency,
            "lambda_diversity": self.lambda_diversity,
            "lambda_svd": self.lambda_svd,
            "svd_top_k": self.svd_top_k,
            "kl_temperature": self.kl_temperature,
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
        feature_dump_steps (`list[int]`, defaults to `[]`):
            Optimizer steps at which the last-hidden features and labels of the evaluation set are saved as .npy
            under `<output_dir>/features/` (for t-SNE); -1 means the end of training.
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

    def __post_init__(self):
        _check_regularisers(self)
        if self.regulariser_features not in NLU_FEATURES:
            raise ValueError(
                f"`regulariser_features` must be one of {NLU_FEATURES}, got {self.regulariser_features!r}."
            )
        super().__post_init__()
