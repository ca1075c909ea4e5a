"""BALoraSFTTrainer against TRL's SFTTrainer and against direct computations of eqs. 10-13."""

import copy
import gc
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import cpu_config
from datasets import Dataset
from peft import LoraConfig
from torch.distributions import Categorical, kl_divergence
from trl import SFTConfig, SFTTrainer

from balora_trl import BALoraSFTTrainer
from balora_trl.head import head_logits

FAMILIES = ["llama", "gpt2"]


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def count_items(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def make_trainer(model, tokenizer, dataset, tmp_path, peft=True, init="pissa", ref_model=None, **cfg):
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=init) if peft else None
    return BALoraSFTTrainer(model, cpu_config(tmp_path, **cfg), train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, ref_model=ref_model)


def response_logits(model, batch):
    """Plain forward: [n, V] logits at the positions whose next token is trained, and those next tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return logits[mask].double(), labels[mask]


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_lambdas_equal_trl_sft_loss_and_gradients(family, make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    ours = make_trainer(make_model(family), tokenizer, gsm8k_prompt_completion, tmp_path / "a",
                        lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)
    trl_args = SFTConfig(str(tmp_path / "b"), bf16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
                         per_device_train_batch_size=4, max_length=256, seed=0)
    theirs = SFTTrainer(make_model(family), trl_args, train_dataset=gsm8k_prompt_completion, processing_class=tokenizer,
                        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa"))
    batch = first_batch(ours)
    n = count_items(batch) * 3  # as if this were one of three accumulated micro-batches
    loss_ours = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=n)
    loss_theirs = theirs.compute_loss(theirs.model, dict(batch), num_items_in_batch=n)
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, rtol=1e-6, atol=1e-7)
    grads_theirs = {k: p.grad for k, p in theirs.model.named_parameters() if p.requires_grad}
    grads_ours = {k: p.grad for k, p in ours.model.named_parameters() if p.requires_grad}
    assert grads_ours.keys() == grads_theirs.keys() and len(grads_ours) > 0
    for k in grads_ours:
        torch.testing.assert_close(grads_ours[k], grads_theirs[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("init,kind", [(True, "adapter_disabled"), ("pissa", "initial_adapter"),
                                       ("pissa_niter_4", "initial_adapter")])
def test_reference_is_the_untouched_pretrained_model(init, kind, make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    model = make_model("llama")
    pretrained = copy.deepcopy(model).eval()
    trainer = make_trainer(model, tokenizer, gsm8k_prompt_completion, tmp_path, init=init, learning_rate=5e-2,
                           max_steps=3, lambda_consistency=1.0)
    assert trainer.reference.kind == kind and not trainer.reference.holds_second_model
    batch = first_batch(trainer)

    # Step 0: KL(p_ref ‖ p_θ) is zero.
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["ba_lora/kl"][-1] <= 1e-6

    if init != True:  # noqa: E712 - with PiSSA, "adapter disabled" is the residual model, far from pretrained
        with torch.no_grad(), trainer.model.disable_adapter():
            residual, _ = response_logits(trainer.model, batch)
        assert (residual - response_logits(pretrained, batch)[0]).abs().max() > 1e-2

    # The reference reproduces the pretrained logits before *and after* training moved the adapter.
    trainer.train()
    with trainer.reference.activate(trainer.model):
        ref, _ = response_logits(trainer.model, batch)
    expected, _ = response_logits(pretrained, batch)
    assert (ref - expected).abs().max() <= 1e-4
    trained, _ = response_logits(trainer.model, batch)
    assert (trained - expected).abs().max() > 1e-3  # training did move the policy
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if ".default." in n)


def _live_2d_storages(shapes):
    gc.collect()
    found = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.dim() == 2 and tuple(obj.shape) in shapes:
            found.add(obj.untyped_storage().data_ptr())
    return found


@pytest.mark.parametrize("peft", [True, False])
def test_base_weights_exist_once_in_adapter_mode(peft, make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    # A hidden size no other test uses, so every live tensor of these shapes belongs to this trainer.
    trainer = make_trainer(make_model("llama", hidden_size=40), tokenizer, gsm8k_prompt_completion, tmp_path, peft=peft)
    base = {n: p for n, p in trainer.model.named_parameters() if "lora_" not in n and p.dim() == 2}
    shapes = {tuple(p.shape) for p in base.values()}
    own = {p.untyped_storage().data_ptr() for p in base.values()}
    live = _live_2d_storages(shapes)
    if peft:
        assert live == own  # PiSSA's residual base weights, once; the reference is a tiny adapter copy
    else:
        assert trainer.reference.kind == "frozen_copy" and len(live) == 2 * len(own)  # full FT must copy


def test_logged_terms_equal_direct_computation(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    model = make_model("llama")
    pretrained = copy.deepcopy(model).eval()
    lam = dict(lambda_consistency=0.3, lambda_diversity=0.2, lambda_svd=0.1, svd_top_k=3)
    trainer = make_trainer(model, tokenizer, gsm8k_prompt_completion, tmp_path, learning_rate=2e-2, max_steps=3, **lam)
    trainer.train()  # move away from the start so KL is not trivially 0
    batch = first_batch(trainer)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    with torch.no_grad():
        policy, labels = response_logits(trainer.model, batch)
        reference, _ = response_logits(pretrained, batch)
    p, r = Categorical(logits=policy), Categorical(logits=reference)
    sft = -p.log_prob(labels).mean().item()
    kl = kl_divergence(r, p).mean().item()
    entropy = p.entropy().mean().item()
    sigma = np.linalg.svd(policy.numpy(), compute_uv=False)
    ratio = sigma[:3].sum() / sigma.sum()

    assert kl > 1e-5  # a real comparison, not 0 == 0
    assert logged["ba_lora/sft_loss"] == pytest.approx(sft, rel=1e-5)
    assert logged["ba_lora/kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert logged["ba_lora/entropy"] == pytest.approx(entropy, rel=1e-5)
    assert logged["ba_lora/svd_ratio"] == pytest.approx(ratio, rel=1e-5)
    total = sft + 0.3 * kl - 0.2 * entropy - 0.1 * ratio  # eq. 13
    assert loss.item() == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "qwen2", "gpt2"])
def test_patched_forward_picks_the_positions_trl_trains(family, make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    """Tied embeddings, soft-capping: the head logits at the selected positions are the model's own logits."""
    trainer = make_trainer(make_model(family), tokenizer, gsm8k_prompt_completion, tmp_path)
    batch = first_batch(trainer)
    with torch.no_grad():
        ours, ours_labels = trainer.model(**batch, balora_head=lambda m, h, y: (head_logits(m, h), y))
        expected, labels = response_logits(trainer.model, batch)
    assert torch.equal(ours_labels, labels)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


