"""The plain head path is the model's own head code: every family that transforms its logits, and ZeRO-3.

Families differ between the backbone and the logits: Gemma-2 soft-caps, Cohere multiplies by `logit_scale`, Granite
divides by `logits_scaling` where HyperCLOVA X multiplies by it, Falcon-H1 multiplies by `lm_head_multiplier`,
MiniCPM3 scales the hidden states before the head. With every λ = 0 the BA-LoRA loss must be the model's own
cross-entropy, and the fused path (which computes hidden·Wᵀ + b) must refuse all of them. Tiny random models are
built from configs; the head weight is scaled up so the logits are O(1-10) and each transform matters.
"""

import contextlib

import pytest
import torch
from conftest import cpu_config
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from balora_trl import BALoraSFTTrainer, losses
from balora_trl import head as head_module
from balora_trl.fused import head_supports_fused
from balora_trl.head import head_logits, install_head_forward, own_logits_are_head_output

TRANSFORMING = {
    "gemma2": dict(head_dim=8, final_logit_softcapping=2.0),
    "cohere": dict(logit_scale=0.37),
    "granite": dict(logits_scaling=4.0),
    "hyperclovax": dict(logits_scaling=0.25),
    "falcon_h1": dict(lm_head_multiplier=2.5, head_dim=8, mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8,
                      mamba_d_state=8, mamba_n_groups=1, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=16),
    "minicpm3": dict(dim_model_base=8, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                     qk_rope_head_dim=8, v_head_dim=8),  # hidden / (hidden_size / dim_model_base) before the head
}
FAMILIES = [pytest.param(f, marks=pytest.mark.skipif(f not in CONFIG_MAPPING, reason=f"transformers has no {f}"))
            for f in TRANSFORMING]


def tiny_model(family, vocab_size, seed=0, head_gain=60.0, **overrides):
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                  bos_token_id=1, eos_token_id=1)
    kwargs.update(TRANSFORMING.get(family, {}))
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # logits of a few units, so that soft-caps and scales change the loss
        model.get_output_embeddings().weight.mul_(head_gain)
    return model


def toy_batch(vocab_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, vocab_size, (2, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.clone()
    labels[:, :5] = -100  # the prompt
    labels[attention_mask == 0] = -100
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def naive_logits(model, hidden):
    """hidden · Wᵀ + b, what a head path that ignores the family's transform computes."""
    head = model.get_output_embeddings()
    return losses.project(hidden, head.weight, head.bias)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_give_the_models_own_cross_entropy_and_gradients(family):
    model = tiny_model(family, 96)
    install_head_forward(model)
    batch = toy_batch(96)

    def own_loss():
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    def balora_loss(logits_of):
        model.zero_grad()
        loss = model(**batch, balora_head=lambda m, h, y: losses.token_nll(logits_of(m, h), y).mean())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected, expected_grads = own_loss()
    ours, grads = balora_loss(head_logits)
    naive, _ = balora_loss(naive_logits)
    assert abs(naive - expected) > 1e-2, "the family's transform must matter for this test to mean anything"
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-5)  # mamba scans: ~4e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_path_refuses_families_that_transform_logits(family):
    model = tiny_model(family, 96)
    model.get_output_embeddings().weight.requires_grad_(False)
    ok, reason = own_logits_are_head_output(model)
    assert not ok and "transforms" in reason
    assert head_supports_fused(model)[0] is False


def test_fused_probe_accepts_untransformed_heads():
    """Llama, and Gemma-2 with its soft-cap switched off: the logits are hidden·Wᵀ, so the fused path may run."""
    for model in (tiny_model("llama", 96), tiny_model("gemma2", 96, final_logit_softcapping=None)):
        model.get_output_embeddings().weight.requires_grad_(False)
        assert own_logits_are_head_output(model) == (True, "")
        assert head_supports_fused(model) == (True, "")


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_lambdas_balora_loss_is_the_models_cross_entropy(family, tokenizer, gsm8k_prompt_completion, tmp_path):
    """Through the trainer: λ1 = λ2 = λ3 = 0 gives the model's own loss; `head_path="auto"` falls back to plain."""
    model = tiny_model(family, len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    config = cpu_config(tmp_path, lambda_consistency=0.0, lambda_diversity=0.0, lambda_svd=0.0,
                        per_device_train_batch_size=2)
    with pytest.warns(UserWarning, match="plain LM-head path"):
        trainer = BALoraSFTTrainer(model, config, train_dataset=gsm8k_prompt_completion.select(range(8)),
                                   processing_class=tokenizer,
                                   peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "q_b_proj"]))
    assert trainer._path == "plain"
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ours = trainer.compute_loss(trainer.model, dict(batch))
    own = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
    torch.testing.assert_close(ours, own, rtol=1e-6, atol=1e-6)
    assert trainer._metrics["train"]["ba_lora/sft_loss"][-1] == pytest.approx(own.item(), rel=1e-6)


