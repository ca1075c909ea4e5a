"""The final adapter (PiSSA -> LoRA), merged checkpoints, atomic writes and the Hub push (no network)."""

import copy
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
import safetensors.torch
import torch
from conftest import cpu_config, gsm8k_rows
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from balora_trl import BALoraSFTTrainer, conversion, merging
from balora_trl.local_models import build_causal_lm
from balora_trl.merging import merge, merge_cli
from balora_trl.prompts import PromptTemplate
from balora_trl.reference import REFERENCE_ADAPTER

PROMPT = PromptTemplate("qa", "Question: {instruction}\nAnswer:")
BALORA = dict(lambda_consistency=1.0, lambda_diversity=0.1, lambda_svd=0.1, learning_rate=5e-2, max_length=96,
              disable_tqdm=True)
INITS = {"pissa": "pissa", "lora": True}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    """The original base model, saved like a downloaded checkpoint."""
    path = tmp_path_factory.mktemp("base") / "tiny-llama"
    build_causal_lm("llama", tokenizer, hidden_size=32, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def short_rows():
    rows = gsm8k_rows("train", 32)
    return Dataset.from_list([{"prompt": PROMPT.render(r["question"][:120]), "completion": " " + r["answer"][:120]}
                              for r in rows])


@pytest.fixture(scope="module")
def probe(tokenizer):
    return tokenizer(["Natalia sold clips to 48 of her friends", "How many apples"], return_tensors="pt",
                     padding=True)


def logits(model, probe):
    model.eval()
    with torch.no_grad():
        return model(**probe).logits


@pytest.fixture(scope="module", params=sorted(INITS))
def trained(request, base_dir, tokenizer, short_rows, probe, tmp_path_factory):
    """3 BA-LoRA steps (every term on) from the base on disk; checkpoint-3 and the final output saved."""
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    trainer = BALoraSFTTrainer(
        model, cpu_config(run_dir, max_steps=3, save_strategy="steps", save_steps=3, **BALORA),
        train_dataset=short_rows, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=INITS[request.param]),
    )
    trainer.prompt_template = PROMPT
    trainer.train()
    final = run_dir / "final"
    trainer.save_model(str(final))
    return types.SimpleNamespace(name=request.param, trainer=trainer, run_dir=run_dir, final=str(final),
                                 checkpoint=str(run_dir / "checkpoint-3"), logits=logits(trainer.model, probe))