def _one_sgd_step(model, tokenizer, dataset, out, batch, accumulation, ref_model=None, **lam):
    trainer = make_trainer(model, tokenizer, dataset, out, ref_model=ref_model, optim="sgd", learning_rate=1.0, max_steps=1,
                           lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                           train_sampling_strategy="sequential", **lam)
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    # SGD with lr 1: the update *is* the gradient.
    return {k: before[k] - p.detach() for k, p in trainer.model.named_parameters() if p.requires_grad}


def _assert_same(a, b, atol=2e-6):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=atol)


def test_gradient_accumulation_equivalence(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    rows = gsm8k_prompt_completion.select(range(8))
    # A reference that differs from the start, so the KL and its gradient are not zero.
    lam = dict(lambda_consistency=2.0, lambda_diversity=5.0, lambda_svd=0.0)
    full = _one_sgd_step(make_model(), tokenizer, rows, tmp_path / "a", 8, 1, make_model(seed=1), **lam)
    accumulated = _one_sgd_step(make_model(), tokenizer, rows, tmp_path / "b", 2, 4, make_model(seed=1), **lam)
    _assert_same(full, accumulated)
    # Each regulariser really is in these gradients.
    for off in ("lambda_consistency", "lambda_diversity"):
        other = _one_sgd_step(make_model(), tokenizer, rows, tmp_path / off, 8, 1, make_model(seed=1),
                              **{**lam, off: 0.0})
        assert max((full[k] - other[k]).abs().max().item() for k in full) > 1e-4, off


def test_svd_term_weighting_under_accumulation(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    """A step made of copies of one batch gives that batch's SVD term: the n/D weights add up to 1."""
    rows = Dataset.from_list([gsm8k_prompt_completion[0]] * 8)
    lam = dict(lambda_consistency=0.5, lambda_diversity=0.5, lambda_svd=5.0)
    full = _one_sgd_step(make_model(), tokenizer, rows, tmp_path / "a", 8, 1, **lam)
    accumulated = _one_sgd_step(make_model(), tokenizer, rows, tmp_path / "b", 2, 4, **lam)
    _assert_same(full, accumulated)
    no_svd = _one_sgd_step(make_model(), tokenizer, rows, tmp_path / "c", 8, 1, **{**lam, "lambda_svd": 0.0})
    assert max((full[k] - no_svd[k]).abs().max().item() for k in full) > 1e-5


def test_batch_without_response_tokens_adds_zero(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    trainer = make_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path,
                           lambda_consistency=1.0, lambda_diversity=1.0, lambda_svd=1.0)
    batch = first_batch(trainer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=0)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def test_non_finite_loss_names_the_step_and_term(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    trainer = make_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, max_steps=5)
    trainer.train()
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_B.default" in n).fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=r"step 5 .*sft"):
        trainer.compute_loss(trainer.model, dict(first_batch(trainer)))


def test_svd_failure_falls_back_with_one_warning(make_model, tokenizer, gsm8k_prompt_completion, tmp_path, monkeypatch):
    from balora_trl import losses

    trainer = make_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, head_path="plain",
                           lambda_svd=1.0, svd_top_k=2)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch))
    expected = trainer._metrics["train"]["ba_lora/svd_ratio"][-1]

    def no_convergence(*args, **kwargs):
        raise torch.linalg.LinAlgError("svd did not converge")

    monkeypatch.setattr(losses.torch.linalg, "svdvals", no_convergence)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = trainer.compute_loss(trainer.model, dict(batch))
    assert sum("did not converge" in str(w.message) for w in caught) == 1
    assert math.isfinite(loss.item())
    assert trainer._metrics["train"]["ba_lora/svd_ratio"][-1] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_pissa_balora_training_lowers_the_sft_loss(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    config = cpu_config(tmp_path, max_steps=300, learning_rate=1e-2, per_device_train_batch_size=8,
                        lambda_consistency=1e-4, lambda_diversity=3e-4, lambda_svd=1e-4)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights="pissa_niter_4",
                             target_modules="all-linear")
    trainer = BALoraSFTTrainer(make_model("llama", hidden_size=64), config, train_dataset=gsm8k_prompt_completion,
                               processing_class=tokenizer, peft_config=peft_config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ba_lora/sft_loss" in h]
    assert len(logs) == 300
    for h in logs:
        for key in ("loss", "ba_lora/sft_loss", "ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio"):
            assert math.isfinite(h[key]), (h["step"], key)
    first = np.mean([h["ba_lora/sft_loss"] for h in logs[:20]])
    last = np.mean([h["ba_lora/sft_loss"] for h in logs[-20:]])
    # A random 2-layer model with frozen random embeddings learns slowly through rank-8 adapters: ~0.2 nats in
    # 300 steps, against a noise of ~0.01 on a 20-step mean.
    assert last < first - 0.15, (first, last)
    assert logs[-1]["ba_lora/kl"] > 0


def test_zero_lambda_terms_cost_nothing(make_model, tokenizer, gsm8k_prompt_completion, tmp_path, monkeypatch):
    from balora_trl import losses

    trainer = make_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, head_path="plain",
                           lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0)
    calls = {"forward": 0, "svd": 0, "entropy": 0}
    policy_forward = trainer.model.get_base_model().forward

    def counting_forward(*args, **kwargs):
        calls["forward"] += 1
        return policy_forward(*args, **kwargs)

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(trainer.model.get_base_model(), "forward", counting_forward)
    monkeypatch.setattr(losses.torch.linalg, "svdvals", counting("svd", torch.linalg.svdvals))
    monkeypatch.setattr(losses, "token_entropy", counting("entropy", losses.token_entropy))
    trainer.compute_loss(trainer.model, dict(first_batch(trainer)))
    assert calls == {"forward": 1, "svd": 0, "entropy": 0}  # the policy pass only
    trainer.args.lambda_consistency, trainer.args.lambda_svd, trainer.args.lambda_diversity = 1e-4, 1e-4, 1e-4
    trainer.compute_loss(trainer.model, dict(first_batch(trainer)))
    assert calls == {"forward": 3, "svd": 1, "entropy": 1}  # + reference pass, SVD, entropy


