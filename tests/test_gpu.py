"""The CUDA paths (bf16 weights under bf16 autocast, the fused head on a GPU, bf16 merge) and the 4-bit ones (QLoRA,
QPiSSA), which bitsandbytes >= 0.50 also runs on the CPU.

Skipped without a CUDA GPU or bitsandbytes (CI has neither). On a GPU machine, or with `pip install bitsandbytes`:

    python -m pytest -m "gpu or quant" tests/test_gpu.py -s     # -s prints the measured deviations

Everything is built here (no download): a tokenizer trained on the shipped MetaMathQA-format sample and a
Llama-shaped base saved to disk, which the main job then loads the way it loads a Hub checkpoint.
"""

import json
import math
import os

import pytest
import torch

from packaging.version import Version  # noqa: E402

from balora_trl.preflight import BNB_CPU_4BIT, bitsandbytes_version  # noqa: E402
from balora_trl.prompts import DEFAULT  # noqa: E402
from balora_trl.sft import SAMPLE_PATH  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
_BNB = bitsandbytes_version()
needs_4bit = pytest.mark.skipif(_BNB is None or not (CUDA or _BNB >= Version(BNB_CPU_4BIT)),
                                reason="needs bitsandbytes (and a CUDA GPU, or bitsandbytes >= 0.50 on the CPU)")


@pytest.fixture(scope="module")
def sample_rows():
    with open(SAMPLE_PATH) as f:
        return [json.loads(line) for _, line in zip(range(512), f)]


@pytest.fixture(scope="module")
def base_dir(sample_rows, tmp_path_factory):
    """A Llama-shaped base (hidden 256, 4 layers, ~3M parameters) and its tokenizer, saved in float32."""
    from balora_trl.local_models import build_causal_lm, train_tokenizer

    tokenizer = train_tokenizer([DEFAULT.render(r["query"]) + " " + r["response"] for r in sample_rows],
                                vocab_size=2048, model_max_length=512)
    model = build_causal_lm("llama", tokenizer, hidden_size=256, num_layers=4, num_heads=4, seed=0,
                            initializer_range=256 ** -0.5)
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def probe(base_dir, sample_rows):
    """A batch of held-out prompts + responses on the GPU."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    texts = [DEFAULT.render(r["query"]) + " " + r["response"] for r in sample_rows[-8:]]
    return tokenizer(texts, return_tensors="pt", padding=True).to(DEVICE)


def log_probs(model, probe) -> torch.Tensor:
    """[tokens, V] float32 log-probabilities at the probe's non-padding positions."""
    with torch.no_grad():
        logits = model(**probe).logits.float()
    return torch.log_softmax(logits[probe["attention_mask"].bool()], dim=-1)


def mean_kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Token-mean KL(p ‖ q) from log-probabilities."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def run_main_job(base_dir, out, *extra):
    """The main job (balora_trl.sft) on ``base_dir`` as a user runs it: TRL's SFTConfig defaults (bf16 autocast,
    gradient checkpointing) unless ``extra`` overrides them. Returns the trainer after training and saving."""
    from balora_trl.sft import build_trainer, parse_args, train_and_save

    argv = ["--model_name_or_path", base_dir, "--output_dir", str(out), "--max_train_samples", "256",
            "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--max_steps", "30",
            "--logging_steps", "5", "--logging_first_step", "true", "--save_strategy", "no", "--report_to", "none",
            "--max_length", "512", "--seed", "0", *extra]
    script_args, training_args, model_args = parse_args(argv)
    trainer, template = build_trainer(script_args, training_args, model_args)
    train_and_save(trainer, template, script_args, training_args, model_args)
    return trainer


def train_logs(trainer) -> list[dict]:
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs and all(math.isfinite(v) for h in logs for k, v in h.items() if isinstance(v, float)), logs
    return logs


