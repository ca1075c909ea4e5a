"""The pure BA-LoRA terms against independent computations (torch.distributions / numpy, float64)."""

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, kl_divergence

from balora_trl import BALoraConfig, BALoraNLUConfig, losses


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(23, 57, generator=g, dtype=torch.float64) * 3, torch.randn(23, 57, generator=g, dtype=torch.float64) * 3


def test_token_kl_is_kl_of_reference_to_policy(logits):
    ref, pol = logits
    expected = kl_divergence(Categorical(logits=ref), Categorical(logits=pol))
    torch.testing.assert_close(losses.token_kl(ref, pol), expected)
    # Direction matters: KL(p_ref ‖ p_θ) ≠ KL(p_θ ‖ p_ref) on generic inputs.
    assert not torch.allclose(losses.token_kl(ref, pol), losses.token_kl(pol, ref))
    # Temperature scales both distributions.
    expected_t = kl_divergence(Categorical(logits=ref / 2.0), Categorical(logits=pol / 2.0))
    torch.testing.assert_close(losses.token_kl(ref, pol, temperature=2.0), expected_t)


def test_token_entropy_and_nll(logits):
    _, pol = logits
    torch.testing.assert_close(losses.token_entropy(pol), Categorical(logits=pol).entropy())
    labels = torch.arange(23) % 57
    torch.testing.assert_close(losses.token_nll(pol, labels), -Categorical(logits=pol).log_prob(labels))


def test_bf16_inputs_are_computed_in_float32(logits):
    ref, pol = (x.to(torch.bfloat16) for x in logits)
    out = losses.token_kl(ref, pol)
    assert out.dtype == torch.float32
    expected = kl_divergence(Categorical(logits=ref.double()), Categorical(logits=pol.double()))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_svd_ratio_matches_numpy(logits, k):
    _, pol = logits
    sigma = np.linalg.svd(pol.numpy(), compute_uv=False)
    expected = sigma[:k].sum() / sigma.sum()
    assert losses.svd_ratio(pol, k).item() == pytest.approx(expected, rel=1e-10)
    assert losses.svd_ratio_gram(pol, k).item() == pytest.approx(expected, rel=1e-8)


def test_svd_ratio_gradient_matches_finite_differences(logits):
    _, pol = logits
    x = pol[:6, :9].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m: losses.svd_ratio(m, 2), (x,))


def test_svd_ratio_of_zero_matrix_is_zero_not_nan():
    assert losses.svd_ratio(torch.zeros(4, 5), 2).item() == 0.0


def test_nlu_consistency_and_diversity_match_explicit_formulas():
    g = torch.Generator().manual_seed(1)
    fp, ff = torch.randn(9, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    a, b = fp.numpy(), ff.numpy()
    expected = np.mean([np.sum((a[i] / np.linalg.norm(a[i]) - b[i] / np.linalg.norm(b[i])) ** 2) for i in range(9)])
    assert losses.nlu_consistency(fp, ff).item() == pytest.approx(expected, rel=1e-12)
    cov = np.cov(b, rowvar=False)  # unbiased, 1/(M-1)
    off = sum(cov[i, j] ** 2 for i in range(5) for j in range(5) if i != j) / 5
    assert losses.nlu_diversity(ff).item() == pytest.approx(off, rel=1e-12)
    assert losses.nlu_diversity(ff[:1]).item() == 0.0


@pytest.mark.parametrize(
    "field,value",
    [("lambda_consistency", -1e-4), ("lambda_diversity", float("nan")), ("lambda_svd", -1.0), ("svd_top_k", 0),
     ("kl_temperature", 0.0), ("kl_temperature", -2.0), ("head_path", "fast")],
)
def test_invalid_config_values_raise(tmp_path, field, value):
    with pytest.raises(ValueError, match=field):
        BALoraConfig(str(tmp_path), **{field: value})


def test_config_defaults_are_the_papers(tmp_path):
    c = BALoraConfig(str(tmp_path), use_cpu=True)
    assert (c.lambda_consistency, c.lambda_diversity, c.lambda_svd, c.kl_temperature) == (1e-4, 3e-4, 1e-4, 1.0)
    n = BALoraNLUConfig(str(tmp_path), use_cpu=True)
    assert (n.lambda_consistency, n.lambda_diversity, n.lambda_svd) == (1e-4, 4e-4, 1e-4)
    with pytest.raises(ValueError, match="regulariser_features"):
        BALoraNLUConfig(str(tmp_path), regulariser_features="pooled", use_cpu=True)


def test_svd_ratio_robust_fallbacks_shared_by_both_trainers(monkeypatch):
    import warnings

    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 6, generator=g), torch.randn(40, 6, generator=g)
    bias = torch.randn(40, generator=g)
    logits = losses.project(hidden, weight, bias)
    expected = losses.svd_ratio(logits, 3).item()
    steps = iter(range(10))
    warn = losses.svd_fallback_warner(lambda: next(steps))

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("svd did not converge")

    def head_route(h, w, b, k):  # a factored route over (hidden, weight, bias), like fused.svd_ratio_frozen_head
        return losses.svd_ratio(losses.project(h, w, b), k)

    assert losses.svd_ratio_robust(losses.svd_ratio, (logits,), 3, warn).item() == pytest.approx(expected)
    monkeypatch.setattr(losses.torch.linalg, "svdvals", no_convergence)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = losses.svd_ratio_robust(losses.svd_ratio, (logits,), 3, warn)
        factored = losses.svd_ratio_robust(head_route, (hidden, weight, bias), 3, warn)
    assert plain.item() == pytest.approx(expected, rel=1e-5) and factored.item() == pytest.approx(expected, rel=1e-5)
    assert [str(w.message) for w in caught if "did not converge" in str(w.message)] == [
        "BA-LoRA: the SVD did not converge at step 0 (svd did not converge); using the eigenvalues of the Gram "
        "matrix instead (warned once)."]

    bad = logits.clone()
    bad[0, 0] = float("inf")  # not a convergence problem: NaN, so the trainer's finiteness check names it
    assert torch.isnan(losses.svd_ratio_robust(losses.svd_ratio, (bad,), 3, warn))
    monkeypatch.setattr(losses.torch.linalg, "eigvalsh", no_convergence)  # both algorithms fail: 0, never a crash
    assert losses.svd_ratio_robust(losses.svd_ratio, (logits,), 3, warn).item() == 0.0


