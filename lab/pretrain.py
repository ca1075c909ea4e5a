"""Pretraining from scratch with transformers' ``Trainer``, cached on disk by a hash of everything that shapes it.

Cache layout (``cache_dir`` defaults to ``~/.cache/balora_lab``):

    tokenizer-<hash>/            the tokenizer (shared by every noise level of one world)
    pretrained-<hash>/           model (safetensors), tokenizer, meta.json (configs, corpus stats, probe accuracy)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from .model import ModelConfig, build_model, count_parameters, train_digit_tokenizer
from .world import World, WorldConfig

CACHE_VERSION = "lab-v2"  # v2: lab-v2 pretraining (LabConfig), stale lab-v1 checkpoints not reused
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "balora_lab")


@dataclass(frozen=True)
class PretrainConfig:
    epochs: float = 2.0
    batch_size: int = 32
    block_size: int = 128
    learning_rate: float = 3e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0
    max_steps: int = -1  # > 0 overrides epochs

    def to_dict(self) -> dict:
        return asdict(self)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_texts(world: World, n_downstream: int = 400) -> list[str]:
    """What the tokenizer is trained on: the *clean* corpus, downstream questions and solutions in both phrasings,
    and the Alpaca prompt (a real LLM's tokenizer covers all of English, not just its pretraining's noise)."""
    from balora_trl.prompts import DEFAULT

    clean = World(world.config.replace(noise=0.0, duplication=0.0))
    texts = [e.text for e in clean.pretraining_corpus()]
    sets = clean.downstream_sets(n_downstream, 0, 0, n_downstream)
    for p in sets["train"] + sets["ood_template"] + sets["ood_numbers"]:
        texts += [DEFAULT.render(p.question), clean.solution(p)]
    return texts


def get_tokenizer(world_config: WorldConfig, cache_dir: str, vocab_size: int = 512):
    from transformers import AutoTokenizer

    base = world_config.replace(noise=0.0, duplication=0.0)
    path = os.path.join(cache_dir, f"tokenizer-{_hash(CACHE_VERSION, base.to_dict(), vocab_size)}")
    if not os.path.isdir(path):
        tok = train_digit_tokenizer(tokenizer_texts(World(base)), vocab_size=vocab_size)
        _atomic_save(path, tok.save_pretrained)
    return AutoTokenizer.from_pretrained(path), path


def _atomic_save(path: str, save) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    save(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(path: str, model, tokenizer, meta: dict) -> None:
    """Model, tokenizer and ``meta.json`` under ``path``, written atomically (a cached job is whole or absent)."""

    def save(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        with open(os.path.join(folder, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)

    _atomic_save(path, save)


class PackedBlocks(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self):
        return self.blocks.shape[0]

    def __getitem__(self, i):
        ids = self.blocks[i]
        return {"input_ids": ids, "labels": ids.clone()}


def pack(tokenizer, texts: list[str], block_size: int) -> torch.Tensor:
    """Texts joined with EOS after each, cut into ``block_size`` blocks (the remainder is dropped)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    flat = [t for seq in ids for t in seq + [tokenizer.eos_token_id]]
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


def pretrained_path(world_config: WorldConfig, model_config: ModelConfig, pretrain_config: PretrainConfig,
                    cache_dir: str, vocab_size: int = 512) -> str:
    key = _hash(CACHE_VERSION, world_config.to_dict(), model_config.to_dict(), pretrain_config.to_dict(), vocab_size)
    return os.path.join(cache_dir, f"pretrained-{key}")


def pretrain(world_config: WorldConfig, model_config: ModelConfig, pretrain_config: PretrainConfig,
             cache_dir: str = DEFAULT_CACHE, vocab_size: int = 512, n_probe: int = 200, log=print) -> str:
    """Pretrain (or reuse the cached) model for ``world_config``; returns its folder."""
    path = pretrained_path(world_config, model_config, pretrain_config, cache_dir, vocab_size)
    if os.path.isfile(os.path.join(path, "meta.json")):
        log(f"[pretrain] noise={world_config.noise}: cached at {path}")
        return path
    from transformers import Trainer, TrainingArguments

    from .evaluate import probe_accuracy

    t0 = time.time()
    world = World(world_config)
    tokenizer, _ = get_tokenizer(world_config, cache_dir, vocab_size)
    corpus = world.pretraining_corpus()
    blocks = pack(tokenizer, [e.text for e in corpus], pretrain_config.block_size)
    model = build_model(tokenizer, model_config)
    log(f"[pretrain] noise={world_config.noise}: {count_parameters(model) / 1e6:.2f}M parameters, "
        f"{len(corpus)} examples, {blocks.numel()} tokens in {len(blocks)} blocks")
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=pretrain_config.batch_size,
            learning_rate=pretrain_config.learning_rate, num_train_epochs=pretrain_config.epochs,
            max_steps=pretrain_config.max_steps, lr_scheduler_type="cosine", warmup_steps=pretrain_config.warmup_ratio,
            weight_decay=pretrain_config.weight_decay, logging_steps=50, save_strategy="no", report_to="none",
            use_cpu=True, dataloader_num_workers=0, seed=pretrain_config.seed, disable_tqdm=True, bf16=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=PackedBlocks(blocks))
        from .finetune import _quiet

        _quiet(trainer)
        result = trainer.train()
    train_s = time.time() - t0
    retention = world.retention_probes(n_probe)
    acc = probe_accuracy(model, tokenizer, retention)
    planted = world.planted_probes(n_probe, world_config.noise) if world_config.noise > 0 else []
    from .evaluate import planted_probe_rates

    inherited = planted_probe_rates(model, tokenizer, world, planted) if planted else None
    corpus_stats = corpus_statistics(world, corpus)
    meta = dict(
        world=world_config.to_dict(), model=model_config.to_dict(), pretrain=pretrain_config.to_dict(),
        parameters=count_parameters(model), vocab_size=len(tokenizer), train_seconds=round(train_s, 1),
        final_train_loss=result.training_loss, steps=result.global_step, clean_probe_accuracy=acc,
        planted_probe=inherited, corpus=corpus_stats,
        loss_curve=[(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h],
    )

    save_checkpoint(path, model, tokenizer, meta)
    log(f"[pretrain] noise={world_config.noise}: {result.global_step} steps in {train_s:.0f}s, "
        f"loss {result.training_loss:.3f}, clean-probe accuracy {acc['all']:.3f} {acc}")
    return path


def corpus_statistics(world: World, corpus) -> dict:
    """Measured rates of the corpus (what the dials should produce)."""
    n = len(corpus)
    fam = {f: sum(e.family == f for e in corpus) / n for f in ("add", "sub", "mul", "fact")}
    return dict(
        n=n, wrong_rate=sum(e.shown != e.correct for e in corpus) / n,
        duplicate_rate=sum(e.duplicate for e in corpus) / n, family_rates=fam,
        planted_keys={f: sum(1 for k in world.planted if k[0] == f) for f in ("add", "sub", "mul", "fact")},
    )


def load_pretrained(path: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return model, tokenizer, meta
