"""Pre-initialised PiSSA (`balora pissa-init`, balora_trl.pissa_init): the factorisation written once, training from
it with no SVD, the save converted back to a LoRA on the original model, mismatched pairs refused."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from balora_trl.pissa_init import ADAPTER_SUBDIR, METADATA_FILE, check_pair, find_pissa_init, pissa_init

R, ALPHA = 4, 8  # s = 2: a scale other than 1 checks that W_res = W − s·B₀A₀ uses it


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def original_dir(tmp_path_factory, tokenizer):
    from balora_trl.local_models import build_causal_lm

    path = tmp_path_factory.mktemp("original")
    model = build_causal_lm("llama", tokenizer, hidden_size=32, num_layers=2, seed=0, initializer_range=32 ** -0.5)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def pi_dir(original_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pi") / "residual"
    pissa_init(original_dir, str(out), r=R, lora_alpha=ALPHA, init="pissa", progress=False)
    return str(out)


@pytest.fixture(scope="module")
def probe_ids(tokenizer):
    from conftest import gsm8k_rows

    return tokenizer(gsm8k_rows("train", 200)[-1]["question"], return_tensors="pt").input_ids[:, :48]


def test_residual_plus_adapter_is_the_original_layer_by_layer(original_dir, pi_dir):
    """W_res + s·B₀A₀ = W for every targeted layer; (B₀, A₀) are what PEFT's PiSSA computes on the whole model."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(original_dir)
    residual = AutoModelForCausalLM.from_pretrained(pi_dir)
    adapter = load_file(os.path.join(pi_dir, ADAPTER_SUBDIR, "adapter_model.safetensors"))
    config = json.loads(Path(pi_dir, ADAPTER_SUBDIR, "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == R and config["lora_alpha"] == ALPHA
    assert config["base_model_name_or_path"] == os.path.abspath(original_dir)

    peft_reference = get_peft_model(AutoModelForCausalLM.from_pretrained(original_dir),
                                     LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear",
                                                init_lora_weights="pissa"))
    reference_state = {k.replace(".default", ""): v for k, v in peft_reference.state_dict().items() if "lora_" in k}
    layers = [k[len("base_model.model."):-len(".lora_A.weight")] for k in adapter if k.endswith(".lora_A.weight")]
    assert len(layers) == 2 * 7  # all-linear on a 2-layer Llama: q, k, v, o, gate, up, down
    differs = 0
    for name in layers:
        a, b = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
        w = original.get_submodule(name).weight
        w_res = residual.get_submodule(name).weight
        torch.testing.assert_close(w_res + (ALPHA / R) * b @ a, w, atol=1e-5, rtol=0)
        differs += int(not torch.allclose(w_res, w, atol=1e-3))
        torch.testing.assert_close(a, reference_state[f"base_model.model.{name}.lora_A.weight"], atol=1e-5, rtol=0)
        torch.testing.assert_close(b, reference_state[f"base_model.model.{name}.lora_B.weight"], atol=1e-5, rtol=0)
    assert differs == len(layers)  # the residual really is not the original
    # the untouched weights are copied as they are
    torch.testing.assert_close(residual.lm_head.weight, original.lm_head.weight, atol=0, rtol=0)
    meta = json.loads(Path(pi_dir, METADATA_FILE).read_text())
    assert meta["original"]["name_or_path"] == os.path.abspath(original_dir) and meta["original"]["fingerprint"]
    assert meta["r"] == R and meta["init_lora_weights"] == "pissa" and meta["modules"] == len(layers)
    assert json.loads(Path(pi_dir, ADAPTER_SUBDIR, METADATA_FILE).read_text())["init_id"] == meta["init_id"]


def _no_svd(monkeypatch):
    """Every SVD entry point PiSSA can reach raises."""
    import peft.tuners.lora.layer as lora_layer

    def refuse(*args, **kwargs):
        raise AssertionError("an SVD ran at training start-up")

    for owner, name in ((torch.linalg, "svd"), (torch, "svd_lowrank"), (torch, "svd"), (torch.linalg, "svdvals"),
                        (lora_layer, "svd_lowrank")):
        monkeypatch.setattr(owner, name, refuse)


def _args(model_dir, data, out, *extra):
    from balora_trl.sft import parse_args

    return parse_args(["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out),
                       "--max_steps", "3", "--per_device_train_batch_size", "4", "--max_length", "256",
                       "--use_cpu", "true", "--report_to", "none", "--learning_rate", "5e-3", "--lambda_svd", "0",
                       "--lora_r", str(R), "--lora_alpha", str(ALPHA), "--activation_checkpointing", "false",
                       "--logging_steps", "1", "--save_strategy", "no", *extra])


@pytest.fixture
def data_file(tmp_path):
    from conftest import gsm8k_rows

    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows("train", 12)))
    return path


