"""The fused LM-head path: BA-LoRA's head terms without ever building [N, V] logits.

``losses.head_terms`` (the plain reference) materialises the response positions' logits of the policy and of the
reference — two [N, V] float32 matrices plus their softmax copies, gigabytes at a 256k vocabulary. Here the same
quantities come from the hidden states and the LM-head weight, in token × vocabulary tiles:

* :func:`fused_head_terms` — per-token NLL, KL(p_ref ‖ p_θ) and entropy, each with its gradient, in one pass over
  the vocabulary. Online log-sum-exp statistics give the values. For the gradient w.r.t. the hidden states the same
  pass accumulates, per token, the three vectors the backward needs — E_p[W], E_p[(z − m)·W] and E_p_ref[W] —
  so the backward is a per-token linear combination (no recomputation, any upstream gradients). Announced
  output weights (``grad_weights``, the trainer's (1, λ1, −λ2)) shrink that to one [N, d] vector. A head that is
  trained (weight/bias requiring grad) switches to a recompute backward that also returns the weight gradient.
* :func:`svd_ratio_frozen_head` — eq. 12's top-k singular value share of Z = H·Wᵀ + b, exactly, from the
  [N, d+1] matrix H_aug·Rᵀ, R the triangular factor of [W | b] (computed once per head and cached).
* :func:`head_supports_fused` — whether a model's output head is a plain frozen linear map.

Everything is computed in float32 (or float64 for float64 inputs) whatever the input dtype or autocast state:
bf16/fp16 inputs are upcast one token block / one vocabulary tile at a time.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref

import torch

from . import losses
from .head import own_logits_are_head_output

IGNORE_INDEX = -100

# Tile sizes (tokens, vocabulary entries). On CPU, tiles that stay in cache matter more than GEMM shape: every
# elementwise pass over a tile that spills to DRAM costs as much as the tile's share of the projection.
_DEFAULT_CHUNKS = {"cpu": (1024, 1024), "cuda": (4096, 4096)}
_FALLBACK_CHUNKS = (2048, 4096)


def default_chunks(device: torch.device | str) -> tuple[int, int]:
    """(chunk_tokens, chunk_vocab) used when the caller passes none."""
    return _DEFAULT_CHUNKS.get(torch.device(device).type, _FALLBACK_CHUNKS)


def _token_tiles(hidden, ref_hidden, labels, chunk, dtype, with_reference):
    """Token tiles (t0, t1, policy rows, policy + reference rows, labels) in the compute dtype."""
    for t0 in range(0, hidden.shape[0], chunk):
        t1 = min(t0 + chunk, hidden.shape[0])
        h = hidden[t0:t1].to(dtype)
        yield t0, t1, h, (torch.cat([h, ref_hidden[t0:t1].to(dtype)]) if with_reference else h), labels[t0:t1]


def _compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------------------
# per-token NLL, KL and entropy
# --------------------------------------------------------------------------------------------------------------


def _head_gathered(weight: torch.Tensor, bias: torch.Tensor | None):
    """The LM head gathered again for a backward that reads it. Under DeepSpeed ZeRO-3 a parameter is empty
    outside its module's forward, so a custom backward that recomputes from the saved weight must gather it once
    more (TRL's ``maybe_gather_lm_head_ctx`` says so); a null context for anything that is not a ZeRO-3 parameter."""
    params = [t for t in (weight, bias) if t is not None and hasattr(t, "ds_status")]
    if not params:
        return contextlib.nullcontext()
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    return maybe_gather_lm_head_ctx(*params)


class _FusedHeadTerms(torch.autograd.Function):
    """Per-token (nll, kl, entropy) of z = hidden·Wᵀ + b in tiles. See :func:`fused_head_terms`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ref_hidden, temperature, want_entropy, chunk_tokens, chunk_vocab,
                recompute, grad_weights):
        ctx.set_materialize_grads(False)
        ctx.hidden_dtype = hidden.dtype
        device = hidden.device
        dtype = _compute_dtype(hidden, weight, ref_hidden)
        n_tokens, d = hidden.shape
        vocab = weight.shape[0]
        want_kl = ref_hidden is not None
        inv_t = 1.0 / temperature
        scaled = want_kl and temperature != 1.0  # the policy needs a second (tempered) softmax for the KL
        needs_grad = any(ctx.needs_input_grad[:3])
        recompute = needs_grad and (recompute or ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        basis = needs_grad and not recompute
        # With expected upstream weights the three basis vectors are combined at once (one [N, d] kept, not three);
        # the stats for an exact recompute are kept too, in case the actual upstream gradients differ.
        combine = basis and grad_weights is not None
        keep_stats = recompute or combine
        rows = 2 if want_kl else 1  # policy rows, then reference rows, stacked into one GEMM

        f32 = dict(device=device, dtype=dtype)
        nll = torch.empty(n_tokens, **f32)
        kl = torch.empty(n_tokens, **f32) if want_kl else None
        ent = torch.empty(n_tokens, **f32) if want_entropy else None
        # what the recompute backward needs per token: log Z, E_p[z], log Z_T, log Z_ref
        log_z = torch.empty(n_tokens, **f32)
        mean_z = torch.empty(n_tokens, **f32) if (keep_stats and want_entropy) else None
        log_z_t = torch.empty(n_tokens, **f32) if (keep_stats and scaled) else None
        log_z_ref = torch.empty(n_tokens, **f32) if (keep_stats and want_kl) else None
        # the basis of the hidden-state gradient, one [N, d] matrix per output (or their combination)
        b_nll = torch.zeros(n_tokens, d, **f32) if basis else None
        b_kl = torch.zeros(n_tokens, d, **f32) if (basis and want_kl and not combine) else None
        b_ent = torch.zeros(n_tokens, d, **f32) if (basis and want_entropy and not combine) else None

        ct = max(1, min(chunk_tokens, n_tokens))
        cv = max(1, min(chunk_vocab, vocab))
        z_buf = torch.empty(rows * ct * cv, **f32)
        e_buf = torch.empty(rows * ct * cv, **f32)
        aux_buf = torch.empty(ct * cv, **f32) if (want_entropy or want_kl) else None
        et_buf = torch.empty(ct * cv, **f32) if scaled else None
        # per-row scale of the exponent: 1 for policy rows, 1/T for reference rows
        row_inv = None
        if want_kl and temperature != 1.0:
            row_inv = torch.cat([torch.ones(ct, **f32), torch.full((ct,), inv_t, **f32)])

        with torch.autocast(device.type, enabled=False), torch.no_grad():
            for t0, t1, h, hh, y in _token_tiles(hidden, ref_hidden, labels, ct, dtype, want_kl):
                n = t1 - t0
                inv = None if row_inv is None else torch.cat([row_inv[:n], row_inv[ct:ct + n]])

                m = s = sd = gap = s_t = z_y = None
                acc = acc_z = acc_t = None
                if basis:
                    acc = torch.zeros(rows * n, d, **f32)  # Σ e·W (policy rows, then reference rows)
                    acc_z = torch.zeros(n, d, **f32) if want_entropy else None  # Σ e·(z − m)·W
                    acc_t = torch.zeros(n, d, **f32) if scaled else None  # Σ e_T·W
                z_y = torch.zeros(n, **f32)

                for v0 in range(0, vocab, cv):
                    v1 = min(v0 + cv, vocab)
                    v = v1 - v0
                    w = weight[v0:v1].to(dtype)
                    z = z_buf[: rows * n * v].view(rows * n, v)
                    torch.mm(hh, w.t(), out=z)
                    if bias is not None:
                        z.add_(bias[v0:v1].to(dtype))
                    zp = z[:n]
                    local = y - v0
                    in_tile = (local >= 0) & (local < v)
                    z_y = torch.where(in_tile, zp.gather(1, local.clamp(0, v - 1).unsqueeze(1)).squeeze(1), z_y)
                    tile_gap = None
                    if want_kl:  # (z_ref − z) before the tile is shifted in place
                        tile_gap = aux_buf[: n * v].view(n, v)
                        torch.sub(z[n:], zp, out=tile_gap)

                    new_m = z.amax(1) if m is None else torch.maximum(m, z.amax(1))
                    dz = z.sub_(new_m.unsqueeze(1))  # z − m, in place
                    if inv is not None:
                        dz.mul_(inv.unsqueeze(1))
                    e = torch.exp(dz, out=e_buf[: rows * n * v].view(rows * n, v))
                    ep, dp = e[:n], dz[:n]
                    tile_s = e.sum(1)
                    if m is None:
                        rho = None
                        s = tile_s
                    else:
                        delta = m - new_m  # ≤ 0
                        rho = torch.exp(delta if inv is None else delta * inv)
                        s_old_p = s[:n]
                        s = s * rho + tile_s
                    if want_kl:
                        tile_gap.mul_(e[n:])
                        g = tile_gap.sum(1) * inv_t
                        gap = g if rho is None else gap * rho[n:] + g
                    if scaled:
                        e_t = et_buf[: n * v].view(n, v)
                        torch.exp(torch.mul(dp, inv_t, out=e_t), out=e_t)
                        tile_st = e_t.sum(1)
                        rho_t = None if rho is None else torch.exp(delta[:n] * inv_t)
                        s_t = tile_st if rho is None else s_t * rho_t + tile_st
                    ed = None
                    if want_entropy:
                        ed = torch.mul(ep, dp, out=aux_buf[: n * v].view(n, v))
                        tile_sd = ed.sum(1)
                        sd = tile_sd if rho is None else (sd + delta[:n] * s_old_p) * rho[:n] + tile_sd
                    if basis:
                        if rho is not None:
                            if acc_z is not None:
                                acc_z.add_(acc[:n] * delta[:n].unsqueeze(1)).mul_(rho[:n].unsqueeze(1))
                            acc.mul_(rho.unsqueeze(1))
                            if acc_t is not None:
                                acc_t.mul_(rho_t.unsqueeze(1))
                        acc.addmm_(e, w)
                        if acc_z is not None:
                            acc_z.addmm_(ed, w)
                        if acc_t is not None:
                            acc_t.addmm_(e_t, w)
                    m = new_m

                # ---- per-token results for this block
                valid = y != IGNORE_INDEX
                log_s = torch.log(s)
                lz = m[:n] + log_s[:n]
                log_z[t0:t1] = lz
                nll[t0:t1] = torch.where(valid, lz - z_y, torch.zeros_like(lz))
                if want_entropy:
                    shift = sd / s[:n]  # E_p[z] − m
                    ent[t0:t1] = log_s[:n] - shift
                    if mean_z is not None:
                        mean_z[t0:t1] = m[:n] + shift
                if want_kl:
                    lz_ref = m[n:] * inv_t + log_s[n:]
                    lz_t = (m[:n] * inv_t + torch.log(s_t)) if scaled else lz
                    kl[t0:t1] = gap / s[n:] - lz_ref + lz_t
                    if log_z_ref is not None:
                        log_z_ref[t0:t1] = lz_ref
                    if log_z_t is not None:
                        log_z_t[t0:t1] = lz_t
                if basis:
                    ew = acc[:n] / s[:n].unsqueeze(1)  # E_p[W]
                    w_y = weight[y.clamp(min=0)].to(dtype)
                    parts = [torch.where(valid.unsqueeze(1), ew - w_y, torch.zeros_like(ew))]
                    if want_kl:  # Σ_v (p_T,v − p_ref,v) W_v / T
                        ew_t = acc_t / s_t.unsqueeze(1) if scaled else ew
                        parts.append((ew_t - acc[n:] / s[n:].unsqueeze(1)) * inv_t)
                    if want_entropy:  # −Σ_v p_v (log p_v + H) W_v = −(E_p[(z − m)W] − (E_p[z] − m)·E_p[W])
                        parts.append(-(acc_z / s[:n].unsqueeze(1) - shift.unsqueeze(1) * ew))
                    if combine:
                        w_n, w_k, w_e = grad_weights
                        weights = [w_n] + ([w_k] if want_kl else []) + ([w_e] if want_entropy else [])
                        b_nll[t0:t1] = sum(w * part for w, part in zip(weights, parts))
                    else:
                        for store, part in zip([b_nll] + ([b_kl] if want_kl else []) + ([b_ent] if want_entropy
                                                                                        else []), parts):
                            store[t0:t1] = part

        ctx.want_kl, ctx.want_entropy, ctx.scaled = want_kl, want_entropy, scaled
        ctx.temperature, ctx.chunks, ctx.dtype = temperature, (ct, cv), dtype
        ctx.recompute, ctx.basis = recompute, basis
        ctx.grad_weights = None  # the weights of the outputs that exist (an absent one expects no gradient)
        if combine:
            ctx.grad_weights = (grad_weights[0], grad_weights[1] if want_kl else 0.0,
                                grad_weights[2] if want_entropy else 0.0)
            ctx.save_for_backward(hidden, weight, bias, labels, ref_hidden, log_z, mean_z, log_z_t, log_z_ref, b_nll)
        elif basis:
            ctx.save_for_backward(b_nll, b_kl, b_ent)
        elif recompute:
            ctx.save_for_backward(hidden, weight, bias, labels, ref_hidden, log_z, mean_z, log_z_t, log_z_ref)
        empty = hidden.new_empty(0, dtype=dtype)
        outs = (nll, kl if want_kl else empty, ent if want_entropy else empty.clone())
        if not want_kl:
            ctx.mark_non_differentiable(outs[1])
        if not want_entropy:
            ctx.mark_non_differentiable(outs[2])
        return outs

    @staticmethod
    def backward(ctx, g_nll, g_kl, g_ent):
        if not ctx.want_kl:
            g_kl = None
        if not ctx.want_entropy:
            g_ent = None
        none = (None,) * 11
        if all(g is None for g in (g_nll, g_kl, g_ent)):
            return none
        if ctx.grad_weights is not None:
            combined = ctx.saved_tensors[-1]
            scale = _proportional(ctx.grad_weights, (g_nll, g_kl, g_ent))
            if scale is not None:
                return (combined.mul(scale.to(combined.dtype).unsqueeze(1)).to(ctx.hidden_dtype),) + none[1:]
            _FusedHeadTerms.fallbacks += 1
            return _recompute_backward(ctx, g_nll, g_kl, g_ent, ctx.saved_tensors[:-1])
        if ctx.basis:
            grad = None
            for g, b in zip((g_nll, g_kl, g_ent), ctx.saved_tensors):
                if g is not None:
                    term = b * g.to(b.dtype).unsqueeze(1)
                    grad = term if grad is None else grad.add_(term)
            return (grad.to(ctx.hidden_dtype),) + none[1:]
        if not ctx.recompute:
            return none
        return _recompute_backward(ctx, g_nll, g_kl, g_ent, ctx.saved_tensors)

    fallbacks = 0  # how many backwards found upstream gradients not proportional to `grad_weights` (tests)


def _proportional(weights, grads) -> torch.Tensor | None:
    """c [N] with grads[i] = c · weights[i] for every output, up to a few ulps (a None grad counts as 0), or None."""
    ref = next((i for i, w in enumerate(weights) if w != 0 and grads[i] is not None), None)
    if ref is None:
        return None
    c = grads[ref] / weights[ref]
    rtol = 16 * torch.finfo(c.dtype).eps  # autograd forms λ·g/D and g/D in different orders: a few ulps apart
    for w, g in zip(weights, grads):
        if g is None:
            if w != 0:
                return None
            continue
        expected = c * w
        if not bool(((g - expected).abs() <= rtol * expected.abs()).all()):
            return None
    return c


def _recompute_backward(ctx, g_nll, g_kl, g_ent, saved):
    """Backward by recomputing each tile: dL/dz exactly, then dL/dh, dL/dW, dL/db (a trained head, or upstream
    gradients other than the announced ``grad_weights``), with the head gathered again (ZeRO-3)."""
    with _head_gathered(saved[1], saved[2]):
        return _recompute_tiles_backward(ctx, g_nll, g_kl, g_ent, saved)


def _recompute_tiles_backward(ctx, g_nll, g_kl, g_ent, saved):
    hidden, weight, bias, labels, ref_hidden, log_z, mean_z, log_z_t, log_z_ref = saved
    dtype = ctx.dtype
    device = hidden.device
    ct, cv = ctx.chunks
    n_tokens, d = hidden.shape
    vocab = weight.shape[0]
    inv_t = 1.0 / ctx.temperature
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    f32 = dict(device=device, dtype=dtype)
    grad_h = torch.zeros(n_tokens, d, **f32) if need_h else None
    grad_w = torch.zeros(vocab, d, **f32) if need_w else None
    grad_b = torch.zeros(vocab, **f32) if (need_b and bias is not None) else None
    want_kl = g_kl is not None
    with torch.autocast(device.type, enabled=False), torch.no_grad():
        for t0, t1, h, hh, y in _token_tiles(hidden, ref_hidden, labels, ct, dtype, want_kl):
            n = t1 - t0
            valid = y != IGNORE_INDEX
            lz = log_z[t0:t1].unsqueeze(1)
            gn = None if g_nll is None else (g_nll[t0:t1].to(dtype) * valid).unsqueeze(1)
            ge = None if g_ent is None else g_ent[t0:t1].to(dtype).unsqueeze(1)
            gk = None if g_kl is None else g_kl[t0:t1].to(dtype).unsqueeze(1) * inv_t
            for v0 in range(0, vocab, cv):
                v1 = min(v0 + cv, vocab)
                w = weight[v0:v1].to(dtype)
                z = hh @ w.t()
                if bias is not None:
                    z += bias[v0:v1].to(dtype)
                zp = z[:n]
                p = torch.exp(zp - lz)
                grad_z = torch.zeros_like(p)
                if gn is not None:
                    grad_z += gn * p
                    local = y - v0
                    hit = valid & (local >= 0) & (local < v1 - v0)
                    rows_hit = hit.nonzero().squeeze(1)
                    grad_z[rows_hit, local[rows_hit]] -= gn[rows_hit, 0]
                if ge is not None:  # d(−Σ p log p)/dz = −p (log p + H) = −p (z − E_p[z])
                    grad_z -= ge * p * (zp - mean_z[t0:t1].unsqueeze(1))
                if gk is not None:  # dKL/dz = (p_T − p_ref) / T
                    p_t = p if log_z_t is None else torch.exp(zp * inv_t - log_z_t[t0:t1].unsqueeze(1))
                    p_ref = torch.exp(z[n:] * inv_t - log_z_ref[t0:t1].unsqueeze(1))
                    grad_z += gk * (p_t - p_ref)
                if grad_h is not None:
                    grad_h[t0:t1].addmm_(grad_z, w)
                if grad_w is not None:
                    grad_w[v0:v1].addmm_(grad_z.t(), h)
                if grad_b is not None:
                    grad_b[v0:v1] += grad_z.sum(0)
    return (
        None if grad_h is None else grad_h.to(hidden.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    ) + (None,) * 8


def fused_head_terms(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    ref_hidden: torch.Tensor | None = None,
    kl_mask: torch.Tensor | None = None,
    temperature: float = 1.0,
    entropy: bool = False,
    chunk_tokens: int | None = None,
    chunk_vocab: int | None = None,
    recompute: bool = False,
    grad_weights: tuple[float, float, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token NLL, KL(p_ref ‖ p_θ) and entropy of the linear head z = hidden·Wᵀ + b, without [N, V] logits.

    Args:
        hidden: [N, d] policy final hidden states at the trained positions.
        weight: [V, d] LM-head weight, shared by policy and reference. bias: [V] or None.
        labels: [N] next tokens; ``-100`` rows get nll 0 and no nll gradient (like ``F.cross_entropy``).
        ref_hidden: [N, d] the reference's hidden states at the same positions, or None (no KL). It carries no
            gradient: the reference distribution is a constant of the loss.
        kl_mask: optional bool [N], the positions whose KL is computed (label-consistent anchoring: the rows where
            :func:`reference_top1` equals the label). The KL is 0 with no gradient elsewhere, and the reference
            rows of those positions are never projected; with no position set, no reference-head work at all.
        temperature: T of both distributions in the KL (NLL and entropy are at T = 1, as in ``losses``).
        entropy: whether to return the entropy.
        chunk_tokens, chunk_vocab: tile shape (default: :func:`default_chunks` for the device).
        recompute: use the recompute backward even for a frozen head (the default backward for a frozen head
            needs no recomputation; a head whose weight or bias requires grad always recomputes).
        grad_weights: optional (w_nll, w_kl, w_entropy), the weights the caller will give the three outputs'
            sums (the trainer: ``(1, λ1, −λ2)``). The forward then keeps one [N, d] gradient vector per token
            instead of three. The backward checks that the upstream gradients are proportional to these weights
            per token and otherwise recomputes the tiles, so any upstream gradient stays exact.

    Returns:
        ``(nll [N], kl [N] | None, entropy [N] | None)`` in float32 (float64 for float64 inputs), each
        differentiable w.r.t. ``hidden`` (and ``weight``/``bias`` when they require grad) for any upstream gradient.
        Equal to ``losses.head_terms(hidden, weight, bias, labels, ref_logits=losses.project(ref_hidden, weight,
        bias), temperature=temperature, entropy=entropy)`` within floating-point tolerance.
    """
    # Every option but the row-aligned tensors, forwarded unchanged when `kl_mask` splits the rows.
    options = {k: v for k, v in locals().items() if k not in ("hidden", "weight", "bias", "labels", "ref_hidden",
                                                                "kl_mask")}
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"Expected hidden [N, d] and weight [V, d], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}.")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [N] = [{hidden.shape[0]}], got {tuple(labels.shape)}.")
    if ref_hidden is not None and ref_hidden.shape != hidden.shape:
        raise ValueError(f"ref_hidden must match hidden {tuple(hidden.shape)}, got {tuple(ref_hidden.shape)}.")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    default_t, default_v = default_chunks(hidden.device)
    chunk_tokens = default_t if chunk_tokens is None else int(chunk_tokens)
    chunk_vocab = default_v if chunk_vocab is None else int(chunk_vocab)
    if chunk_tokens < 1 or chunk_vocab < 1:
        raise ValueError("chunk_tokens and chunk_vocab must be >= 1.")
    labels = labels.to(device=hidden.device, dtype=torch.long)
    if labels.numel() and bool(((labels < 0) & (labels != IGNORE_INDEX) | (labels >= weight.shape[0])).any()):
        raise ValueError(f"labels must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}.")
    if ref_hidden is not None:
        ref_hidden = ref_hidden.detach()
        if kl_mask is not None:
            if kl_mask.shape != labels.shape:
                raise ValueError(f"kl_mask must be [N] = [{hidden.shape[0]}], got {tuple(kl_mask.shape)}.")
            kl_mask = kl_mask.to(device=hidden.device, dtype=torch.bool)
            if not bool(kl_mask.all()):
                return _masked_kl_terms(hidden, weight, bias, labels, ref_hidden, kl_mask, options)
    nll, kl, ent = _FusedHeadTerms.apply(
        hidden, weight, bias, labels, ref_hidden, float(temperature), bool(entropy), chunk_tokens, chunk_vocab,
        bool(recompute), None if grad_weights is None else tuple(float(w) for w in grad_weights),
    )
    return nll, (kl if ref_hidden is not None else None), (ent if entropy else None)


