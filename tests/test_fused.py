"""The fused (tiled) head path against the plain reference in ``balora_trl.losses``.

Shapes are small but cut into several uneven tiles (N = 37 tokens in blocks of 8, V = 1000 in tiles of 300), so
the online log-sum-exp rescaling and the partial last tiles are exercised.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from balora_trl import fused, losses
from balora_trl.fused import fused_head_terms, head_supports_fused, svd_ratio_frozen_head

N, D, V = 37, 16, 1000
CHUNKS = dict(chunk_tokens=8, chunk_vocab=300)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_inputs(dtype=torch.float64, bias=True, scale=1.0, seed=0, ignore=(3, 10, 36)):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, D, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5).to(dtype)
    b = (torch.randn(V, generator=g, dtype=torch.float64)).to(dtype) if bias else None
    ref_hidden = (hidden.detach().double() + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[list(ignore)] = -100
    upstream = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(3)]
    return hidden, weight, b, ref_hidden, labels, upstream


def plain_terms(hidden, weight, bias, labels, ref_hidden, temperature, entropy):
    ref_logits = None if ref_hidden is None else losses.project(ref_hidden, weight, bias).detach()
    out = losses.head_terms(hidden, weight, bias, labels, ref_logits=ref_logits, temperature=temperature,
                            entropy=entropy)
    return out.nll, out.kl, out.entropy


def weighted(terms, upstream):
    """Σ_t g_t · term_t over every present output: arbitrary per-token upstream gradients."""
    return sum((t * g.to(t.dtype)).sum() for t, g in zip(terms, upstream) if t is not None)


@pytest.mark.parametrize(
    "bias,kl,entropy,temperature,recompute",
    [
        (False, False, False, 1.0, False),  # NLL only
        (True, False, True, 1.0, False),  # + entropy, bias
        (False, True, False, 1.0, False),  # + KL
        (True, True, True, 1.0, False),  # all three
        (True, True, True, 0.7, False),  # all three, tempered KL
        (False, True, True, 0.7, True),  # recompute backward
        (True, True, True, 1.0, True),
        (False, False, True, 1.0, True),
    ],
)
def test_values_and_gradients_equal_plain_path_fp64(bias, kl, entropy, temperature, recompute):
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs(bias=bias)
    ref_hidden = ref_hidden if kl else None
    ours = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, temperature=temperature,
                            entropy=entropy, recompute=recompute, **CHUNKS)
    plain = plain_terms(hidden, weight, b, labels, ref_hidden, temperature, entropy)
    for mine, theirs in zip(ours, plain):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert mine.dtype == torch.float64 and mine.shape == (N,)
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(weighted(ours, upstream), hidden)
    (expected,) = torch.autograd.grad(weighted(plain, upstream), hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_fp32_within_fp32_tolerance_of_fp64_plain(scale):
    """fp32 inputs: the fused result is as close to the fp64 truth as the plain fp32 path is (large logits too)."""
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs(torch.float32, scale=scale)
    ours = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, temperature=1.3, entropy=True, **CHUNKS)
    truth_h = hidden.detach().double().requires_grad_()
    truth = plain_terms(truth_h, weight.double(), b.double(), labels, ref_hidden.double(), 1.3, True)
    for mine, exact in zip(ours, truth):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine.double(), exact, rtol=2e-5, atol=2e-5 * scale)
    (grad,) = torch.autograd.grad(weighted(ours, upstream), hidden)
    (expected,) = torch.autograd.grad(weighted(truth, upstream), truth_h)
    torch.testing.assert_close(grad.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kl,entropy,temperature", [(True, True, 1.0), (True, True, 0.7), (False, True, 1.0),
                                                     (True, False, 1.0)])
def test_announced_grad_weights_keep_one_vector_and_stay_exact(kl, entropy, temperature):
    """The trainer's use: loss = Σnll/D + λ1·Σkl/D − λ2·Σent/D, announced as grad_weights=(1, λ1, −λ2)."""
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs()
    ref_hidden = ref_hidden if kl else None
    lam1, lam2, denom = 1e-4, 3e-4, 34.0

    def trainer_loss(terms):
        nll, kl_, ent = terms
        loss = nll.sum() / denom
        if kl_ is not None:
            loss = loss + lam1 * kl_.sum() / denom
        if ent is not None:
            loss = loss - lam2 * ent.sum() / denom
        return loss * 3.0  # e.g. the number of processes

    plain = plain_terms(hidden, weight, b, labels, ref_hidden, temperature, entropy)
    (expected,) = torch.autograd.grad(trainer_loss(plain), hidden)
    before = fused._FusedHeadTerms.fallbacks
    ours = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, temperature=temperature,
                            entropy=entropy, grad_weights=(1.0, lam1, -lam2), **CHUNKS)
    (grad,) = torch.autograd.grad(trainer_loss(ours), hidden)
    assert fused._FusedHeadTerms.fallbacks == before  # proportional upstream: the stored vector was used
    torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-13)
    # Any other upstream gradient (here random per token) falls back to an exact recompute.
    ours = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, temperature=temperature,
                            entropy=entropy, grad_weights=(1.0, lam1, -lam2), **CHUNKS)
    (grad,) = torch.autograd.grad(weighted(ours, upstream), hidden)
    plain = plain_terms(hidden, weight, b, labels, ref_hidden, temperature, entropy)
    (expected,) = torch.autograd.grad(weighted(plain, upstream), hidden)
    assert fused._FusedHeadTerms.fallbacks == before + 1
    torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-12)