def test_train_from_pissa_init_then_save_for_the_original(original_dir, pi_dir, data_file, tmp_path, probe_ids,
                                                          monkeypatch):
    """No SVD at start-up; the reference is the original model before and after training; the saved rank-2r LoRA on
    the original model — loaded by PEFT, or merged by `balora merge` — is the trained model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from balora_trl.merging import merge
    from balora_trl.sft import build_trainer, train_and_save

    original = AutoModelForCausalLM.from_pretrained(original_dir).eval()
    expected = _logits(original, probe_ids)
    with monkeypatch.context() as patch, pytest.raises(AssertionError, match="an SVD ran"):
        _no_svd(patch)  # the patch does catch PiSSA computed on the fly
        from peft import LoraConfig, get_peft_model

        get_peft_model(original, LoraConfig(r=R, target_modules=["q_proj"], init_lora_weights="pissa_niter_2"))
    original = AutoModelForCausalLM.from_pretrained(original_dir).eval()
    out = tmp_path / "run"
    script, training, model_args = _args(pi_dir, data_file, out)
    assert not training.bf16
    with monkeypatch.context() as patch:
        _no_svd(patch)
        trainer, template = build_trainer(script, training, model_args)
        assert trainer.reference.kind == "initial_adapter"
        policy = trainer.model
        with trainer.reference.activate(policy):
            torch.testing.assert_close(_logits(policy, probe_ids), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(_logits(policy, probe_ids), expected, atol=1e-5, rtol=0)  # step 0 = original
        train_and_save(trainer, template, script, training, model_args)
    policy.eval()
    trained = _logits(policy, probe_ids)
    assert (trained - expected).abs().max() > 1e-3  # training moved the model
    with trainer.reference.activate(policy):
        torch.testing.assert_close(_logits(policy, probe_ids), expected, atol=1e-5, rtol=0)

    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 * R and saved["lora_alpha"] == 2 * ALPHA and saved["init_lora_weights"] is True
    assert saved["base_model_name_or_path"] == os.path.abspath(original_dir)
    assert json.loads((out / "balora_config.json").read_text())["adapter"]["converted_from_residual"]
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original_dir), str(out)).eval()
    torch.testing.assert_close(_logits(loaded, probe_ids), trained, atol=1e-4, rtol=0)

    merged_dir = tmp_path / "merged"
    merge(str(out), str(merged_dir), dtype="fp32")
    merged = AutoModelForCausalLM.from_pretrained(str(merged_dir)).eval()
    torch.testing.assert_close(_logits(merged, probe_ids), trained, atol=1e-4, rtol=0)


def test_peft_example_layout_without_reachable_original(original_dir, data_file, tmp_path, probe_ids, monkeypatch):
    """A folder made the way PEFT's PiSSA example makes it (no balora metadata, no original recorded): training
    works, and the save stays in residual form for the residual model — never a LoRA claiming another base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from balora_trl.sft import build_trainer, train_and_save

    folder = tmp_path / "peft_layout"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(original_dir),
                           LoraConfig(r=R, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights="pissa",
                                      task_type="CAUSAL_LM"))
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(folder / ADAPTER_SUBDIR)
    model.unload().save_pretrained(folder)
    shutil.copy(Path(original_dir, "tokenizer.json"), folder)
    shutil.copy(Path(original_dir, "tokenizer_config.json"), folder)
    found = find_pissa_init(str(folder))  # PEFT's adapter config names the original model
    assert found is not None and found.original == os.path.abspath(original_dir) and found.metadata == {}

    # ... which has since moved away
    config_file = folder / ADAPTER_SUBDIR / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "moved_away")
    config_file.write_text(json.dumps(config))
    found = find_pissa_init(str(folder))
    assert found.original is None and "not there any more" in found.unreachable_reason
    out = tmp_path / "run"
    script, training, model_args = _args(folder, data_file, out)
    expected = _logits(AutoModelForCausalLM.from_pretrained(original_dir).eval(), probe_ids)
    with monkeypatch.context() as patch:
        _no_svd(patch)
        with pytest.warns(UserWarning, match="not reachable"):
            trainer, template = build_trainer(script, training, model_args)
        with trainer.reference.activate(trainer.model):
            torch.testing.assert_close(_logits(trainer.model, probe_ids), expected, atol=1e-5, rtol=0)
        train_and_save(trainer, template, script, training, model_args)
    trained = _logits(trainer.model.eval(), probe_ids)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == R and saved["base_model_name_or_path"] == str(folder.resolve())
    assert "not reachable" in (out / "README.md").read_text()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(folder)), str(out)).eval()
    torch.testing.assert_close(_logits(loaded, probe_ids), trained, atol=1e-4, rtol=0)


