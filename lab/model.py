"""Tokenizer and model for the lab: a byte-level BPE tokenizer that splits every digit, and a small Llama.

Digits are single tokens (as in Llama's and Qwen's tokenizers), which is what lets a ~1M-parameter model learn
2-digit arithmetic; words become whole tokens, which keeps the Alpaca-style prompt short.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from balora_trl.local_models import EOS, PAD, SPECIAL_TOKENS, build_causal_lm


def train_digit_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE with individual digits, trained on ``texts``, wrapped for transformers (EOS / PAD set)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, pad_token=PAD, model_max_length=512, padding_side="right"
    )


@dataclass(frozen=True)
class ModelConfig:
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_positions: int = 256
    init_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(tokenizer: PreTrainedTokenizerFast, config: ModelConfig) -> PreTrainedModel:
    """A randomly initialised Llama-shaped causal LM (float32), via ``balora_trl.local_models``."""
    return build_causal_lm(
        "llama", tokenizer, hidden_size=config.hidden_size, num_layers=config.num_layers,
        num_heads=config.num_heads, seed=config.init_seed, intermediate_size=config.intermediate_size,
        max_positions=config.max_positions,
    )


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
             do_sample: bool = False, temperature: float = 1.0, seed: int = 0) -> list[str]:
    """Continuations of ``prompts`` (left-padded batches; decoding stops at EOS). Greedy unless ``do_sample``."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True)
            kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else dict(
                do_sample=False)
            ids = model.generate(
                **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id, **kwargs,
            )
            new = ids[:, batch["input_ids"].shape[1]:]
            out += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        torch.random.set_rng_state(generator_state)
    return out