def test_ignored_positions_have_zero_nll_and_no_nll_gradient():
    hidden, weight, b, ref_hidden, labels, _ = make_inputs()
    nll, kl, ent = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, entropy=True, **CHUNKS)
    ignored = labels == -100
    assert ignored.sum() == 3
    assert torch.all(nll[ignored] == 0)
    torch.testing.assert_close(nll, F.cross_entropy(losses.project(hidden, weight, b), labels, reduction="none"))
    (grad,) = torch.autograd.grad(nll.sum(), hidden)
    assert torch.all(grad[ignored] == 0) and torch.all(grad[~ignored].abs().sum(1) > 0)
    # KL and entropy do not look at labels: the trainer drops padding rows before calling (hidden[mask]).
    keep = ~ignored
    sub = fused_head_terms(hidden[keep], weight, b, labels[keep], ref_hidden=ref_hidden[keep], entropy=True, **CHUNKS)
    for full, part in zip((nll, kl, ent), sub):
        torch.testing.assert_close(full[keep], part, rtol=1e-12, atol=1e-12)


def test_trained_head_gets_weight_and_bias_gradients():
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs()
    weight.requires_grad_()
    b.requires_grad_()
    ours = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, temperature=0.8, entropy=True, **CHUNKS)
    plain = plain_terms(hidden, weight, b, labels, ref_hidden, 0.8, True)
    grads = torch.autograd.grad(weighted(ours, upstream), (hidden, weight, b))
    expected = torch.autograd.grad(weighted(plain, upstream), (hidden, weight, b))
    for mine, theirs in zip(grads, expected):
        torch.testing.assert_close(mine, theirs, rtol=1e-11, atol=1e-12)


def tiny_model(family, vocab=300, **overrides):
    from transformers import AutoModelForCausalLM

    from balora_trl.local_models import causal_lm_config

    torch.manual_seed(0)
    config = causal_lm_config(family, vocab, hidden_size=32, num_layers=1, **overrides)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float64)


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_tied_embeddings(train_embeddings):
    """Qwen2-style tied head: the head weight is the input embedding. Gradients through both uses are exact."""
    model = tiny_model("qwen2")
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight
    head.weight.requires_grad_(train_embeddings)
    assert head_supports_fused(model)[0] is (not train_embeddings)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 300, (2, 12), generator=g)
    labels = torch.randint(0, 300, (24,), generator=g)

    def grads(path):
        model.zero_grad()
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(24, -1)
        ref_hidden = (hidden.detach() + 0.1).flip(0)
        if path == "fused":
            terms = fused_head_terms(hidden, head.weight, head.bias, labels, ref_hidden=ref_hidden, entropy=True,
                                     chunk_tokens=7, chunk_vocab=64)
        else:
            terms = plain_terms(hidden, head.weight, head.bias, labels, ref_hidden, 1.0, True)
        (terms[0].sum() + 0.5 * terms[1].sum() - 0.3 * terms[2].sum()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}

    mine, theirs = grads("fused"), grads("plain")
    assert mine.keys() == theirs.keys() and ("model.embed_tokens.weight" in mine) is train_embeddings
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-10, atol=1e-12, msg=name)