@pytest.mark.gpu
@needs_cuda
def test_bf16_pissa_main_job_reference_and_merge(base_dir, probe, tmp_path):
    """bf16 weights + bf16 autocast + gradient checkpointing (TRL's defaults), PiSSA, all three terms:
    training is finite and lowers the SFT loss; KL is 0 at step 0; the reference (residual base + frozen initial
    adapter) is the pretrained model up to bf16 rounding, far closer than the residual alone; and the bf16 merge
    reproduces the trained adapter model."""
    from transformers import AutoModelForCausalLM

    from balora_trl import merge

    pretrained = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    expected = log_probs(pretrained, probe)
    del pretrained

    trainer = run_main_job(base_dir, tmp_path / "run", "--dtype", "bfloat16", "--use_peft", "true",
                           "--init_lora_weights", "pissa", "--lora_r", "8", "--lora_alpha", "8",
                           "--lora_target_modules", "all-linear")
    assert trainer.args.bf16 and trainer.args.gradient_checkpointing and trainer.reference.kind == "initial_adapter"
    assert next(trainer.model.parameters()).is_cuda
    logs = train_logs(trainer)
    assert logs[0]["ba_lora/kl"] <= 1e-3, logs[0]  # step 0: the policy is the reference (up to bf16 rounding)
    assert logs[-1]["ba_lora/sft_loss"] < logs[0]["ba_lora/sft_loss"] - 0.5, (logs[0], logs[-1])

    model = trainer.model.eval()
    with trainer.reference.activate(model):
        reference = log_probs(model, probe)
    with model.disable_adapter():
        residual = log_probs(model, probe)
    trained = log_probs(model, probe)
    kl_ref, kl_res, kl_trained = (mean_kl(expected, x) for x in (reference, residual, trained))
    print(f"\nbf16 KL(pretrained ‖ ·) per token: reference {kl_ref:.2e}, residual (adapter off) {kl_res:.2e}, "
          f"trained {kl_trained:.2e}")
    assert kl_ref <= 1e-3 and kl_ref <= 0.01 * kl_res and kl_trained > 10 * kl_ref

    merged_dir = merge(str(tmp_path / "run"), str(tmp_path / "merged"), dtype="bf16")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).to(DEVICE).eval()
    assert merged.dtype == torch.bfloat16
    merged_lp = log_probs(merged, probe)
    kl_merge = mean_kl(trained, merged_lp)
    agree = float((merged_lp.argmax(-1) == trained.argmax(-1)).float().mean())
    print(f"bf16 merge: KL(adapter model ‖ merged) {kl_merge:.2e}, greedy agreement {agree:.4f}")
    assert kl_merge <= 5e-3 and agree >= 0.9  # near-ties flip under bf16 rounding


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_fused_and_plain_head_paths_agree_on_cuda(bf16, base_dir, tmp_path):
    """Same loss and adapter gradients from the fused head (tiles, one-vector backward) and the plain path."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from balora_trl import BALoraConfig, BALoraSFTTrainer, fused

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    with open(SAMPLE_PATH) as f:
        rows = [json.loads(line) for _, line in zip(range(16), f)]
    data = Dataset.from_list([{"prompt": DEFAULT.render(r["query"]), "completion": " " + r["response"]} for r in rows])
    results = {}
    for path in ("plain", "fused"):
        config = BALoraConfig(str(tmp_path / path), bf16=bf16, gradient_checkpointing=False, report_to="none",
                              save_strategy="no", per_device_train_batch_size=8, max_length=512, head_path=path,
                              lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.2, svd_top_k=4)
        trainer = BALoraSFTTrainer(AutoModelForCausalLM.from_pretrained(base_dir), config, train_dataset=data,
                                   processing_class=tokenizer,
                                   peft_config=LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0,
                                                          init_lora_weights="pissa", target_modules="all-linear"))
        assert trainer._path == path and next(trainer.model.parameters()).is_cuda
        torch.manual_seed(1)
        with torch.no_grad():  # move the adapter off its initial value so the KL term has a gradient
            for name, p in trainer.model.named_parameters():
                if "lora_B.default" in name:
                    p.add_(0.05 * torch.randn_like(p))
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        items = int((batch["labels"][:, 1:] != -100).sum())
        fallbacks = fused._FusedHeadTerms.fallbacks
        with trainer.compute_loss_context_manager():
            loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
        loss.backward()
        if path == "fused":
            assert fused._FusedHeadTerms.fallbacks == fallbacks
        grads = {k: p.grad.float().clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        results[path] = (float(loss.detach()), grads)
    (loss_p, grads_p), (loss_f, grads_f) = results["plain"], results["fused"]
    flat_p = torch.cat([g.flatten() for g in grads_p.values()])
    flat_f = torch.cat([grads_f[k].flatten() for k in grads_p])
    rel = float((flat_f - flat_p).norm() / flat_p.norm())
    print(f"\nbf16={bf16}: loss plain {loss_p:.6f} fused {loss_f:.6f}; gradient relative difference {rel:.2e}")
    assert abs(loss_f - loss_p) <= (2e-2 if bf16 else 1e-4) * abs(loss_p)
    assert rel <= (5e-2 if bf16 else 1e-3)


@pytest.mark.quant
@needs_4bit
def test_qlora_4bit_main_job(base_dir, probe, tmp_path):
    """QLoRA through the main job: a 4-bit NF4 base, LoRA (B = 0, so the reference is the adapter disabled: the
    quantized pretrained model, no second copy), all three terms; PiSSA on a 4-bit base is refused up front."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from balora_trl.preflight import PreflightError

    quant = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--dtype", "bfloat16", "--use_peft", "true",
             "--lora_r", "8", "--lora_alpha", "16", "--lora_target_modules", "all-linear"]
    with pytest.raises(PreflightError, match="PiSSA"):
        run_main_job(base_dir, tmp_path / "refused", *quant, "--init_lora_weights", "pissa")

    trainer = run_main_job(base_dir, tmp_path / "run", *quant, "--init_lora_weights", "true")
    assert trainer.reference.kind == "adapter_disabled" and not trainer.reference.holds_second_model
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    logs = train_logs(trainer)
    assert logs[0]["ba_lora/kl"] <= 1e-6
    assert logs[-1]["ba_lora/sft_loss"] < logs[0]["ba_lora/sft_loss"] - 0.5, (logs[0], logs[-1])
    assert os.path.isfile(tmp_path / "run" / "adapter_model.safetensors")

    # The saved adapter applies to the unquantized base: close to the 4-bit model it was trained on.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized = log_probs(trainer.model.eval(), probe)
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).to(DEVICE),
                                     str(tmp_path / "run")).eval()
    kl = mean_kl(quantized, log_probs(full, probe))
    print(f"\nQLoRA adapter on the bf16 base vs the 4-bit model it was trained on: KL {kl:.2e}")
    assert math.isfinite(kl) and kl <= 0.5