def test_running_the_own_head_leaves_the_model_as_it_was(monkeypatch):
    """The backbone stands aside and the head's forward is replaced for one call only, also when that call fails."""
    model = tiny_model("granite", 96)
    head = model.get_output_embeddings()
    modules = dict(model.named_modules())
    hidden = torch.randn(5, 32)
    logits = head_logits(model, hidden)
    assert logits.shape == (5, 96) and logits.dtype == torch.float32
    assert "model" not in model.__dict__ and "forward" not in head.__dict__ and dict(model.named_modules()) == modules

    def broken(*args, **kwargs):
        raise RuntimeError("head failed")

    monkeypatch.setattr(losses, "project", broken)
    with pytest.raises(RuntimeError, match="head failed"):
        head_logits(model, hidden)
    assert "model" not in model.__dict__ and "forward" not in head.__dict__
    monkeypatch.undo()
    torch.testing.assert_close(head_logits(model, hidden), logits)


# ---------------------------------------------------------------------------------------------------------------
# ZeRO-3 with a trained head, emulated on one process (tests/test_deepspeed.py runs real ZeRO-3 with the frozen head
# on both head paths; a trained head under ZeRO-3 has not run for real)
# ---------------------------------------------------------------------------------------------------------------


class _GatherForBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, output, partition):
        ctx.partition = partition
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad):
        ctx.partition.gather()
        return grad, None


class EmulatedZero3:
    """ZeRO-3's contract for a module: its parameters hold no data outside its own forward. A pre-forward hook
    gathers them, a forward hook releases them and arms a gather on the outputs for the backward (DeepSpeed's
    pre-backward hook); `gathered()` is `deepspeed.zero.GatheredParameters`, released on exit."""

    def __init__(self, module):
        self.params = list(module.parameters(recurse=False))
        self.data = [p.data for p in self.params]
        self.release()
        module.register_forward_pre_hook(lambda m, args: self.gather())
        module.register_forward_hook(lambda m, args, out: self.after_forward(out))

    def gather(self):
        for p, data in zip(self.params, self.data):
            p.data = data

    def release(self):
        for p in self.params:
            p.data = torch.empty(0, dtype=p.dtype)

    def after_forward(self, out):
        self.release()
        return _GatherForBackward.apply(out, self) if out.requires_grad else out

    @contextlib.contextmanager
    def gathered(self):
        self.gather()
        try:
            yield
        finally:
            self.release()


@pytest.mark.parametrize("setup", ["modules_to_save", "full_finetuning"])
def test_trained_head_under_emulated_zero3(setup, make_model, tokenizer, gsm8k_prompt_completion, tmp_path,
                                           monkeypatch):
    """A trained head under ZeRO-3: the head is called as a module, so its weight is there for the forward and
    gathered again for the backward. (Read directly inside a gather context, as before, it was released before the
    backward, which then failed.) Loss and gradients equal the unpartitioned run's."""
    results = {}
    for partitioned in (False, True):
        peft_config = None
        if setup == "modules_to_save":
            peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, modules_to_save=["lm_head"])
        trainer = BALoraSFTTrainer(make_model("llama"), cpu_config(tmp_path / str(partitioned), lambda_consistency=0.5,
                                                                   lambda_diversity=0.5, lambda_svd=0.5),
                                   train_dataset=gsm8k_prompt_completion, processing_class=tokenizer,
                                   peft_config=peft_config)
        assert trainer._path == "plain"
        head = trainer._causal_lm().get_output_embeddings()
        assert any(p.requires_grad for p in head.parameters())
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        if partitioned:
            partitions = [EmulatedZero3(m) for m in head.modules() if isinstance(m, torch.nn.Linear)]
            monkeypatch.setattr(head_module, "maybe_gather_lm_head_ctx",
                                lambda *params: contextlib.ExitStack() if not params else partitions[0].gathered())
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        assert any("lm_head" in n for n in grads)
        results[partitioned] = loss.detach(), grads
    torch.testing.assert_close(results[True][0], results[False][0])
    assert results[True][1].keys() == results[False][1].keys()
    for name in results[False][1]:
        torch.testing.assert_close(results[True][1][name], results[False][1][name])