def test_bf16_inputs_are_upcast_per_tile():
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs(torch.bfloat16)
    ours = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, entropy=True, **CHUNKS)
    plain = plain_terms(hidden, weight, b, labels, ref_hidden, 1.0, True)  # project() upcasts the same bf16 values
    for mine, theirs in zip(ours, plain):
        assert mine.dtype == torch.float32
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(weighted(ours, upstream), hidden)
    (expected,) = torch.autograd.grad(weighted(plain, upstream), hidden)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.float(), expected.float(), rtol=1e-2, atol=1e-3)


def test_autocast_does_not_lower_precision():
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs(torch.float32)
    exact = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, entropy=True, **CHUNKS)
    (g_exact,) = torch.autograd.grad(weighted(exact, upstream), hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, entropy=True, **CHUNKS)
        (g_under,) = torch.autograd.grad(weighted(under, upstream), hidden)
    for a, c in zip(exact, under):
        assert c.dtype == torch.float32
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_exact, g_under, rtol=1e-6, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.numel = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.numel[t.dtype] = max(self.numel.get(t.dtype, 0), t.numel())
        return out


@pytest.mark.parametrize("recompute", [False, True])
def test_never_materialises_logits_or_an_fp32_copy_of_the_head(recompute):
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs(torch.bfloat16)
    with _LargestTensor() as mode:
        terms = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, entropy=True, recompute=recompute,
                                 **CHUNKS)
        torch.autograd.grad(weighted(terms, upstream), hidden)
    tile = 2 * CHUNKS["chunk_tokens"] * CHUNKS["chunk_vocab"]  # policy + reference rows of one tile
    assert mode.numel[torch.float32] <= tile < N * V
    assert mode.numel[torch.float32] < V * D  # the bf16 head is upcast one tile at a time


def test_no_tokens():
    hidden, weight, b, ref_hidden, labels, _ = make_inputs()
    nll, kl, ent = fused_head_terms(hidden[:0], weight, b, labels[:0], ref_hidden=ref_hidden[:0], entropy=True)
    assert nll.shape == kl.shape == ent.shape == (0,)
    (nll.sum() + kl.sum() + ent.sum()).backward()
    assert torch.all(hidden.grad == 0)


def test_no_gradient_work_without_grad():
    hidden, weight, b, ref_hidden, labels, _ = make_inputs()
    with torch.no_grad():
        nll, kl, ent = fused_head_terms(hidden, weight, b, labels, ref_hidden=ref_hidden, entropy=True, **CHUNKS)
    assert not nll.requires_grad
    plain = plain_terms(hidden.detach(), weight, b, labels, ref_hidden, 1.0, True)
    for mine, theirs in zip((nll, kl, ent), plain):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------------
# exact SVD term
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(37, 3), (9, 4), (37, 40)])  # N > d+1, N < d+1, k beyond the rank
def test_svd_ratio_equals_svdvals_of_materialised_logits_fp64(bias, n, k):
    hidden, weight, b, *_ = make_inputs(bias=bias)
    h = hidden[:n].detach().requires_grad_()
    ours = svd_ratio_frozen_head(h, weight, b, k, float64=True)
    sigma = torch.linalg.svdvals(losses.project(h, weight, b).double())
    expected = sigma[:k].sum() / sigma.sum()
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours, losses.svd_ratio(losses.project(h, weight, b), k), rtol=1e-12, atol=1e-12)
    (g_ours,) = torch.autograd.grad(ours, h)
    (g_expected,) = torch.autograd.grad(expected, h)
    torch.testing.assert_close(g_ours, g_expected, rtol=1e-9, atol=1e-12)