def original_base(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def snapshot(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
            if os.path.isfile(os.path.join(directory, name))}


def siblings_with(path, *marks):
    parent, name = os.path.split(os.path.abspath(path))
    return [n for n in os.listdir(parent) if n.startswith(name + ".") and any(m in n for m in marks)]


# ----------------------------------------------------------------------------------------------------------------
# the final adapter
# ----------------------------------------------------------------------------------------------------------------


def test_final_adapter_reproduces_the_trained_model_on_the_untouched_base(trained, base_dir, probe):
    base = original_base(base_dir)
    before = logits(base, probe)
    assert (before - trained.logits).abs().max() > 1e-2  # training moved the model: the check below means something
    adapted = PeftModel.from_pretrained(base, trained.final)
    assert (logits(adapted, probe) - trained.logits).abs().max() <= 1e-4

    config = json.load(open(os.path.join(trained.final, "adapter_config.json")))
    rank = 8 if trained.name == "pissa" else 4  # PiSSA -> LoRA doubles the rank (alpha too: same scale)
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (rank, 2 * rank, True)
    assert config["base_model_name_or_path"] == base_dir
    weights = safetensors.torch.load_file(os.path.join(trained.final, "adapter_model.safetensors"))
    assert all(v.shape[0] == rank for k, v in weights.items() if "lora_A" in k)
    # Never the reference adapter, nothing of the residual form.
    names = os.listdir(trained.final)
    assert REFERENCE_ADAPTER not in names and conversion.INITIAL_ADAPTER_FILE not in names
    assert not any(REFERENCE_ADAPTER in k for k in weights)


def test_final_folder_records_hyperparameters_template_and_card(trained, base_dir):
    final, args = trained.final, trained.trainer.args
    meta = json.load(open(os.path.join(final, "balora_config.json")))
    for key, value in args.balora_hyperparameters.items():
        assert meta[key] == value
    assert meta["reference"] == trained.trainer.reference.kind
    assert meta["head"]["shape"] == [trained.trainer.model.config.vocab_size, 32]
    assert meta["adapter"]["converted_from_residual"] == (trained.name == "pissa")
    assert meta["base_model"]["architectures"] == ["LlamaForCausalLM"]
    assert PromptTemplate.load(final) == PROMPT
    assert AutoTokenizer.from_pretrained(final).chat_template  # the tokenizer travels with the adapter

    card = open(os.path.join(final, "README.md"), encoding="utf-8").read()
    assert "library_name: peft" in card and "ba-lora" in card
    assert "## BA-LoRA" in card and base_dir in card and "Question: {instruction}" in card
    for label, value in [("λ1", args.lambda_consistency), ("λ2", args.lambda_diversity), ("λ3", args.lambda_svd)]:
        assert any(line.startswith(f"| {label}") and line.endswith(f"| {value:.6g} |") for line in card.splitlines())
    assert ("rank 8 = 2 × 4" in card) == (trained.name == "pissa")


def test_saving_leaves_the_model_in_memory_as_it_was(trained, tmp_path):
    trainer = trained.trainer
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    grads = {k: p.requires_grad for k, p in trainer.model.named_parameters()}
    adapters = list(trainer.model.peft_config)
    trainer.save_model(str(tmp_path / "again"))
    assert list(trainer.model.peft_config) == adapters and trainer.model.active_adapter == "default"
    assert {k: p.requires_grad for k, p in trainer.model.named_parameters()} == grads
    after = trainer.model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    # A second save of the same model writes the same adapter.
    a = safetensors.torch.load_file(tmp_path / "again" / "adapter_model.safetensors")
    b = safetensors.torch.load_file(os.path.join(trained.final, "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_stay_resumable_not_converted(trained):
    config = json.load(open(os.path.join(trained.checkpoint, "adapter_config.json")))
    assert config["r"] == 4 and config["init_lora_weights"] == INITS[trained.name]
    has_reference = os.path.isfile(os.path.join(trained.checkpoint, REFERENCE_ADAPTER, "adapter_model.safetensors"))
    assert has_reference == (trained.name == "pissa")  # zero-init LoRA needs no copy: its reference is the base
    assert os.path.isfile(os.path.join(trained.checkpoint, "balora_config.json"))


def test_full_fine_tuning_saves_the_whole_model_with_the_metadata(make_model, tokenizer, short_rows, tmp_path, probe):
    trainer = BALoraSFTTrainer(make_model("llama"), cpu_config(tmp_path / "run", **BALORA), train_dataset=short_rows,
                               processing_class=tokenizer)
    assert trainer.reference.kind == "frozen_copy"
    trainer.save_model(str(tmp_path / "final"))
    names = os.listdir(tmp_path / "final")
    assert {"config.json", "model.safetensors", "balora_config.json", "README.md"} <= set(names)
    assert not any(n.startswith("adapter_") for n in names)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(logits(reloaded, probe), logits(trainer.model, probe))
    assert json.load(open(tmp_path / "final" / "balora_config.json"))["adapter"]["kind"] == "full_model"


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-3 (emulated: what transformers hands `Trainer._save` under DeepSpeed ZeRO-3 with PEFT)
# ----------------------------------------------------------------------------------------------------------------


def trainable_only(model):
    """``_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)``: the frozen reference is absent."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_zero3_saves_convert_and_checkpoints_keep_the_initial_adapter(use_dora, base_dir, tokenizer, short_rows,
                                                                      probe, tmp_path, monkeypatch):
    """A randomised PiSSA init (its initial adapter exists nowhere else), saved through ZeRO-3's state dict.

    The final output is a rank-2r adapter reproducing the trained model on the original base (DoRA included: its
    output depends on W_res + s·BA only, which the converted delta rebuilds on W); the checkpoint's reference is the
    initial adapter, so `balora merge checkpoint-N` reproduces the trained model too.
    Emulated: tests/test_deepspeed.py saves a real ZeRO-3 run with an exact (deterministic) PiSSA init and no DoRA.
    """
    trainer = BALoraSFTTrainer(
        original_base(base_dir),
        cpu_config(tmp_path / "run", max_steps=2, save_strategy="steps", save_steps=2, **BALORA),
        train_dataset=short_rows, processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights="pissa_niter_4",
                               use_dora=use_dora),
    )
    initial = get_peft_model_state_dict(trainer.model, adapter_name=REFERENCE_ADAPTER)
    initial = {k: v.clone() for k, v in initial.items()}
    save = trainer._save
    monkeypatch.setattr(trainer, "_save", lambda output_dir=None, state_dict=None: save(
        output_dir, state_dict=trainable_only(trainer.model)))
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trained_logits = logits(trainer.model, probe)
    assert (logits(original_base(base_dir), probe) - trained_logits).abs().max() > 1e-2

    adapted = PeftModel.from_pretrained(original_base(base_dir), str(tmp_path / "final"))
    assert (logits(adapted, probe) - trained_logits).abs().max() <= 1e-4
    config = json.load(open(tmp_path / "final" / "adapter_config.json"))
    assert (config["r"], config["use_dora"], config["init_lora_weights"]) == (8, use_dora, True)

    checkpoint = tmp_path / "run" / "checkpoint-2"
    saved = safetensors.torch.load_file(checkpoint / REFERENCE_ADAPTER / "adapter_model.safetensors")
    assert saved.keys() == initial.keys() and all(torch.equal(saved[k], initial[k]) for k in initial)
    merged = merge(str(checkpoint), str(tmp_path / "merged"), dtype="fp32")
    assert (logits(AutoModelForCausalLM.from_pretrained(merged), probe) - trained_logits).abs().max() <= 1e-4


# ----------------------------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------------------------


def test_merged_checkpoint_loads_alone_and_equals_the_adapter_model(trained, base_dir, probe, tmp_path):
    out = tmp_path / "merged"
    assert merge_cli(["--adapter", trained.final, "--out", str(out), "--dtype", "fp32", "--max-shard-size", "60KB"]) == 0

    merged = AutoModelForCausalLM.from_pretrained(out)
    adapter_model = PeftModel.from_pretrained(original_base(base_dir), trained.final)
    merged_logits = logits(merged, probe)
    assert (merged_logits - logits(adapter_model, probe)).abs().max() <= 1e-4
    assert (merged_logits - trained.logits).abs().max() <= 1e-4

    names = os.listdir(out)
    assert not any(n.startswith("adapter_") for n in names)
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    assert {"config.json", "generation_config.json", "tokenizer.json", "prompt_template.json"} <= set(names)
    config = json.load(open(out / "config.json"))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not [k for k in config if any(w in k.lower() for w in ("peft", "lora", "adapter"))]
    index = json.load(open(out / "model.safetensors.index.json"))
    assert not [k for k in index["weight_map"] if "lora" in k or "base_layer" in k or k.startswith("base_model.")]

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == PROMPT.render("2+2?")  # a chat endpoint (vLLM) prompts the way the model was trained
    ids = tokenizer(prompt, return_tensors="pt")
    generated = merged.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[0] == 1 and ids["input_ids"].shape[1] < generated.shape[1] <= ids["input_ids"].shape[1] + 4


def test_merge_converts_a_residual_pissa_checkpoint(trained, probe, tmp_path):
    out = merge(trained.checkpoint, str(tmp_path / "merged"), dtype="fp32")
    assert (logits(AutoModelForCausalLM.from_pretrained(out), probe) - trained.logits).abs().max() <= 1e-4
    assert json.load(open(os.path.join(out, "balora_config.json")))["merged"]["converted_from_residual"] == (
        trained.name == "pissa")


@pytest.mark.parametrize("trained", ["lora"], indirect=True)  # does not depend on the adapter kind
def test_merge_casts_to_the_requested_dtype(trained, probe, tmp_path):
    out = merge(trained.final, str(tmp_path / "bf16"), dtype="bf16")
    tensors = safetensors.torch.load_file(os.path.join(out, "model.safetensors"))
    assert {v.dtype for v in tensors.values()} == {torch.bfloat16}
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(model, probe) - trained.logits).abs().max() <= 0.1


def test_merge_refuses_a_non_empty_folder_unless_forced(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        merge(trained.final, str(out))
    assert merge_cli(["--adapter", trained.final, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]

    merge(trained.final, str(out), force=True)
    assert "keep.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    with pytest.raises(ValueError, match="holds the adapter"):
        merge(trained.final, os.path.dirname(trained.final), force=True)
    assert os.path.isfile(os.path.join(trained.final, "adapter_config.json"))


def test_mismatched_or_missing_base_fails_before_any_weight(trained, tokenizer, tmp_path, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("base weights were loaded before the base was validated")

    monkeypatch.setattr(merging, "_load_base_model", no_weights)
    wider = tmp_path / "wider"
    build_causal_lm("llama", tokenizer, hidden_size=64, seed=0).save_pretrained(wider)
    other = tmp_path / "gpt2"
    build_causal_lm("gpt2", tokenizer, hidden_size=32, seed=0).save_pretrained(other)
    out = tmp_path / "out"

    with pytest.raises(ValueError, match=r"mismatch.*input size 32 vs base 64"):
        merge(trained.final, str(out), base=str(wider))
    with pytest.raises(ValueError, match=r"mismatch.*'llama'.*'gpt2'"):
        merge(trained.final, str(out), base=str(other))
    with pytest.raises(ValueError, match="Cannot load the base model"):
        merge(trained.final, str(out), base=str(tmp_path / "missing"))
    # A plain PEFT adapter (no balora_config.json): the tensor shapes alone catch the wrong base.
    plain = tmp_path / "plain"
    shutil.copytree(trained.final, plain)
    os.remove(plain / "balora_config.json")
    with pytest.raises(ValueError, match=r"does not fit"):
        merge(str(plain), str(out), base=str(wider))
    # No recorded base and none given.
    config = json.load(open(plain / "adapter_config.json"))
    config["base_model_name_or_path"] = None
    json.dump(config, open(plain / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="records no base model"):
        merge(str(plain), str(out))
    assert not out.exists()


@pytest.mark.parametrize("init", ["lora", "pissa"])
def test_merge_takes_an_adapter_that_targets_the_embeddings(init, base_dir, tokenizer, short_rows, probe, tmp_path):
    """PEFT saves a copy of the embedding beside `lora_embedding_A/B`; merge accepts what PEFT loads back."""
    trainer = BALoraSFTTrainer(
        original_base(base_dir), cpu_config(tmp_path / "run", max_steps=2, **BALORA), train_dataset=short_rows,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=INITS[init],
                               target_modules=["q_proj", "v_proj", "embed_tokens"]),
    )
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    saved = safetensors.torch.load_file(tmp_path / "final" / "adapter_model.safetensors")
    assert any("embed_tokens.lora_embedding_A" in k for k in saved)
    merged = merge(str(tmp_path / "final"), str(tmp_path / "merged"), dtype="fp32")
    adapted = PeftModel.from_pretrained(original_base(base_dir), str(tmp_path / "final"))
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(merged), probe)
    assert (merged_logits - logits(adapted, probe)).abs().max() <= 1e-4
    assert (merged_logits - logits(trainer.model, probe)).abs().max() <= 1e-4


def bos_tokenizer(tokenizer):
    """The test tokenizer, adding a BOS before every text as Llama-2's, Mistral's and Gemma's do (same vocabulary)."""
    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos = tok.eos_token
    tok.backend_tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]),
    ])
    tok.bos_token = bos
    return tok