@pytest.mark.parametrize("init", [True, "pissa"])
def test_reference_pass_leaves_trainable_flags_alone(init, make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    """No reference (LoRA-from-zero's switched-off adapter, PiSSA's frozen copy) touches `requires_grad`: FSDP's flat
    parameters and ZeRO-3 register the trainable set once. PEFT's `disable_adapter()` would flip it every step."""
    trainer = BALoraSFTTrainer(make_model(), cpu_config(tmp_path), train_dataset=gsm8k_prompt_completion,
                               processing_class=tokenizer,
                               peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=init,
                                                      modules_to_save=["lm_head"]))
    assert trainer.reference.kind == ("adapter_disabled" if init is True else "initial_adapter")
    flags = {n: p.requires_grad for n, p in trainer.model.named_parameters()}
    with trainer.reference.activate(trainer.model):
        assert {n: p.requires_grad for n, p in trainer.model.named_parameters()} == flags
        assert not trainer.model.training
    assert trainer.model.training
    assert {n: p.requires_grad for n, p in trainer.model.named_parameters()} == flags
    assert sum(flags.values()) > 0 and not any(v for n, v in flags.items() if "balora_reference" in n)
    if init is not True:
        return
    # Same outputs as PEFT's own switch-off, with the adapter and the trained head copy moved off their start.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name or "modules_to_save.default" in name:
                p.add_(0.5 * torch.randn_like(p))
    batch = first_batch(trainer)
    with trainer.reference.activate(trainer.model):
        ours, _ = response_logits(trainer.model, batch)
    with torch.no_grad(), trainer.model.disable_adapter():
        assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if ".default" in n)  # PEFT's flip
        peft_off, _ = response_logits(trainer.model, batch)
    policy, _ = response_logits(trainer.model, batch)
    assert torch.equal(ours, peft_off)
    assert (policy - peft_off).abs().max() > 1e-2  # the switch really switched something off