def test_a_hub_repository_holding_pissa_init_is_detected(original_dir, pi_dir, tmp_path, monkeypatch):
    """A Hub id whose repository holds pissa_init/: only the adapter and metadata are fetched (at the revision
    asked for), the residual stays the Hub id; a repository without it, or one that cannot be reached, is an
    ordinary model."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    shutil.copytree(Path(pi_dir) / ADAPTER_SUBDIR, snapshot / ADAPTER_SUBDIR)
    shutil.copy(Path(pi_dir) / METADATA_FILE, snapshot / METADATA_FILE)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        if repo_id == "someone/llama-pissa-r4":
            return str(snapshot)
        if repo_id == "someone/plain-model":
            return str(tmp_path)  # a snapshot holding none of the patterns
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = find_pissa_init("someone/llama-pissa-r4", revision="abc123")
    assert folder is not None and folder.residual == "someone/llama-pissa-r4"
    assert folder.adapter == str(snapshot / ADAPTER_SUBDIR) and folder.metadata["r"] == R
    assert folder.original == os.path.abspath(original_dir)  # recorded in the fetched metadata, reachable here
    assert calls[0] == ("someone/llama-pissa-r4", "abc123", sorted([f"{ADAPTER_SUBDIR}/*", METADATA_FILE]))
    assert find_pissa_init("someone/plain-model") is None and find_pissa_init("someone/unreachable") is None
    assert find_pissa_init(original_dir) is None and len(calls) == 3  # a local folder never asks the Hub


@pytest.mark.parametrize("base_on_meta", [False, True])
def test_a_rank_under_fsdp_ram_efficient_loading_gets_the_adapter_from_the_file(pi_dir, monkeypatch, base_on_meta):
    """FSDP's cpu_ram_efficient_loading as rank 1 sees it: transformers' own switch (a process group, the accelerate
    environment, LOCAL_RANK ≠ 0) and, with ``base_on_meta``, a residual left on the meta device (transformers 4.x
    builds ranks > 0 that way; rank 0 broadcasts its weights when FSDP wraps). Either way the adapter and the
    reference's frozen copy are real tensors equal to the file's (B₀, A₀)."""
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from balora_trl.pissa_init import load_pissa_init
    from balora_trl.reference import REFERENCE_ADAPTER, build_reference
    from test_multiprocess import _free_port

    if base_on_meta:
        def on_meta(path, **kwargs):
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", on_meta)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        folder = find_pissa_init(pi_dir)
        model = load_pissa_init(folder)
        reference = build_reference(model)
    finally:
        dist.destroy_process_group()
    params = dict(model.named_parameters())
    base = [p for n, p in params.items() if "base_layer.weight" in n]
    assert base and all(p.device.type == ("meta" if base_on_meta else "cpu") for p in base)
    state = folder.initial_state()
    adapters = {n: p for n, p in params.items() if ".lora_" in n and f".{REFERENCE_ADAPTER}." not in n}
    assert len(adapters) == len(state)
    for name, param in adapters.items():
        assert param.device.type == "cpu" and param.requires_grad
        torch.testing.assert_close(param.detach().float(), state[name.replace(".default.", ".")], atol=0, rtol=0)
    frozen = {n: p for n, p in params.items() if f".{REFERENCE_ADAPTER}." in n}
    assert reference.kind == "initial_adapter" and len(frozen) == len(state)
    for name, param in frozen.items():
        assert param.device.type == "cpu" and not param.requires_grad
        torch.testing.assert_close(param.detach(), state[name.replace(f".{REFERENCE_ADAPTER}.", ".")], atol=0, rtol=0)


def test_mismatched_pairs_fail_before_training(original_dir, pi_dir, tokenizer, tmp_path, data_file):
    from balora_trl.local_models import build_causal_lm
    from balora_trl.sft import build_trainer

    found = find_pissa_init(pi_dir)
    check_pair(found, r=R, lora_alpha=ALPHA, target_modules="all-linear")  # the right pair passes

    with pytest.raises(ValueError, match=r"lora_r=8 .*r=4"):
        check_pair(found, r=8, lora_alpha=ALPHA, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"lora_alpha=16"):
        check_pair(found, r=R, lora_alpha=16, target_modules="all-linear")
    with pytest.raises(ValueError, match=r"lora_target_modules=\['q_proj', 'v_proj'\].*also covers"):
        check_pair(found, r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"])

    # another pissa-init run's adapter (same architecture, other weights) beside this residual
    other_original = tmp_path / "other"
    build_causal_lm("llama", tokenizer, hidden_size=32, num_layers=2, seed=1).save_pretrained(other_original)
    tokenizer.save_pretrained(other_original)
    other = tmp_path / "other_pi"
    pissa_init(str(other_original), str(other), r=R, lora_alpha=ALPHA, init="pissa", progress=False)
    with pytest.raises(ValueError, match="another pissa-init run"):
        check_pair(find_pissa_init(pi_dir, str(other / ADAPTER_SUBDIR)), r=R, lora_alpha=ALPHA)

    # an adapter for another model shape, in PEFT's layout (no metadata): the shapes say so
    wide = tmp_path / "wide"
    build_causal_lm("llama", tokenizer, hidden_size=48, num_layers=2, seed=0).save_pretrained(wide)
    tokenizer.save_pretrained(wide)
    wide_pi = tmp_path / "wide_pi"
    pissa_init(str(wide), str(wide_pi), r=R, lora_alpha=ALPHA, init="pissa_niter_2", progress=False)
    os.remove(wide_pi / ADAPTER_SUBDIR / METADATA_FILE)
    mixed = tmp_path / "mixed"
    shutil.copytree(pi_dir, mixed)
    shutil.rmtree(mixed / ADAPTER_SUBDIR)
    shutil.copytree(wide_pi / ADAPTER_SUBDIR, mixed / ADAPTER_SUBDIR)
    os.remove(mixed / METADATA_FILE)
    with pytest.raises(ValueError, match="does not fit"):
        check_pair(find_pissa_init(str(mixed)), r=R, lora_alpha=ALPHA)

    # through the training job: refused before any model is built or trained
    script, training, model_args = _args(pi_dir, data_file, tmp_path / "run", "--lora_r", "8")
    with pytest.raises(ValueError, match="pass --lora_r 4"):
        build_trainer(script, training, model_args)
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_cli_refuses_a_non_empty_out_dir(original_dir, tmp_path, capsys):
    from balora_trl.cli import main

    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["pissa-init", "--model", original_dir, "--out", str(out), "--r", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--force" in err and len(err.splitlines()) == 1
    assert (out / "keep.txt").read_text() == "mine"

    assert main(["pissa-init", "--model", original_dir, "--out", str(out), "--r", "4", "--init", "pissa_niter_2",
                 "--force"]) == 0
    assert not (out / "keep.txt").exists() and (out / ADAPTER_SUBDIR / "adapter_config.json").is_file()
    assert main(["pissa-init", "--model", original_dir, "--out", str(tmp_path / "x"), "--init", "olora"]) == 2
    assert "pissa" in capsys.readouterr().err


def test_accelerate_configs_for_pissa_init_shard_while_loading():
    """The pissa-init variants differ from fsdp.yaml / deepspeed_zero3.yaml only in loading sharded."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"

    def load(name):
        return load_config_from_file(str(folder / f"{name}.yaml")).to_dict()

    for plain, variant, section, key in (("fsdp", "fsdp_pissa_init", "fsdp_config", "fsdp_cpu_ram_efficient_loading"),
                                         ("deepspeed_zero3", "deepspeed_zero3_pissa_init", "deepspeed_config",
                                          "zero3_init_flag")):
        a, b = load(plain), load(variant)
        assert a[section][key] is False and b[section][key] is True
        b[section][key] = False
        assert a == b