def test_merged_chat_template_gives_the_training_token_ids(base_dir, tokenizer, short_rows, tmp_path):
    """A chat request to the merged model (template rendered, no special tokens added: vLLM, apply_chat_template)
    sees exactly the prompt ids training saw, BOS included."""
    tok = bos_tokenizer(tokenizer)
    assert tok("x")["input_ids"][0] == tok.bos_token_id != tok("x", add_special_tokens=False)["input_ids"][0]
    trainer = BALoraSFTTrainer(original_base(base_dir), cpu_config(tmp_path / "run", max_steps=1, **BALORA),
                               train_dataset=short_rows, processing_class=tok,
                               peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0))
    trainer.prompt_template = PROMPT
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    merged = AutoTokenizer.from_pretrained(merge(str(tmp_path / "final"), str(tmp_path / "merged"), dtype="fp32"))
    for i, row in enumerate(gsm8k_rows("train", 3)):
        example = trainer.train_dataset[i]
        start = next(j for j, label in enumerate(example["labels"]) if label != -100)  # the first trained token
        training_prompt = example["input_ids"][:start]
        question = row["question"][:120]
        assert PROMPT.render(question) == short_rows[i]["prompt"]
        chat = merged.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False)
        assert training_prompt[0] == tok.bos_token_id and list(chat) == training_prompt