def _masked_kl_terms(hidden, weight, bias, labels, ref_hidden, kl_mask, options):
    """:func:`fused_head_terms` with the KL at the ``kl_mask`` rows only: the anchored rows go through one call with
    their reference rows, the others through one without a reference, and the per-token results are put back in
    place (differentiably). No anchored row: the single call has no reference and the KL is 0."""
    free = (~kl_mask).nonzero().squeeze(1)
    anchored = kl_mask.nonzero().squeeze(1)
    if anchored.numel() == 0:
        nll, _, ent = fused_head_terms(hidden, weight, bias, labels, **options)
        return nll, nll.new_zeros(nll.shape), ent
    a = fused_head_terms(hidden[anchored], weight, bias, labels[anchored], ref_hidden=ref_hidden[anchored], **options)
    b = fused_head_terms(hidden[free], weight, bias, labels[free], **options)
    n = hidden.shape[0]

    def place(value_a, value_b):
        if value_a is None and value_b is None:
            return None
        template = value_a if value_a is not None else value_b
        out = template.new_zeros(n)
        for rows, value in ((anchored, value_a), (free, value_b)):
            if value is not None:
                out = out.index_put((rows,), value)
        return out

    return place(a[0], b[0]), place(a[1], None), place(a[2], b[2])


def _logit_tiles(hidden, weight, bias, chunk_tokens, chunk_vocab):
    """For each token tile: (t0, t1, its vocabulary tiles), these an iterator of (v0, z = h·W[v0:v0+cv]ᵀ + b) in
    the compute dtype. The building block of the tiled searches below (no gradient: call it under no_grad)."""
    dtype = _compute_dtype(hidden, weight)
    default_t, default_v = default_chunks(hidden.device)
    ct, cv = max(1, chunk_tokens or default_t), max(1, chunk_vocab or default_v)

    def vocab_tiles(h):
        for v0 in range(0, weight.shape[0], cv):
            z = h @ weight[v0:v0 + cv].to(dtype).t()
            if bias is not None:
                z += bias[v0:v0 + cv].to(dtype)
            yield v0, z

    for t0 in range(0, hidden.shape[0], ct):
        h = hidden[t0:t0 + ct].to(dtype)
        yield t0, t0 + h.shape[0], vocab_tiles(h)


