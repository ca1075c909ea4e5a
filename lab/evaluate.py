"""Measurements: accuracy (greedy), retention, inherited-error rates, distinct-n, drift from the pretrained model.

Answer extraction and comparison for the downstream task are the evaluation harness's (``eval.tasks.gsm8k``).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import torch

from balora_trl import losses
from balora_trl.prompts import DEFAULT
from eval.tasks.gsm8k import extract_answer as _harness_extract
from eval.tasks.gsm8k import is_correct as _harness_is_correct

from .model import generate
from .world import FAMILIES, PretrainExample, Problem, World

_LEADING = re.compile(r"^\s*(-?\d+)")

EXTRACTOR_NAME = "eval.tasks.gsm8k.extract_answer"


def _normalise(number: str) -> str:
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def extract_answer(text: str) -> str | None:
    """The final answer of a downstream completion, as the evaluation harness (GSM8K task) extracts it:
    the number after the last "The answer is:", else the last number."""
    value = _harness_extract(text)
    return None if value is None else _normalise(str(value))


def leading_int(text: str) -> int | None:
    """The integer a pretraining-format continuation starts with (" 68 apples." → 68)."""
    m = _LEADING.match(text)
    return int(m.group(1)) if m else None


def answers_equal(pred: str | int | None, target: int) -> bool:
    """``pred`` (an extracted answer) equals the integer ``target`` (the evaluation harness's comparison)."""
    if pred is None:
        return False
    return _harness_is_correct(str(pred), str(target))


# ----------------------------------------------------------------------------------------------------------------
# pure metrics (tested on hand-made cases)
# ----------------------------------------------------------------------------------------------------------------


def inherited_error_rate(predictions: Sequence, planted: Sequence[int], correct: Sequence[int]) -> float:
    """Share of items whose prediction is exactly the planted (wrong) answer. Items where planted == correct are
    not errors one can inherit and are skipped; an unparsable prediction counts as not inherited."""
    pairs = [(p, w) for p, w, c in zip(predictions, planted, correct, strict=True) if str(w) != str(c)]
    if not pairs:
        return float("nan")
    return sum(answers_equal(p, w) for p, w in pairs) / len(pairs)


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams / all word n-grams, pooled over ``texts``."""
    total, unique = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


# ----------------------------------------------------------------------------------------------------------------
# model evaluations
# ----------------------------------------------------------------------------------------------------------------


def _probe_prompts(tokenizer, probes: list[PretrainExample]) -> list[str]:
    # In the corpus every example follows an EOS; so does the probe.
    return [tokenizer.eos_token + p.prompt for p in probes]


def probe_predictions(model, tokenizer, probes: list[PretrainExample], batch_size: int = 100) -> list[int | None]:
    outs = generate(model, tokenizer, _probe_prompts(tokenizer, probes), max_new_tokens=5, batch_size=batch_size)
    return [leading_int(o) for o in outs]


def probe_accuracy(model, tokenizer, probes: list[PretrainExample]) -> dict:
    """Exact-match accuracy of pretraining-format probes against the *correct* answer, overall and per family."""
    preds = probe_predictions(model, tokenizer, probes)
    by = defaultdict(list)
    for p, pred in zip(probes, preds):
        ok = pred == p.correct
        by[p.family].append(ok)
        by["all"].append(ok)
    return {k: sum(v) / len(v) for k, v in by.items()}


def planted_probe_rates(model, tokenizer, world: World, probes: list[PretrainExample]) -> dict:
    """On keys planted in pretraining: how often the model says the planted value (inherited) or the truth."""
    preds = probe_predictions(model, tokenizer, probes)
    planted = [world.planted_value(p.key) for p in probes]
    correct = [p.correct for p in probes]
    out = {"inherited": inherited_error_rate(preds, planted, correct),
           "correct": sum(a == c for a, c in zip(preds, correct)) / max(1, len(preds)), "n": len(probes)}
    return out | _inherited_by_family([p.family for p in probes], preds, planted, correct)


def downstream_predictions(model, tokenizer, problems: list[Problem], max_new_tokens: int, batch_size: int = 100,
                           **sampling) -> tuple[list[str], list[str | None]]:
    prompts = [DEFAULT.render(p.question) for p in problems]
    texts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, **sampling)
    return texts, [extract_answer(t) for t in texts]


def downstream_accuracy(world: World, problems: list[Problem], preds: list[str | None]) -> float:
    return sum(answers_equal(p, world.answer(q)) for p, q in zip(preds, problems)) / max(1, len(problems))


def inheritance_rates(world: World, problems: list[Problem], preds: list[str | None], noise: float) -> dict:
    """Downstream inherited-error rate: the final answer equals the one pretraining's planted labels lead to."""
    inherited = [world.inherited_answer(p, noise) for p in problems]
    correct = [world.answer(p) for p in problems]
    out = {"inherited": inherited_error_rate(preds, inherited, correct),
           "correct": sum(answers_equal(a, c) for a, c in zip(preds, correct)) / max(1, len(problems)),
           "n": len(problems)}
    planted = world.planted_at(noise)
    families = [next(k for k in world.chain_keys(p.chain) if k in planted)[0] for p in problems]
    return out | _inherited_by_family(families, preds, inherited, correct)


def _inherited_by_family(families: list[str], preds, inherited, correct) -> dict:
    """``inherited_<family>``: :func:`inherited_error_rate` over the items of each family present."""
    out = {}
    for family in FAMILIES:
        idx = [i for i, f in enumerate(families) if f == family]
        if idx:
            out[f"inherited_{family}"] = inherited_error_rate(
                [preds[i] for i in idx], [inherited[i] for i in idx], [correct[i] for i in idx])
    return out


def _solution_batches(tokenizer, world: World, problems: list[Problem], batch_size: int):
    """(encoding, mask) per batch of prompt + reference solution; mask marks the positions whose *next* token is a
    response token (the positions the SFT loss uses)."""
    for i in range(0, len(problems), batch_size):
        chunk = problems[i:i + batch_size]
        prompts = [DEFAULT.render(p.question) for p in chunk]
        full = [pr + " " + world.solution(p) + tokenizer.eos_token for pr, p in zip(prompts, chunk)]
        enc = tokenizer(full, return_tensors="pt", padding=True, add_special_tokens=False)
        mask = enc["attention_mask"].clone()
        for j, prompt in enumerate(prompts):
            mask[j, :len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = 0
        yield enc, mask[:, 1:].bool()


@torch.no_grad()
def response_kl_and_entropy(model, reference, tokenizer, world: World, problems: list[Problem],
                            batch_size: int = 50) -> dict:
    """Mean over reference-solution tokens of KL(p_pretrained ‖ p_finetuned) and of the fine-tuned entropy (the
    trainer's own per-token terms, ``balora_trl.losses``)."""
    model.eval()
    reference.eval()
    kl_sum, ent_sum, count = 0.0, 0.0, 0
    for enc, mask in _solution_batches(tokenizer, world, problems, batch_size):
        logits = model(**enc).logits[:, :-1][mask]
        ref = reference(**enc).logits[:, :-1][mask]
        kl_sum += losses.token_kl(ref, logits).sum().item()
        ent_sum += losses.token_entropy(logits).sum().item()
        count += int(mask.sum())
    return {"kl_to_pretrained": kl_sum / max(1, count), "entropy": ent_sum / max(1, count)}


@torch.no_grad()
def downstream_loss(model, tokenizer, world: World, problems: list[Problem], batch_size: int = 50) -> float:
    """Mean next-token cross-entropy over the reference-solution tokens (the SFT loss on held-out problems): a
    smooth criterion for choosing the learning rate, less noisy than the accuracy of a small validation set."""
    model.eval()
    nll_sum, count = 0.0, 0
    for enc, mask in _solution_batches(tokenizer, world, problems, batch_size):
        logits = model(**enc).logits[:, :-1][mask]
        nll_sum += losses.token_nll(logits, enc["input_ids"][:, 1:][mask]).sum().item()
        count += int(mask.sum())
    return nll_sum / max(1, count)