@pytest.mark.parametrize("trained", ["lora"], indirect=True)  # does not depend on the adapter kind
def test_merge_names_a_truncated_adapter_file(trained, tmp_path):
    """`balora merge` on a cut-off adapter_model.safetensors: one line naming the file, exit 2, no traceback."""
    broken = tmp_path / "adapter"
    shutil.copytree(trained.final, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = subprocess.run([sys.executable, "-m", "balora_trl.cli", "merge", "--adapter", str(broken), "--out",
                             str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and len(lines) == 1
    assert str(weights) in lines[0] and "truncated or not a safetensors file" in lines[0]
    assert not (tmp_path / "merged").exists()


# ----------------------------------------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------------------------------------


def crash_midway(monkeypatch):
    """Make the adapter writer die after writing half a file."""
    def half_write(state, path):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(conversion, "_save_safetensors", half_write)


def test_a_crash_during_save_leaves_the_previous_output(trained, tmp_path, monkeypatch):
    out = tmp_path / "adapter"
    trained.trainer.save_model(str(out))
    before = snapshot(out)
    crash_midway(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        trained.trainer.save_model(str(out))
    assert snapshot(out) == before
    assert siblings_with(out, ".tmp-", ".old-") == []

    # Saving into the run folder (beside checkpoint-N/ and logs): those are kept, the old output survives a crash.
    run = tmp_path / "run"
    (run / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoint-1" / "trainer_state.json").write_text("{}")
    monkeypatch.undo()
    trained.trainer.save_model(str(run))
    before = snapshot(run)
    crash_midway(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        trained.trainer.save_model(str(run))
    assert snapshot(run) == before and (run / "checkpoint-1" / "trainer_state.json").is_file()
    monkeypatch.undo()
    (run / "adapter_model.bin").write_bytes(b"stale output of an older save")
    trained.trainer.save_model(str(run))
    assert snapshot(run).keys() == before.keys() and (run / "checkpoint-1" / "trainer_state.json").is_file()


@pytest.mark.parametrize("trained", ["lora"], indirect=True)  # does not depend on the adapter kind
def test_a_crash_during_merge_leaves_the_previous_merge(trained, tmp_path, monkeypatch):
    out = merge(trained.final, str(tmp_path / "merged"), dtype="fp32")
    before = snapshot(out)

    def dies_midway(self, directory, *args, **kwargs):
        with open(os.path.join(directory, "model.safetensors"), "wb") as f:
            f.write(b"\0" * 100)
        raise KeyboardInterrupt("killed while writing shards")

    monkeypatch.setattr(type(AutoModelForCausalLM.from_pretrained(out)), "save_pretrained", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        merge(trained.final, out, dtype="fp32", force=True)
    assert snapshot(out) == before
    assert siblings_with(out, ".tmp-", ".old-") == []


# ----------------------------------------------------------------------------------------------------------------
# the Hub (no network: the upload is intercepted, or refused without credentials)
# ----------------------------------------------------------------------------------------------------------------


class FakeHub:
    def __init__(self):
        self.uploads = []

    def create_repo(self, repo_id, **kwargs):
        return types.SimpleNamespace(repo_id=f"me/{repo_id}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        files = []
        for root, _, names in os.walk(folder_path):
            files += [os.path.relpath(os.path.join(root, n), folder_path) for n in names]
        files = list(filter_repo_objects(files, ignore_patterns=list(ignore_patterns)))
        self.uploads.append({"repo_id": repo_id, "files": files,
                             "adapter_config": json.load(open(os.path.join(folder_path, "adapter_config.json"))),
                             "card": open(os.path.join(folder_path, "README.md"), encoding="utf-8").read()})
        result = types.SimpleNamespace(commit_url="fake")
        if kwargs.get("run_as_future"):
            from concurrent.futures import Future

            future = Future()
            future.set_result(result)
            return future
        return result


def test_push_to_hub_uploads_the_converted_adapter_and_card(trained, monkeypatch):
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    trained.trainer.push_to_hub()
    (upload,) = hub.uploads
    assert upload["repo_id"].startswith("me/")
    assert upload["adapter_config"]["r"] == (8 if trained.name == "pissa" else 4)
    assert "adapter_model.safetensors" in upload["files"] and "balora_config.json" in upload["files"]
    assert not [f for f in upload["files"] if f.startswith("checkpoint-") or REFERENCE_ADAPTER in f]
    assert "## BA-LoRA" in upload["card"] and "library_name: peft" in upload["card"]

    # The push that follows a checkpoint during training: the repo's top level gets the converted adapter too
    # (the Trainer would copy the checkpoint's residual-form files), pushed once the checkpoint has its name.
    trainer = trained.trainer
    monkeypatch.setattr(trainer.args, "push_to_hub", True)
    trainer._save_checkpoint(trainer.model, trial=None)
    trainer._finish_current_push()
    (_, upload) = hub.uploads
    assert upload["adapter_config"]["r"] == (8 if trained.name == "pissa" else 4)
    assert json.load(open(os.path.join(trained.checkpoint, "adapter_config.json")))["r"] == 4  # still resumable
    assert not [n for n in os.listdir(trained.run_dir) if n.startswith("_tmp-")]


def test_merge_push_without_credentials_is_refused_up_front(trained, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(merging, "_load_base_model", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):  # the test session is offline
        merge(trained.final, str(tmp_path / "merged"), push_to_hub="me/merged")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(ValueError, match="without credentials"):
        merge(trained.final, str(tmp_path / "merged"), push_to_hub="me/merged")
    assert not (tmp_path / "merged").exists()