@pytest.mark.quant
@needs_4bit
def test_qpissa_trains_and_its_reference_is_closer_than_qlora(base_dir, probe, tmp_path):
    """QPiSSA (balora pissa-init, then `load_in_4bit`): the residual is quantised to NF4 and the adapter trains on top.
    Its reference NF4(W_res) + s·B₀A₀ is closer to the original model than QLoRA's reference NF4(W), because the
    residual has the top-r singular directions removed (PiSSA paper, section 5)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from balora_trl.pissa_init import pissa_init

    r = 32  # of 256: a large share of a random layer's spectrum, so the gap is well above noise
    pi_dir = str(tmp_path / "pissa")
    pissa_init(base_dir, pi_dir, r=r, lora_alpha=r, init="pissa", dtype="fp32", progress=False)
    quant = ["--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--dtype", "bfloat16", "--use_peft", "true",
             "--lora_r", str(r), "--lora_alpha", str(r), "--lora_target_modules", "all-linear"]
    trainer = run_main_job(pi_dir, tmp_path / "run", *quant, "--max_steps", "10")
    assert trainer.reference.kind == "initial_adapter"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    logs = train_logs(trainer)
    assert logs[0]["ba_lora/kl"] <= 1e-2  # step 0: the bf16 copy of (B₀, A₀) against the fp32 reference copy
    assert logs[-1]["ba_lora/sft_loss"] < logs[0]["ba_lora/sft_loss"]
    saved = json.load(open(tmp_path / "run" / "adapter_config.json"))
    assert saved["r"] == 2 * r and saved["base_model_name_or_path"] == os.path.abspath(base_dir)
    assert "QPiSSA" in open(tmp_path / "run" / "README.md").read()

    original = log_probs(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(DEVICE).eval(), probe)
    model = trainer.model.eval()
    with trainer.reference.activate(model):
        qpissa = mean_kl(original, log_probs(model, probe))
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    qlora_model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=nf4, dtype=torch.bfloat16,
                                                       device_map={"": DEVICE}).eval()
    qlora = mean_kl(original, log_probs(qlora_model, probe))
    print(f"\nKL(original ‖ reference): QPiSSA r={r} {qpissa:.3e}, QLoRA (NF4 of the original) {qlora:.3e}")
    assert math.isfinite(qpissa) and qpissa < qlora