@pytest.mark.parametrize("where", ["svd", "gram"])
def test_svd_fallback_only_catches_convergence_failures(where, monkeypatch):
    """Out of memory (or any other runtime error) propagates: it must never become a silent zero SVD term."""
    logits = torch.randn(9, 40, generator=torch.Generator().manual_seed(4))
    expected = losses.svd_ratio(logits, 3).item()

    def fails_with(error):
        def raise_it(*args, **kwargs):
            raise error
        return raise_it

    if where == "gram":  # the SVD does not converge; the fallback's eigensolver then runs out of memory
        no_convergence = fails_with(torch.linalg.LinAlgError("svd did not converge"))
        monkeypatch.setattr(losses.torch.linalg, "svdvals", no_convergence)
    target = "eigvalsh" if where == "gram" else "svdvals"
    monkeypatch.setattr(losses.torch.linalg, target, fails_with(torch.OutOfMemoryError("CUDA out of memory.")))
    with pytest.raises(torch.OutOfMemoryError, match="out of memory"):
        losses.svd_ratio_robust(losses.svd_ratio, (logits,), 3, lambda error: None)
    monkeypatch.setattr(losses.torch.linalg, target, fails_with(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")))
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_EXECUTION_FAILED"):
        losses.svd_ratio_robust(losses.svd_ratio, (logits,), 3, lambda error: None)

    # A convergence failure reported as a plain RuntimeError (older cuSOLVER / MAGMA message) does fall back.
    monkeypatch.undo()
    seen = []
    monkeypatch.setattr(losses.torch.linalg, "svdvals", fails_with(RuntimeError(
        "svd_cuda: the updating process of SBDSDC did not converge (error: 11)")))
    value = losses.svd_ratio_robust(losses.svd_ratio, (logits,), 3, seen.append)
    assert value.item() == pytest.approx(expected, rel=1e-5) and len(seen) == 1
    assert not losses.did_not_converge(torch.OutOfMemoryError("CUDA out of memory. did not converge"))


def test_finite_check_agrees_across_ranks():
    """Every rank reduces its non-finite flag every step, so a NaN on one rank stops them all together."""
    finite = {"sft": torch.tensor(1.5), "kl": torch.tensor(0.25)}
    reduced = []

    def reduce_with(remote_flag):
        def reduce(flag):  # emulates accelerator.reduce(flag, "sum") over this rank and one remote rank
            assert flag.shape == (1,) and flag.dtype == torch.float32
            reduced.append(flag.item())
            return flag + remote_flag
        return reduce

    losses.check_finite_loss(torch.tensor(1.75), finite, 3, reduce=reduce_with(0.0))
    assert reduced == [0.0]  # issued although nothing is wrong here
    with pytest.raises(FloatingPointError, match=r"non-finite loss on another rank at step 3"):
        losses.check_finite_loss(torch.tensor(1.75), finite, 3, reduce=reduce_with(1.0))
    nan = {"sft": torch.tensor(1.5), "kl": torch.tensor(float("nan"))}
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 7 \(term\(s\): kl"):
        losses.check_finite_loss(torch.tensor(float("nan")), nan, 7, reduce=reduce_with(0.0))
    assert reduced == [0.0, 0.0, 1.0]
    with pytest.raises(FloatingPointError, match="step 7"):  # single process: no reduce
        losses.check_finite_loss(torch.tensor(float("inf")), nan, 7)