def reference_top1(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   chunk_tokens: int | None = None, chunk_vocab: int | None = None) -> torch.Tensor:
    """argmax_v (hidden·Wᵀ + b)[t, v] per row [N] (long), in token × vocabulary tiles: a running maximum and its
    index across the tiles, never the [N, V] logits. Ties go to the first maximal index, like ``torch.argmax``
    (a later tile replaces the running index only when strictly larger). No gradient."""
    top = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        for t0, t1, tiles in _logit_tiles(hidden, weight, bias, chunk_tokens, chunk_vocab):
            best = idx = None
            for v0, z in tiles:
                tile_best, tile_idx = z.max(1)
                if best is None:
                    best, idx = tile_best, tile_idx
                else:
                    better = tile_best > best
                    best = torch.where(better, tile_best, best)
                    idx = torch.where(better, tile_idx + v0, idx)
            top[t0:t1] = idx
    return top


# --------------------------------------------------------------------------------------------------------------
# exact SVD term for a frozen linear head
# --------------------------------------------------------------------------------------------------------------

_R_CACHE: dict = {}
_R_LOCK = threading.Lock()
_R_CACHE_SIZE = 4


def _head_key(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> tuple:
    def one(t):
        if t is None:
            return None
        return (id(t), t._version, tuple(t.shape), t.dtype, t.device)

    return one(weight), one(bias), dtype


def head_triangular_factor(weight: torch.Tensor, bias: torch.Tensor | None = None, *, dtype=torch.float32,
                           chunk_vocab: int | None = None) -> torch.Tensor:
    """Upper-triangular R [(d+1), (d+1)] (or [d, d] without bias) with [W | b] = Q·R, Q with orthonormal columns.

    Computed by a tall-skinny QR over vocabulary tiles (R ← qr([R; W_tile])), so neither an fp32 copy of W nor Q
    is ever built. Cached per (weight, bias) tensor, their ``_version`` (an in-place update invalidates the entry),
    shape, dtype and device.
    """
    key = _head_key(weight, bias, dtype)
    with _R_LOCK:
        entry = _R_CACHE.get(key)
        if entry is not None and entry[0]() is weight and (bias is None or entry[1]() is bias):
            return entry[2]
    vocab, d = weight.shape
    cols = d + (bias is not None)
    step = max(cols, chunk_vocab or max(4 * cols, 8192))
    r = None
    with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):
        for v0 in range(0, vocab, step):
            v1 = min(v0 + step, vocab)
            tile = weight[v0:v1].to(dtype)
            if bias is not None:
                tile = torch.cat([tile, bias[v0:v1].to(dtype).unsqueeze(1)], dim=1)
            stacked = tile if r is None else torch.cat([r, tile])
            r = torch.linalg.qr(stacked, mode="r").R
        if r.shape[0] < cols:  # fewer vocabulary rows than columns: pad R to square with zero rows
            r = torch.cat([r, r.new_zeros(cols - r.shape[0], cols)])
    with _R_LOCK:
        _R_CACHE[key] = (weakref.ref(weight), None if bias is None else weakref.ref(bias), r)
        while len(_R_CACHE) > _R_CACHE_SIZE:
            _R_CACHE.pop(next(iter(_R_CACHE)))
    return r