def test_svd_ratio_fp32_default():
    hidden, weight, b, *_ = make_inputs(torch.float32)
    ours = svd_ratio_frozen_head(hidden, weight, b, 5)
    assert ours.dtype == torch.float32
    exact = losses.svd_ratio(losses.project(hidden.detach().double(), weight.double(), b.double()), 5)
    torch.testing.assert_close(ours.double(), exact, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(ours, hidden)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_svd_factor_is_cached_per_head_and_invalidated_by_in_place_updates(monkeypatch):
    hidden, weight, b, *_ = make_inputs()
    calls = []
    qr = torch.linalg.qr
    monkeypatch.setattr(torch.linalg, "qr", lambda *a, **kw: calls.append(1) or qr(*a, **kw))
    first = svd_ratio_frozen_head(hidden, weight, b, 3, float64=True)
    n_first = len(calls)
    assert n_first > 0
    svd_ratio_frozen_head(hidden, weight, b, 3, float64=True)
    assert len(calls) == n_first  # cached
    with torch.no_grad():
        weight.mul_(2.0)  # bumps weight._version
    changed = svd_ratio_frozen_head(hidden, weight, b, 3, float64=True)
    assert len(calls) > n_first
    torch.testing.assert_close(changed, losses.svd_ratio(losses.project(hidden, weight, b), 3), rtol=1e-12, atol=0)
    assert not torch.equal(changed, first)


def test_svd_ratio_trained_head_falls_back_to_plain():
    hidden, weight, b, *_ = make_inputs()
    weight.requires_grad_()
    ours = svd_ratio_frozen_head(hidden, weight, b, 3)
    (grad_w,) = torch.autograd.grad(ours, weight)
    (expected,) = torch.autograd.grad(losses.svd_ratio(losses.project(hidden, weight, b), 3), weight)
    torch.testing.assert_close(grad_w, expected)


# --------------------------------------------------------------------------------------------------------------
# which heads qualify
# --------------------------------------------------------------------------------------------------------------


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_head_supports_fused():
    ok, reason = head_supports_fused(frozen(tiny_model("llama")))
    assert ok and reason == ""
    ok, reason = head_supports_fused(tiny_model("llama"))
    assert not ok and reason == "the LM head is trained (its weight or bias requires grad)"
    ok, reason = head_supports_fused(frozen(tiny_model("gemma2")))
    assert not ok and "final_logit_softcapping" in reason
    ok, reason = head_supports_fused(frozen(tiny_model("llama", logit_scale=0.5)))
    assert not ok and "logit_scale" in reason
    ok, reason = head_supports_fused(frozen(tiny_model("llama", logits_scaling=4.0)))
    assert not ok and "logits_scaling" in reason
    assert head_supports_fused(frozen(tiny_model("llama", logit_scale=1.0)))[0]


def test_head_supports_fused_rejects_adapted_or_wrapped_heads():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    ok, reason = head_supports_fused(model.get_base_model())
    assert not ok and "not a plain nn.Linear" in reason
    model = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    assert head_supports_fused(model.get_base_model()) == (True, "")


def test_default_chunks_cover_cpu_and_cuda():
    assert fused.default_chunks("cpu")[0] >= 1 and fused.default_chunks("cuda")[1] >= 1


class _Zero3Head:
    """ZeRO-3's contract for the LM head, emulated: outside a gather its parameters are empty (numel 0, as DeepSpeed
    leaves them after the forward); inside ``fused._head_gathered`` they hold their data again."""

    def __init__(self, *params):
        self.params = [p for p in params if p is not None]
        self.full = [p.data for p in self.params]
        self.gathers = 0

    def partition(self):
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype)

    def gathered(self, weight, bias):
        import contextlib

        head = self

        @contextlib.contextmanager
        def ctx():
            head.gathers += 1
            for p, full in zip(head.params, head.full):
                p.data = full
            try:
                yield
            finally:
                head.partition()

        return ctx()


@pytest.mark.parametrize("route", ["recompute_fallback", "topk_entropy"])
def test_backwards_that_reread_the_head_gather_it_again(route, monkeypatch):
    """Under ZeRO-3 the head is empty by the time a backward runs: the fallback recompute of the fused terms and
    the top-k entropy's backward must gather it again (without, they read a 0-element weight), and then give the
    unpartitioned gradients. Emulated: the real ZeRO-3 runs (tests/test_deepspeed.py) take neither route."""
    hidden, weight, b, ref_hidden, labels, upstream = make_inputs()
    weight, b = torch.nn.Parameter(weight, requires_grad=False), torch.nn.Parameter(b, requires_grad=False)

    def loss_of(h):
        if route == "topk_entropy":
            return (fused.fused_topk_entropy(h, weight, b, 5, **CHUNKS) * upstream[0]).sum()
        terms = fused_head_terms(h, weight, b, labels, ref_hidden=ref_hidden, temperature=1.0, entropy=True,
                                 grad_weights=(1.0, 1e-4, -3e-4), **CHUNKS)
        return weighted(terms, upstream)  # per-token upstream: not proportional, so the recompute runs

    (expected,) = torch.autograd.grad(loss_of(hidden), hidden)
    head = _Zero3Head(weight, b)
    monkeypatch.setattr(fused, "_head_gathered", head.gathered)
    loss = loss_of(hidden)
    head.partition()
    (grad,) = torch.autograd.grad(loss, hidden)
    assert head.gathers == 1 and weight.numel() == 0  # gathered for the backward, released after it
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