def test_pissa_init_refusal_and_cli_preflight(original_dir, pi_dir, capsys):
    """PiSSA computed at start-up on a 4-bit model is refused and the message names `balora pissa-init`; from a
    pissa-init folder the PiSSA-on-4-bit refusal does not apply (only what the machine lacks is reported)."""
    from balora_trl.cli import main

    assert main(["train", "--model_name_or_path", original_dir, "--load_in_4bit", "true"]) == 2
    assert "balora pissa-init" in capsys.readouterr().err
    from balora_trl.cli import train
    from balora_trl.preflight import PreflightError

    launched = []
    try:
        train(["--model_name_or_path", pi_dir, "--load_in_4bit", "true", "--lora_r", str(R), "--lora_alpha",
               str(ALPHA)], launch=launched.append)
    except PreflightError as error:  # no CUDA / bitsandbytes here: said, but not the PiSSA refusal
        assert "init_lora_weights" not in str(error) and "pissa-init" not in str(error)
    else:
        assert len(launched) == 1


@pytest.mark.slow
def test_two_processes_train_from_a_pissa_init_folder(original_dir, pi_dir, data_file, tmp_path, probe_ids):
    """2 processes (gloo) from a pissa-init folder: the ranks' adapters agree, and the saved LoRA on the original
    model is the trained model (residual + trained adapter, rebuilt here from rank 0's weights)."""
    import subprocess
    import sys

    from peft import PeftModel
    from test_multiprocess import HERE, _free_port
    from transformers import AutoModelForCausalLM

    from balora_trl.pissa_init import load_pissa_init

    record, out = tmp_path / "record", tmp_path / "run"
    record.mkdir()
    env = dict(os.environ, BALORA_TEST_RECORD=str(record), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_free_port()), str(HERE / "multiprocess_worker.py"),
               "--model_name_or_path", pi_dir, "--dataset_name", str(data_file), "--output_dir", str(out),
               "--use_cpu", "true", "--max_steps", "2", "--per_device_train_batch_size", "2", "--max_length", "256",
               "--report_to", "none", "--lora_r", str(R), "--lora_alpha", str(ALPHA), "--learning_rate", "5e-3",
               "--lambda_svd", "0", "--activation_checkpointing", "false"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, result.stderr[-5000:]

    adapters = [torch.load(record / f"adapter_rank{r}.pt") for r in (0, 1)]
    for name, weight in adapters[0]["after"].items():
        assert torch.equal(weight, adapters[1]["after"][name]), name
    assert any(not torch.equal(adapters[0]["before"][n], w) for n, w in adapters[0]["after"].items())
    trained = load_pissa_init(find_pissa_init(pi_dir))
    missing = trained.load_state_dict(adapters[0]["after"], strict=False)
    assert not missing.unexpected_keys
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 2 * R and saved["base_model_name_or_path"] == os.path.abspath(original_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(original_dir), str(out)).eval()
    torch.testing.assert_close(_logits(loaded, probe_ids), _logits(trained.eval(), probe_ids), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_library_use_and_exact_resume_without_svd(pi_dir, tokenizer, tmp_path, monkeypatch):
    """`load_pissa_init` + BALoraSFTTrainer (the library path): a run resumed from its checkpoint — with no SVD —
    ends with the same adapter and the same converted output as the uninterrupted run."""
    from conftest import StopAt, cpu_config, gsm8k_rows
    from datasets import Dataset
    from peft import get_peft_model_state_dict

    from balora_trl import BALoraSFTTrainer
    from balora_trl.pissa_init import load_pissa_init
    from balora_trl.reference import REFERENCE_ADAPTER
    from safetensors.torch import load_file

    rows = Dataset.from_list([{"prompt": "Question: " + r["question"][:100] + "\nAnswer:",
                               "completion": " " + r["answer"][:100]} for r in gsm8k_rows("train", 24)])

    def trainer(out, callbacks=None):
        config = cpu_config(out, max_steps=4, save_strategy="steps", save_steps=2, lambda_consistency=1.0,
                            lambda_svd=0.0, learning_rate=5e-2, max_length=96, disable_tqdm=True)
        return BALoraSFTTrainer(load_pissa_init(find_pissa_init(pi_dir)), config, train_dataset=rows,
                                processing_class=tokenizer, callbacks=callbacks)

    def adapter(t, name="default"):
        return get_peft_model_state_dict(t.model, adapter_name=name)

    full = trainer(tmp_path / "full")
    full.train()
    stopped = trainer(tmp_path / "run", callbacks=[StopAt(2)])
    stopped.train()
    assert (tmp_path / "run" / "checkpoint-2" / REFERENCE_ADAPTER / "adapter_model.safetensors").is_file()
    with monkeypatch.context() as patch:
        _no_svd(patch)
        resumed = trainer(tmp_path / "run")
        resumed.train(resume_from_checkpoint=True)
    for key, value in adapter(full).items():
        torch.testing.assert_close(adapter(resumed)[key], value, atol=1e-6, rtol=0, msg=key)
    initial = load_file(os.path.join(pi_dir, ADAPTER_SUBDIR, "adapter_model.safetensors"))
    for key, value in adapter(resumed, REFERENCE_ADAPTER).items():
        assert torch.equal(value, initial[key]), key
    assert any(not torch.allclose(adapter(full)[k], initial[k]) for k in initial)
    full.save_model(str(tmp_path / "a"))
    resumed.save_model(str(tmp_path / "b"))
    a, b = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_file(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)


def test_a_swapped_half_is_caught_from_the_data(original_dir, pi_dir, tmp_path, capsys):
    """Issue 30: the pair checked from the weights. Another pissa-init run of the same model (randomised SVD: the
    same shapes, r and α; other B₀A₀, so another residual) swapped in for one half is refused whichever metadata
    file is removed; a true pair passes with either file removed; with none, one warning says it is unchecked."""
    import subprocess
    import sys

    from balora_trl.pissa_init import adapter_fingerprint, residual_fingerprint

    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    other = tmp_path / "other"
    leftover = tmp_path / f"other.tmp-{gone}"  # what a killed pissa-init of this --out leaves
    leftover.mkdir()
    capsys.readouterr()
    pissa_init(original_dir, str(other), r=R, lora_alpha=ALPHA, init="pissa_niter_1", progress=False)
    assert not leftover.exists() and f"Removed {leftover}" in capsys.readouterr().err
    meta = json.loads((other / METADATA_FILE).read_text())
    assert meta["residual_sha256"] and meta["adapter_sha256"]
    assert json.loads((other / ADAPTER_SUBDIR / METADATA_FILE).read_text()) == meta  # both halves carry both

    # the residual's metadata removed, another run's pissa_init/ in its place: its metadata names another residual
    mixed = tmp_path / "mixed"
    shutil.copytree(pi_dir, mixed)
    shutil.rmtree(mixed / ADAPTER_SUBDIR)
    shutil.copytree(other / ADAPTER_SUBDIR, mixed / ADAPTER_SUBDIR)
    os.remove(mixed / METADATA_FILE)
    with pytest.raises(ValueError, match=r"the residual weights in .*mixed are not the ones the adapter was made with"):
        check_pair(find_pissa_init(str(mixed)), r=R, lora_alpha=ALPHA)
    # only the adapter's weights swapped: both metadata files say they are not these
    swapped = tmp_path / "swapped"
    shutil.copytree(pi_dir, swapped)
    shutil.copy(other / ADAPTER_SUBDIR / "adapter_model.safetensors", swapped / ADAPTER_SUBDIR)
    with pytest.raises(ValueError, match=r"the adapter weights in .*swapped/pissa_init are not the ones"):
        check_pair(find_pissa_init(str(swapped)), r=R, lora_alpha=ALPHA)
    # the swap is a real one: the two runs' residuals differ (randomised vs exact SVD)
    modules = {k[len("base_model.model."):].split(".lora_")[0] for k in find_pissa_init(str(other)).initial_state()}
    assert residual_fingerprint(pi_dir, modules) != residual_fingerprint(str(other), modules)
    assert adapter_fingerprint(find_pissa_init(pi_dir).initial_state()) == json.loads(
        (Path(pi_dir) / METADATA_FILE).read_text())["adapter_sha256"]

    # a true pair with either metadata file removed passes: the other one vouches for both halves
    for removed in (METADATA_FILE, f"{ADAPTER_SUBDIR}/{METADATA_FILE}"):
        pair = tmp_path / f"pair_{removed.replace('/', '_')}"
        shutil.copytree(pi_dir, pair)
        os.remove(pair / removed)
        check_pair(find_pissa_init(str(pair)), r=R, lora_alpha=ALPHA)
    # no metadata at all (PEFT's layout): cannot be checked from the data, and it says so
    bare = tmp_path / "bare"
    shutil.copytree(mixed, bare)
    os.remove(bare / ADAPTER_SUBDIR / METADATA_FILE)
    with pytest.warns(UserWarning, match="has no balora_pissa_init.json with weight fingerprints"):
        check_pair(find_pissa_init(str(bare)), r=R, lora_alpha=ALPHA)