def svd_ratio_frozen_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *,
                          float64: bool = False, normalizer: str = "sum") -> torch.Tensor:
    """Σ_{i≤k} σ_i / Σ_j σ_j (or / ‖Z‖_F, ``normalizer="frobenius"``) of Z = hidden·Wᵀ + b [N, V], exactly,
    without Z.

    With [W | b] = Q·R (Q orthonormal columns), Z = [hidden | 1]·Rᵀ·Qᵀ has the singular values of the
    [N, d+1] matrix [hidden | 1]·Rᵀ, so the SVD costs O(N·d·min(N, d)) instead of O(N·V·min(N, V)).
    These are *all* of Z's non-zero singular values, so ‖Z‖_F = (Σ_j σ_j²)^½ comes out exactly too.
    Differentiable w.r.t. ``hidden``. A head that requires grad is not frozen: the plain path is used.
    Equal to ``losses.svd_ratio(losses.project(hidden, weight, bias), k, normalizer)``.
    """
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return losses.svd_ratio(losses.project(hidden, weight, bias), k, normalizer)
    dtype = torch.float64 if (float64 or hidden.dtype == torch.float64) else torch.float32
    r = head_triangular_factor(weight, bias, dtype=dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.to(dtype)
        if bias is not None:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        sigma = torch.linalg.svdvals(h @ r.t().to(h.device))
    ratio = losses.top_k_ratio(sigma, k, normalizer)
    return ratio if float64 or hidden.dtype == torch.float64 else ratio.float()


# --------------------------------------------------------------------------------------------------------------
# the release's top-k entropy, and the reference's entropy (adaptive λ1)
# --------------------------------------------------------------------------------------------------------------


def topk_indices(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *,
                 chunk_tokens: int | None = None, chunk_vocab: int | None = None) -> torch.Tensor:
    """Indices [N, k] of each row's k largest logits of hidden·Wᵀ + b, in token × vocabulary tiles: a running
    top-k merged with each tile's top-k, never the [N, V] logits. No gradient."""
    k = min(int(k), weight.shape[0])
    out = torch.empty(hidden.shape[0], k, dtype=torch.long, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        for t0, t1, tiles in _logit_tiles(hidden, weight, bias, chunk_tokens, chunk_vocab):
            best = idx = None
            for v0, z in tiles:
                tile_best, tile_idx = z.topk(min(k, z.shape[1]), dim=1)
                tile_idx += v0
                if best is not None:
                    tile_best, pick = torch.cat([best, tile_best], 1).topk(k, dim=1)
                    tile_idx = torch.cat([idx, tile_idx], 1).gather(1, pick)
                best, idx = tile_best, tile_idx
            out[t0:t1] = idx
    return out


class _GatheredLogits(torch.autograd.Function):
    """z[n, j] = hidden[n]·W[idx[n, j]] + b[idx[n, j]]: a few logits per row, with gradients, in token blocks
    (the [block, k, d] gathered rows are never all alive at once)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, idx, chunk):
        dtype = _compute_dtype(hidden, weight)
        out = torch.empty(idx.shape, device=hidden.device, dtype=dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for t0 in range(0, hidden.shape[0], chunk):
                rows = idx[t0:t0 + chunk]
                z = torch.einsum("nkd,nd->nk", weight[rows].to(dtype), hidden[t0:t0 + chunk].to(dtype))
                out[t0:t0 + chunk] = z if bias is None else z + bias[rows].to(dtype)
        ctx.save_for_backward(hidden, weight, bias, idx)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, idx = ctx.saved_tensors
        with _head_gathered(weight, bias):  # the k gathered rows of W are read again here
            return _GatheredLogits._backward(ctx, grad, hidden, weight, bias, idx)

    @staticmethod
    def _backward(ctx, grad, hidden, weight, bias, idx):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, chunk = ctx.dtype, ctx.chunk
        grad = grad.to(dtype)
        grad_h = torch.empty(hidden.shape, device=hidden.device, dtype=dtype) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=dtype) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=dtype) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for t0 in range(0, hidden.shape[0], chunk):
                rows, g = idx[t0:t0 + chunk], grad[t0:t0 + chunk]
                if grad_h is not None:
                    grad_h[t0:t0 + chunk] = torch.einsum("nk,nkd->nd", g, weight[rows].to(dtype))
                if grad_w is not None:
                    outer = g.unsqueeze(2) * hidden[t0:t0 + chunk].to(dtype).unsqueeze(1)
                    grad_w.index_add_(0, rows.reshape(-1), outer.reshape(-1, weight.shape[1]))
                if grad_b is not None:
                    grad_b.index_add_(0, rows.reshape(-1), g.reshape(-1))
        return (None if grad_h is None else grad_h.to(hidden.dtype),
                None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None)


def fused_topk_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, *,
                       chunk_tokens: int | None = None, chunk_vocab: int | None = None) -> torch.Tensor:
    """Per-row H(softmax(z_topk)) of z = hidden·Wᵀ + b, the release's top-k entropy, without [N, V] logits.

    One no-grad pass over the vocabulary finds each row's k largest logits (:func:`topk_indices`); those k logits
    are recomputed with gradients (:class:`_GatheredLogits`), so the backward touches k rows of W per token, not V.
    Equal to ``losses.token_entropy_topk(losses.project(hidden, weight, bias), k)``, gradients included.
    """
    idx = topk_indices(hidden, weight, bias, k, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    chunk = max(1, chunk_tokens or default_chunks(hidden.device)[0])
    return losses.token_entropy(_GatheredLogits.apply(hidden, weight, bias, idx, chunk))


def fused_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  temperature: float = 1.0, chunk_tokens: int | None = None,
                  chunk_vocab: int | None = None) -> torch.Tensor:
    """Per-row H(softmax((hidden·Wᵀ + b) / T)) by an online log-sum-exp over vocabulary tiles; no gradient.

    With m the running maximum of z/T, s = Σ e^{z/T − m} and u = Σ e^{z/T − m}·(z/T − m): H = log s − u / s
    (rescaled by e^{m_old − m_new} when the maximum moves). The adaptive λ1 uses it on the reference rows.
    """
    dtype = _compute_dtype(hidden, weight)
    default_t, default_v = default_chunks(hidden.device)
    ct, cv = max(1, chunk_tokens or default_t), max(1, chunk_vocab or default_v)
    out = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False), torch.no_grad():
        for t0 in range(0, hidden.shape[0], ct):
            h = hidden[t0:t0 + ct].to(dtype)
            m = s = u = None
            for v0 in range(0, weight.shape[0], cv):
                z = h @ weight[v0:v0 + cv].to(dtype).t()
                if bias is not None:
                    z += bias[v0:v0 + cv].to(dtype)
                z /= temperature
                new_m = z.amax(1) if m is None else torch.maximum(m, z.amax(1))
                z -= new_m.unsqueeze(1)
                e = torch.exp(z)
                tile_s, tile_u = e.sum(1), (e * z).sum(1)
                if m is None:
                    s, u = tile_s, tile_u
                else:
                    delta = m - new_m  # ≤ 0: the old sums are relative to the old maximum
                    rho = torch.exp(delta)
                    s, u = s * rho + tile_s, (u + delta * s) * rho + tile_u
                m = new_m
            out[t0:t0 + ct] = torch.log(s) - u / s
    return out


# --------------------------------------------------------------------------------------------------------------
# which heads qualify
# --------------------------------------------------------------------------------------------------------------

# Config fields by which models transform the head's output (scaling, soft-capping); any non-neutral value
# means the logits are not hidden·Wᵀ + b.
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": (None, 0, 0.0),
    "logit_scale": (None, 1, 1.0),
    "output_multiplier": (None, 1, 1.0),
    "lm_head_multiplier": (None, 1, 1.0),
    "logits_scaling": (None, 1, 1.0),
}


def head_supports_fused(model) -> tuple[bool, str]:
    """(True, "") if ``model``'s output head is a plain frozen ``nn.Linear`` whose output is the logits as they are.

    Otherwise (False, reason): no output embeddings, a wrapped/quantised/adapted head (PEFT LoRA on lm_head,
    modules_to_save, bitsandbytes), a trainable weight or bias, a config that scales or soft-caps the logits, or a
    forward that does anything between the backbone, the head and the logits (probed by running the model's own
    code, :func:`balora_trl.head.own_logits_are_head_output`: this catches what no known config field names).
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return False, "the model has no output embeddings (LM head)"
    if type(head) is not torch.nn.Linear:
        return False, f"the LM head is a {type(head).__name__}, not a plain nn.Linear"
    if head.weight.requires_grad or (head.bias is not None and head.bias.requires_grad):
        return False, "the LM head is trained (its weight or bias requires grad)"
    config = getattr(model, "config", None)
    if config is not None:
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for name, neutral in _LOGIT_TRANSFORMS.items():
            value = getattr(text_config, name, None)
            if value not in neutral:
                return False, f"the model transforms its logits (`{name}={value}`)"
    return own_logits_are_head_output(model)


__all__ = [
    "default_chunks",
    "fused_entropy",
    "fused_head_terms",
    "fused_topk_entropy",
    "head_supports_fused",
    "head_triangular_factor",
    "reference_top1",
    "svd_ratio_frozen_head",
]
