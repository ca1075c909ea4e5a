"""BA-LoRA's loss terms as pure functions (paper section 3.2). No trainer state lives here.

NLG (causal LM), per response position t with logits z_t over the vocabulary:

* eq. 10, consistency:  KL(p_ref,t ‖ p_θ,t) = Σ_v p_ref,t(v) · (log p_ref,t(v) − log p_θ,t(v))
* eq. 11, diversity:    −H(p_θ,t) = Σ_v p_θ,t(v) · log p_θ,t(v)
* eq. 12, SVD:          −Σ_{i≤k} σ_i / Σ_j σ_j, σ the singular values of the matrix Z whose rows are z_t
* label-consistent anchoring (our extension): eq. 10 times a_t = 1[argmax_v p_ref,t(v) = y_t]

The per-token functions return one value per row, so the trainer can normalise sums the way TRL normalises
the SFT loss (by ``num_items_in_batch``). Everything is computed in float32 (or the input's wider dtype)
whatever the autocast dtype: softmax differences of 1e-4-weighted terms vanish in bfloat16.

NLU (sequence classification), F the [batch, D] output matrix:

* eq. 5, consistency:   mean over the batch of ‖F_p/‖F_p‖ − F_f/‖F_f‖‖²
* eqs. 6-7, diversity:  (1/D) Σ_{i≠j} C(F_f)_{ij}², C the unbiased covariance of F_f's columns
* eq. 8, SVD:           the same top-k singular value ratio as eq. 12

This module is the *plain* implementation: it materialises logits. The fused, tiled path in
``balora_trl.fused`` is tested against it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Upcast to at least float32 (float64 stays float64)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# --------------------------------------------------------------------------------------------------------------
# NLG: per-token terms
# --------------------------------------------------------------------------------------------------------------


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of ``labels`` [N] under ``logits`` [N, V]; one value per row."""
    return F.cross_entropy(_wide(logits), labels, reduction="none")


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Eq. 10 per row: KL(softmax(ref_logits / T) ‖ softmax(logits / T)).

    No T² factor (unlike distillation): at the default T = 1 this is exactly the paper's term.
    """
    log_p_ref = torch.log_softmax(_wide(ref_logits) / temperature, dim=-1)
    log_p = torch.log_softmax(_wide(logits) / temperature, dim=-1)
    return (log_p_ref.exp() * (log_p_ref - log_p)).sum(-1)


def label_consistent(ref_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """a_t = 1[argmax_v ref_logits[t, v] = labels[t]] per row (bool [N]): the positions where the reference's most
    likely token is the label (``consistency_positions="label_consistent"``, our extension). Ties go to the first
    maximal index (``torch.argmax``); a ``-100`` label is never matched. The argmax is the same at any temperature."""
    return ref_logits.argmax(-1) == labels.to(ref_logits.device)


def anchored_token_kl(ref_logits: torch.Tensor, logits: torch.Tensor, anchored: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """a_t · KL(softmax(ref_logits_t / T) ‖ softmax(logits_t / T)) per row, ``anchored`` the bool [N] mask a.

    The KL is evaluated at the anchored rows only: the others are 0 with no gradient, and with none anchored no KL
    is computed at all.
    """
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    kl = torch.zeros(logits.shape[0], device=logits.device, dtype=dtype)
    rows = anchored.nonzero().squeeze(1)
    if rows.numel() == 0:
        return kl
    return kl.index_put((rows,), token_kl(ref_logits[rows], logits[rows], temperature))


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy H(softmax(logits)) per row (nats). Eq. 11's term is its negative."""
    log_p = torch.log_softmax(_wide(logits), dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def token_entropy_topk(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The authors' release's diversity entropy per row: H(softmax(z_topk)), z_topk the row's k largest logits.

    −Σ_{v∈top-k} q_v log q_v with q = softmax over those k values only (renormalised). The gradient reaches the k
    selected logits only. k ≥ V is the full entropy.
    """
    top = torch.topk(_wide(logits), min(int(k), logits.shape[-1]), dim=-1).values
    return token_entropy(top)


# --------------------------------------------------------------------------------------------------------------
# SVD term (NLG eq. 12 and NLU eq. 8)
# --------------------------------------------------------------------------------------------------------------


def top_k_ratio(singular_values: torch.Tensor, k: int, normalizer: str = "sum") -> torch.Tensor:
    """Σ_{i≤k} σ_i / N(σ) for singular values sorted in descending order; 0 for an all-zero matrix.

    ``normalizer``: ``"sum"`` N = Σ_j σ_j (eq. 12 as written), ``"frobenius"`` N = (Σ_j σ_j²)^½ = ‖Z‖_F (the
    authors' release). The Frobenius ratio lies in (0, √k].
    """
    if normalizer == "sum":
        total = singular_values.sum()
    elif normalizer == "frobenius":
        total = singular_values.norm()
    else:
        raise ValueError(f"normalizer must be 'sum' or 'frobenius', got {normalizer!r}.")
    if total <= 0:
        return singular_values.new_zeros(())
    return singular_values[:k].sum() / total


def svd_ratio(matrix: torch.Tensor, k: int, normalizer: str = "sum") -> torch.Tensor:
    """Eq. 12 / eq. 8 without the sign: the share of the top-k singular values of ``matrix`` (exact SVD), over
    Σσ or ‖matrix‖_F (:func:`top_k_ratio`).

    Differentiable. Raises ``torch.linalg.LinAlgError`` if the SVD does not converge; the trainer catches
    that and retries with :func:`svd_ratio_gram` (:func:`svd_ratio_robust`).
    """
    return top_k_ratio(torch.linalg.svdvals(_wide(matrix)), k, normalizer)


def svd_ratio_gram(matrix: torch.Tensor, k: int, normalizer: str = "sum") -> torch.Tensor:
    """Same value as :func:`svd_ratio` through the eigenvalues of the float64 Gram matrix (σ² = eig(MᵀM)).

    A second algorithm for the rare batches where the SVD fails to converge. The Gram matrix is taken on the
    smaller side. Eigenvalues are clamped at 0 before the square root (round-off makes tiny ones negative), and
    the gradient of √λ at λ≈0 is cut by a small floor so it stays finite.
    """
    m = matrix.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    eigenvalues = torch.linalg.eigvalsh(gram).flip(0)
    sigma = eigenvalues.clamp_min(1e-30).sqrt() * (eigenvalues > 0)
    return top_k_ratio(sigma, k, normalizer).to(matrix.dtype if matrix.is_floating_point() else torch.float32)


def svd_fallback_warner(current_step):
    """An ``on_fallback`` for :func:`svd_ratio_robust` that warns the first time only, naming the step
    (``current_step()``). Each trainer holds its own."""
    warned = False

    def on_fallback(error: Exception) -> None:
        nonlocal warned
        if not warned:
            warnings.warn(f"BA-LoRA: the SVD did not converge at step {current_step()} ({error}); using the "
                          "eigenvalues of the Gram matrix instead (warned once).", stacklevel=4)
            warned = True

    return on_fallback


def did_not_converge(error: BaseException) -> bool:
    """True for a solver's convergence failure, the one error :func:`svd_ratio_robust` falls back on.

    ``torch.linalg.LinAlgError`` (what torch raises for an SVD / eigensolver that does not converge or meets an
    ill-conditioned input), or a plain ``RuntimeError`` whose message says so (older cuSOLVER / MAGMA paths raise
    "... did not converge"). ``torch.OutOfMemoryError`` and every other ``RuntimeError`` are not.
    """
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, torch.linalg.LinAlgError):
        return True
    return isinstance(error, RuntimeError) and "converge" in str(error).lower()


def svd_ratio_robust(compute, args: tuple, k: int, on_fallback=None, normalizer: str = "sum") -> torch.Tensor:
    """``compute(*args, k)`` (:func:`svd_ratio`, or a head-factored route taking ``(hidden, weight, bias)``), made
    safe for a training loop, which both trainers (NLG and NLU) use.

    * Non-finite input: NaN, so the trainer's finiteness check names the step and the term (no silent 0).
    * The SVD did not converge (:func:`did_not_converge`): ``on_fallback(error)`` (the trainer warns once), then the
      same value through :func:`svd_ratio_gram` on the logits (projected from ``(hidden, weight, bias)`` when that
      is what ``args`` is).
    * That does not converge either: 0. The term is a small regulariser; one batch without it must not stop a run.
    * Any other error — out of memory above all — propagates: it is not a property of this batch's matrix, and
      turning it into a silent zero term would hide it.

    ``normalizer`` (:func:`top_k_ratio`) is passed to ``compute`` as a keyword when it is not the default ``"sum"``.
    """
    try:
        return compute(*args, k) if normalizer == "sum" else compute(*args, k, normalizer=normalizer)
    except RuntimeError as error:
        if not did_not_converge(error):
            raise
        if not torch.isfinite(args[0]).all():
            return args[0].new_full((), float("nan"), dtype=torch.float32)
        if on_fallback is not None:
            on_fallback(error)
        try:
            return svd_ratio_gram(args[0] if len(args) == 1 else project(*args[:3]), k, normalizer)
        except RuntimeError as second:
            if not did_not_converge(second):
                raise
            return args[0].new_zeros((), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------------------
# NLG: the whole head, plain path
# --------------------------------------------------------------------------------------------------------------


@dataclass
class HeadTerms:
    """Per-token terms at the N response positions, plus the logits the SVD term needs.

    ``nll``, ``kl`` and ``entropy`` are [N] (``kl``/``entropy`` None when not asked for); ``logits`` is the
    [N, V] policy logit matrix when the SVD term is asked for, else None.
    """

    nll: torch.Tensor
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of a linear head in float32: hidden [N, d] · weightᵀ [d, V] (+ bias)."""
    with torch.autocast(hidden.device.type, enabled=False):
        return F.linear(_wide(hidden), _wide(weight), None if bias is None else _wide(bias))


def head_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
    keep_logits: bool = False,
) -> HeadTerms:
    """The plain head: materialise the [N, V] logits of the response positions and evaluate every term.

    ``hidden`` [N, d] are the final hidden states at the positions whose next token is a trained response token,
    ``labels`` [N] those next tokens, ``ref_logits`` [N, V] the reference model's logits at the same positions
    (None: no KL term).
    """
    logits = project(hidden, weight, bias)
    return HeadTerms(
        nll=token_nll(logits, labels),
        kl=None if ref_logits is None else token_kl(ref_logits, logits, temperature),
        entropy=token_entropy(logits) if entropy else None,
        logits=logits if keep_logits else None,
    )


# --------------------------------------------------------------------------------------------------------------
# NLU terms
# --------------------------------------------------------------------------------------------------------------


def nlu_consistency(pretrained: torch.Tensor, finetuned: torch.Tensor,
                    anchored: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5: mean over the batch of ‖F_p/‖F_p‖ − F_f/‖F_f‖‖² (rows L2-normalised, squared error summed over D).

    ``pretrained`` carries no gradient (it comes from the frozen reference). ``anchored`` (bool [M], label-consistent
    anchoring, our extension) keeps only those rows' errors, still divided by M: (1/M) Σ_m a_m ‖…‖².
    """
    p = F.normalize(_wide(pretrained).detach(), dim=-1)
    f = F.normalize(_wide(finetuned), dim=-1)
    error = (p - f).pow(2).sum(-1)
    if anchored is None:
        return error.mean()
    return torch.where(anchored.to(error.device), error, torch.zeros_like(error)).sum() / max(error.shape[0], 1)


def nlu_diversity(features: torch.Tensor) -> torch.Tensor:
    """Eqs. 6-7: (1/D) Σ_{i≠j} C_ij², C = (1/(M−1)) Σ_m (f_m − f̄)(f_m − f̄)ᵀ over the batch of M rows.

    0 for a batch of one row (no covariance can be estimated) and for D = 1 (no off-diagonal entries).
    """
    f = _wide(features)
    m, d = f.shape
    if m < 2 or d < 2:
        return f.sum() * 0.0
    centred = f - f.mean(0, keepdim=True)
    cov = centred.T @ centred / (m - 1)
    off_diagonal = cov - torch.diag_embed(torch.diagonal(cov))
    return off_diagonal.pow(2).sum() / d


def check_finite_loss(loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int, reduce=None) -> None:
    """Raise ``FloatingPointError`` naming the step and the non-finite term(s) when ``loss`` is not finite on any rank.

    ``reduce(flag)`` sums a one-element tensor over the ranks (``accelerator.reduce(flag, "sum")``); every rank
    calls it at every step whatever its loss, so either all ranks raise or none does. Raising on one rank only would
    leave the others waiting in their next collective (a hang, not an error). None: this process only.
    """
    here = not bool(torch.isfinite(loss.detach()))
    flag = torch.tensor([float(here)], device=loss.device)
    anywhere = bool((reduce(flag) if reduce is not None else flag).sum() > 0)
    if not anywhere:
        return
    values = {k: float(v.detach()) for k, v in terms.items()}
    if not here:
        raise FloatingPointError(
            f"BA-LoRA: non-finite loss on another rank at step {step} (this rank's terms are finite: {values}). "
            "Lower the learning rate or the λ of that term, or train in float32 to locate it."
        )
    bad = [name for name, value in terms.items() if not torch.isfinite(value.detach())]
    raise FloatingPointError(
        f"BA-LoRA: non-finite loss at step {step} (term(s): {', '.join(bad) or 'total'}; "
        f"values: {values}). Lower the learning rate or the λ of "
        "that term, or train in float32 to locate it."
    )
