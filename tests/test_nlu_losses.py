"""The NLU terms of balora_trl.losses (eqs. 5-8) against explicit float64 loops / numpy."""

import math

import numpy as np
import pytest
import torch

from balora_trl import losses


@pytest.fixture
def matrices():
    rng = np.random.default_rng(0)
    return rng.normal(size=(11, 5)) * 3, rng.normal(size=(11, 5)) * 3


def consistency_loop(p, f):
    """Eq. 5 row by row: ‖p/‖p‖ − f/‖f‖‖², averaged over rows."""
    total = 0.0
    for pi, fi in zip(p, f):
        np_, nf = math.sqrt(sum(x * x for x in pi)), math.sqrt(sum(x * x for x in fi))
        total += sum((a / np_ - b / nf) ** 2 for a, b in zip(pi, fi))
    return total / len(p)


def diversity_loop(f):
    """Eqs. 6-7 with explicit sums: C_ij = Σ_m (f_mi − f̄_i)(f_mj − f̄_j) / (M − 1); (1/D) Σ_{i≠j} C_ij²."""
    m, d = f.shape
    mean = [sum(f[r, i] for r in range(m)) / m for i in range(d)]
    total = 0.0
    for i in range(d):
        for j in range(d):
            if i != j:
                c = sum((f[r, i] - mean[i]) * (f[r, j] - mean[j]) for r in range(m)) / (m - 1)
                total += c * c
    return total / d


def test_consistency_matches_loop(matrices):
    p, f = matrices
    got = losses.nlu_consistency(torch.from_numpy(p), torch.from_numpy(f))
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(consistency_loop(p, f), rel=1e-12)
    # Scale-invariant per row, 0 for the same direction, 4 for opposite directions.
    scales = np.arange(1, 12)[:, None]
    assert losses.nlu_consistency(torch.from_numpy(p), torch.from_numpy(p * scales)).item() == pytest.approx(0, abs=1e-12)
    assert losses.nlu_consistency(torch.from_numpy(p), torch.from_numpy(-p)).item() == pytest.approx(4.0)


def test_consistency_gradient_reaches_only_the_finetuned_side(matrices):
    p, f = (torch.from_numpy(x).requires_grad_() for x in matrices)
    losses.nlu_consistency(p, f).backward()
    assert p.grad is None and f.grad is not None and torch.count_nonzero(f.grad) > 0


def test_diversity_matches_loop_and_numpy(matrices):
    _, f = matrices
    got = losses.nlu_diversity(torch.from_numpy(f)).item()
    assert got == pytest.approx(diversity_loop(f), rel=1e-12)
    cov = np.cov(f, rowvar=False, ddof=1)
    assert got == pytest.approx(((cov - np.diag(np.diag(cov))) ** 2).sum() / f.shape[1], rel=1e-12)


def test_diversity_edge_cases(matrices):
    _, f = matrices
    # D = 1 (a regression head's logits): no off-diagonal entry -> 0; one row: no covariance -> 0.
    assert losses.nlu_diversity(torch.from_numpy(f[:, :1])).item() == 0.0
    assert losses.nlu_diversity(torch.from_numpy(f[:1])).item() == 0.0
    # Uncorrelated columns (a 2² factorial design) -> 0; perfectly correlated ones -> 2·var²/D.
    design = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    assert losses.nlu_diversity(torch.from_numpy(design)).item() == pytest.approx(0.0, abs=1e-15)
    same = np.repeat(design[:, :1], 2, axis=1)
    assert losses.nlu_diversity(torch.from_numpy(same)).item() == pytest.approx(2 * (4 / 3) ** 2 / 2)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_svd_ratio_matches_numpy(matrices, k):
    _, f = matrices
    sigma = np.linalg.svd(f, compute_uv=False)
    expected = sigma[:k].sum() / sigma.sum()
    assert losses.svd_ratio(torch.from_numpy(f), k).item() == pytest.approx(expected, rel=1e-10)
    assert losses.svd_ratio_gram(torch.from_numpy(f), k).item() == pytest.approx(expected, rel=1e-8)
    # eq. 8 enters the loss as −ratio: a share in [1/D, 1] (k = D gives exactly 1).
    assert 1 / min(f.shape) - 1e-12 <= expected <= 1 + 1e-12


def test_svd_ratio_of_one_column_is_one(matrices):
    _, f = matrices
    # A regression head's [M, 1] logit matrix has one singular value: the ratio is the constant 1.
    assert losses.svd_ratio(torch.from_numpy(f[:, :1]), 1).item() == pytest.approx(1.0)


def test_svd_ratio_gradient_is_finite(matrices):
    _, f = matrices
    x = torch.from_numpy(f).requires_grad_()
    (-losses.svd_ratio(x, 1)).backward()
    assert torch.isfinite(x.grad).all() and torch.count_nonzero(x.grad) > 0