def test_default_trl_config_bf16_and_checkpointing(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    """SFTConfig's defaults (bf16 autocast, gradient checkpointing) train, with finite fp32 regularisers."""
    from balora_trl import BALoraConfig

    config = BALoraConfig(str(tmp_path), use_cpu=True, max_steps=2, per_device_train_batch_size=2, report_to="none",
                          save_strategy="no", logging_steps=1, lambda_consistency=1.0, max_length=128)
    assert config.bf16 and config.gradient_checkpointing
    trainer = BALoraSFTTrainer(make_model(), config, train_dataset=gsm8k_prompt_completion, processing_class=tokenizer,
                               peft_config=LoraConfig(r=4, init_lora_weights="pissa"))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ba_lora/kl" in h]
    assert len(logs) == 2 and all(math.isfinite(h[k]) for h in logs for k in h)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_and_plain_head_paths_agree(family, make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    from balora_trl import fused

    lambdas = dict(lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.2, svd_top_k=2)
    results = {}
    for path in ("plain", "fused"):
        trainer = make_trainer(make_model(family), tokenizer, gsm8k_prompt_completion, tmp_path / path,
                               head_path=path, **lambdas)
        assert trainer._path == path
        torch.manual_seed(1)
        with torch.no_grad():  # move the adapter off its initial value so the KL term has a gradient
            for name, p in trainer.model.named_parameters():
                if "lora_B.default" in name:
                    p.add_(0.05 * torch.randn_like(p))
        batch = first_batch(trainer)
        fallbacks = fused._FusedHeadTerms.fallbacks
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=count_items(batch) * 2)
        loss.backward()
        if path == "fused":  # the trainer announces its weights (1, λ1, −λ2): the one-vector backward was exact
            assert fused._FusedHeadTerms.fallbacks == fallbacks
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        results[path] = (loss.detach(), grads)
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-5, atol=1e-6)
    assert results["fused"][1].keys() == results["plain"][1].keys()
    for k in results["plain"][1]:
        torch.testing.assert_close(results["fused"][1][k], results["plain"][1][k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_reference_keeps_the_pretrained_head_when_the_head_is_trained(init, make_model, tokenizer,
                                                                       gsm8k_prompt_completion, tmp_path):
    """`modules_to_save=["lm_head"]` trains a copy of the head: the reference must still read the original one."""
    model = make_model("llama")
    pretrained = copy.deepcopy(model).eval()
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=init, modules_to_save=["lm_head"])
    trainer = BALoraSFTTrainer(model, cpu_config(tmp_path, learning_rate=5e-2, max_steps=3, lambda_consistency=1.0),
                               train_dataset=gsm8k_prompt_completion, processing_class=tokenizer,
                               peft_config=peft_config)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["ba_lora/kl"][-1] <= 1e-6
    trainer.train()
    head = trainer.model.get_output_embeddings()
    assert any(p.requires_grad for p in head.parameters())
    with trainer.reference.activate(trainer.model):
        ref, _ = response_logits(trainer.model, batch)
    expected, _ = response_logits(pretrained, batch)
    assert (ref - expected).abs().max() <= 1e-4
    trained, _ = response_logits(trainer.model, batch)
    assert (trained - expected).abs().max() > 1e-3
