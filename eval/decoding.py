"""Greedy decoding that drops finished rows from the batch: the CPU harness's and the benchmarks' generation loop.

``model.generate`` runs a batch until its longest row is done, computing every finished row to the end: on a CPU,
where a decoding step costs in proportion to the rows it computes, a batch in which one answer of sixteen runs to a
320-token limit and the rest stop near 100 spends about 60 % of its time on rows already finished. Here a row leaves
the batch (its KV cache rows with it, ``Cache.batch_select_indices``) at the step it ends — an end-of-sequence token,
a stop string, or the limit — so the cost follows the tokens actually generated. transformers' continuous batching
(``generate_batch``) does this with a paged cache built for GPUs and has no stop strings; vLLM does it on GPUs and in
its own CPU build. This loop is what the plain transformers backend needs on a CPU.

The tokens are ``model.generate``'s greedy tokens (same prompt padding, position ids, cache and argmax;
``tests/test_eval_decoding.py`` checks it against ``generate``): a row's numbers may differ in the last bits when the
batch around it shrinks, as they already may between batch sizes.
"""

from __future__ import annotations

import inspect
from typing import Iterable, Sequence


def greedy_decode(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  eos_token_ids: Iterable[int], stop: Sequence[str] = (), batch_size: int = 16,
                  progress=None) -> list[list[int]]:
    """Greedy continuations of tokenised ``prompts``, in their order, each ending with the token that completed it
    (an end-of-sequence token, or the token that completed a ``stop`` string: a stop string is not cut here, as
    ``generate(stop_strings=...)`` does not cut it) or after ``max_new_tokens`` tokens.

    Batches of ``batch_size`` prompts of similar length (longest first, left padding with the tokenizer's pad
    token); ``progress``, if given, is called with the number of prompts finished after each batch.
    """
    import torch
    from transformers import DynamicCache

    eos = set(eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)  # never attended
    window = max((len(s) for s in stop), default=0) + 1  # a stop string of L characters spans at most L tokens
    device = next(model.parameters()).device
    # transformers renames the cache argument (`past_key_values` -> `cache`, the old name removed in 5.40): use the
    # name this model's forward takes (a PEFT model forwards keyword arguments to its base model unchanged)
    forward = getattr(model, "get_base_model", lambda: model)().forward
    parameters = inspect.signature(forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}  # the head on the last position only,
    # as generate does: on the prompt pass the full [rows, prompt, vocab] logits would be the largest tensor
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in rows], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in rows], device=device)
        # generate's position ids: the count of real tokens before each position (padding at 1, never attended)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        cache, active = DynamicCache(), list(rows)
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                               **{cache_name: cache}, **extra).logits[:, -1]
                chosen = logits.argmax(-1)
                keep = []
                for j, (row, token) in enumerate(zip(active, chosen.tolist())):
                    out = outputs[row]
                    out.append(token)
                    if token in eos or len(out) >= max_new_tokens:
                        continue
                    if stop and any(s in tokenizer.decode(out[-window:]) for s in stop):
                        continue
                    keep.append(j)
                if not keep:
                    break
                if len(keep) < len(active):
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, chosen, positions = mask[index], chosen[index], positions[index]
                    active = [active[j] for j in keep]
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
                positions = positions[:, -1:] + 1
                ids = chosen[:, None]
        if progress is not None:
            progress(len(rows))
    return outputs
