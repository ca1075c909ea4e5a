"""Downstream fine-tuning arms: Full FT, LoRA, PiSSA, BA-LoRA and BA-LoRA with a single regulariser (Figure 2).

Every arm goes through TRL: ``trl.SFTTrainer`` for Full FT / LoRA / PiSSA, ``balora_trl.BALoraSFTTrainer`` for the
BA-LoRA arms (PiSSA initialisation + the paper's regularisers; a single-term arm sets the other two λ to 0). Same
data, steps, batch, schedule and seed for all; only the method and its learning rate differ. The same seed gives
the same data order and (for LoRA) the same adapter initialisation across arms.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

# Paper section 4.2, NLG: λ1 = 1e-4, λ2 = 3e-4, λ3 = 1e-4.
PAPER_LAMBDAS = (1e-4, 3e-4, 1e-4)


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    peft_init: bool | str | None  # None: full fine-tuning
    lambdas: tuple[float, float, float] | None = None  # None: plain SFTTrainer

    @property
    def is_balora(self) -> bool:
        return self.lambdas is not None


METHODS = {
    m.name: m
    for m in (
        Method("full_ft", "Full FT", None),
        Method("lora", "LoRA", True),
        Method("pissa", "PiSSA", "pissa"),
        Method("ba_lora", "BA-LoRA", "pissa", PAPER_LAMBDAS),
        Method("ba_lora_cr", "BA-LoRA (CR only)", "pissa", (PAPER_LAMBDAS[0], 0.0, 0.0)),
        Method("ba_lora_dr", "BA-LoRA (DR only)", "pissa", (0.0, PAPER_LAMBDAS[1], 0.0)),
        Method("ba_lora_svdr", "BA-LoRA (SVDR only)", "pissa", (0.0, 0.0, PAPER_LAMBDAS[2])),
    )
}

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The downstream answer format ("The answer is: N", the prompt's words) uses tokens that pretraining never predicts;
# with a frozen output head a low-rank arm can hardly raise their logits (Full FT can), so every adapter arm also
# trains the output head in full (PEFT ``modules_to_save``; TRL refuses a LoRA adapter on lm_head).
MODULES_TO_SAVE = ["lm_head"]


@dataclass(frozen=True)
class FinetuneConfig:
    max_steps: int = 150
    batch_size: int = 16
    lora_r: int = 8
    lora_alpha: int = 16
    warmup_ratio: float = 0.03
    max_length: int = 256
    logging_steps: int = 10
    svd_top_k: int = 10
    lambda_scale: float = 1.0  # multiplies every BA-LoRA λ (1 = the paper's values)
    target_modules: tuple[str, ...] = tuple(TARGET_MODULES)
    modules_to_save: tuple[str, ...] = tuple(MODULES_TO_SAVE)

    def to_dict(self) -> dict:
        return asdict(self)


def sft_rows(world, problems) -> list[dict]:
    """MetaMathQA-format prompt/completion rows, prompted with the project's default (Alpaca) template."""
    from balora_trl.prompts import DEFAULT

    return [{"prompt": DEFAULT.render(p.question), "completion": " " + world.solution(p)} for p in problems]


def finetune(model, tokenizer, train_rows: list[dict], method: Method, lr: float, seed: int, cfg: FinetuneConfig,
             output_dir: str):
    """Train ``model`` in place (PEFT wraps it); returns (trained model with adapters merged, log history, seconds)."""
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    common = dict(
        per_device_train_batch_size=cfg.batch_size, max_steps=cfg.max_steps, learning_rate=lr,
        lr_scheduler_type="linear", warmup_steps=cfg.warmup_ratio, weight_decay=0.0, logging_steps=cfg.logging_steps,
        seed=seed, data_seed=seed, bf16=False, fp16=False, gradient_checkpointing=False, report_to="none",
        use_cpu=True, dataloader_num_workers=0, save_strategy="no", max_length=cfg.max_length, disable_tqdm=True,
    )
    peft_config = None
    if method.peft_init is not None:
        peft_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(cfg.target_modules),
            modules_to_save=list(cfg.modules_to_save) or None,
            init_lora_weights=method.peft_init, task_type="CAUSAL_LM",
        )
    dataset = Dataset.from_list(train_rows)
    set_seed(seed)  # LoRA's A is drawn when the trainer wraps the model: same seed, same draw across arms
    if method.is_balora:
        from balora_trl import BALoraConfig, BALoraSFTTrainer

        l1, l2, l3 = (x * cfg.lambda_scale for x in method.lambdas)
        args = BALoraConfig(output_dir, lambda_consistency=l1, lambda_diversity=l2, lambda_svd=l3,
                            svd_top_k=cfg.svd_top_k, **common)
        trainer_cls = BALoraSFTTrainer
    else:
        args = SFTConfig(output_dir, **common)
        trainer_cls = SFTTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=peft_config)
    _quiet(trainer)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    trained = trainer.model
    if isinstance(trained, PeftModel):
        for name in list(trained.peft_config):  # e.g. BA-LoRA's frozen copy of the initial adapter
            if name != trained.active_adapter:
                trained.delete_adapter(name)
        trained = trained.merge_and_unload()
    trained.eval()
    history = list(trainer.state.log_history)
    del trainer
    return trained, history, seconds


def _quiet(trainer) -> None:
    """No per-log dict printed to stdout (the lab prints its own one-line progress)."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def curves(history: list[dict]) -> dict:
    """Per-logging-step training curves: loss and the ba_lora/* terms where logged."""
    keys = ["loss", "ba_lora/sft_loss", "ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio"]
    out: dict[str, list] = {"step": []}
    rows = [h for h in history if "loss" in h and "step" in h]
    for h in rows:
        out["step"].append(h["step"])
        for k in keys:
            out.setdefault(k, []).append(h.get(k))
    return {k: v for k, v in out.items() if any(x is not None for x in v)}


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

