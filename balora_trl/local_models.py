"""Small causal LMs and tokenizers built offline, from configs and local text.

The main job's embedded default, the inheritance lab and the tests need a model and a tokenizer with no
download: a byte-level BPE tokenizer trained here with `tokenizers` (with a chat template), and a randomly
initialised Llama/Qwen2/GPT-2/Gemma-shaped model of any size. Nothing here is a stand-in for a real checkpoint:
the same trainer code runs on `AutoModelForCausalLM.from_pretrained("meta-llama/...")`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from .zero3_init import outside_zero3_init

EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, EOS, "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]

# A minimal role-tagged chat template; the assistant turn ends with <|end|> then EOS so the model learns to stop.
# `{% generation %}` marks what the model writes (reply, <|end|>, EOS; not the role tag): TRL's assistant_only_loss
# trains exactly those tokens of every assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|end|>' + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, model_max_length: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` (seconds for a few MB) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        padding_side="right",
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# Shapes per architecture family; hidden/layers/heads are overridable.
_FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "gemma": dict(model_type="gemma", tie_word_embeddings=True, head_dim=16),
    "gemma2": dict(model_type="gemma2", tie_word_embeddings=True, head_dim=16, final_logit_softcapping=30.0),
    "gpt2": dict(model_type="gpt2", tie_word_embeddings=True),
}


def causal_lm_config(
    family: str,
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 1024,
    **overrides,
):
    """A transformers config for a small ``family`` model ('llama', 'qwen2', 'gemma', 'gemma2', 'gpt2')."""
    if family not in _FAMILIES:
        raise ValueError(f"Unknown model family {family!r}; choose one of {sorted(_FAMILIES)}.")
    spec = dict(_FAMILIES[family])
    model_type = spec.pop("model_type")
    if model_type == "gpt2":
        kwargs = dict(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    else:
        kwargs = dict(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 4,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
            max_position_embeddings=max_positions,
        )
    kwargs.update(spec)
    kwargs.update(overrides)
    return AutoConfig.for_model(model_type, **kwargs)


def build_causal_lm(
    family: str,
    tokenizer: PreTrainedTokenizerFast,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    **overrides,
) -> PreTrainedModel:
    """A randomly initialised (seeded) causal LM sized to ``tokenizer``, in float32, with its token ids set."""
    config = causal_lm_config(
        family, len(tokenizer), hidden_size, num_layers, num_heads,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, **overrides,
    )
    # A plain model on this process even under DeepSpeed ZeRO-3 (the embedded base is built by rank 0 alone).
    with torch.random.fork_rng(devices=[]), outside_zero3_init():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
