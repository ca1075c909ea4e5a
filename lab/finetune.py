"""Downstream fine-tuning arms: Full FT, LoRA, PiSSA, BA-LoRA and BA-LoRA with a single regulariser (Figure 2),
and the frontier sweep's arms (issue 19: λ grids, the release's settings, KL budgets, label-consistent anchoring).

Every arm goes through TRL: ``trl.SFTTrainer`` for Full FT / LoRA / PiSSA, ``balora_trl.BALoraSFTTrainer`` for the
BA-LoRA arms (PiSSA initialisation + the paper's regularisers; a single-term arm sets the other two λ to 0). Same
data, steps, batch, schedule and seed for all; only the method and its learning rate differ. The same seed gives
the same data order and (for LoRA) the same adapter initialisation across arms.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

# Paper section 4.2, NLG: λ1 = 1e-4, λ2 = 3e-4, λ3 = 1e-4.
PAPER_LAMBDAS = (1e-4, 3e-4, 1e-4)
# The authors' release script: λ1 = 0.025, λ2 = λ3 = 0.005, so λ2 = λ3 = 0.2 · λ1 (the ratio the λ grid keeps).
RELEASE_LAMBDAS = (0.025, 0.005, 0.005)
RELEASE_RATIO = RELEASE_LAMBDAS[1] / RELEASE_LAMBDAS[0]
# The release's schedules and options (balora_trl.config.BALoraConfig; issue 16): λ1 cosine to 0.1·λ1, λ2 and λ3
# off for the first 20 % of the steps then ramped over 5 %, entropy over the 20 largest logits, the SVD ratio over
# the Frobenius norm, the KL at T = 2 scaled by T².
RELEASE_OPTIONS = dict(
    lambda_consistency_schedule="cosine",  # λ1_end: BALoraConfig's default 0.1 · λ1 (the release's)
    lambda_focus_schedule="two_phase", focus_warmup_ratio=0.2, focus_ramp_ratio=0.05, entropy_top_k=20,
    svd_normalizer="frobenius", kl_temperature=2.0, kl_t2_scaling=True,
)
# The frontier's λ1 grid (issue 19); BA-LoRA and label-consistent arms set λ2 = λ3 = RELEASE_RATIO · λ1, CR-only 0.
FRONTIER_LAMBDA1 = (1e-3, 1e-2, 1e-1, 1.0)
# KL budgets, as fractions of PiSSA's KL to the pretrained model on the validation problems (the learning-rate
# sweep's PiSSA run at its chosen rate): the controller's target (nats per response token) is fixed from
# validation data before any budget arm runs.
FRONTIER_KL_FRACTIONS = (0.25, 0.5, 0.75)
KL_BUDGET_START = 0.1  # λ1 the controller starts from (its bounds: 0.01 · that and 10, BALoraConfig's defaults)


@dataclass(frozen=True)
class Method:
    """One arm, as data. ``lambdas`` = (λ1, λ2, λ3) makes it a BA-LoRA arm (``BALoraSFTTrainer``); ``balora``
    holds any further ``BALoraConfig`` fields as sorted (name, value) pairs (schedules, temperature, anchoring, KL
    budget...). ``kl_fraction`` (KL-budget arms): ``kl_target`` is set at run time to this fraction of PiSSA's
    validation KL (:func:`resolve_kl_target`)."""

    name: str
    label: str
    peft_init: bool | str | None  # None: full fine-tuning
    lambdas: tuple[float, float, float] | None = None  # None: plain SFTTrainer
    balora: tuple[tuple[str, object], ...] = ()
    kl_fraction: float | None = None
    family: str = ""  # frontier family ("ba_lora", "cr", "lc"): the arms one pre-registered choice is made among

    @property
    def is_balora(self) -> bool:
        return self.lambdas is not None

    @property
    def balora_kwargs(self) -> dict:
        return dict(self.balora)

    @property
    def consistency_positions(self) -> str:
        """The positions the KL anchors (BALoraConfig.consistency_positions; "all" is the paper's term)."""
        return self.balora_kwargs.get("consistency_positions", "all")

    def to_dict(self) -> dict:
        """Everything that shapes a run of this arm (part of a job's cache key)."""
        return {"peft_init": self.peft_init, "lambdas": None if self.lambdas is None else list(self.lambdas),
                "balora": {k: v for k, v in self.balora}, "kl_fraction": self.kl_fraction}


def arm(name: str, label: str, lambdas=None, family: str = "", kl_fraction: float | None = None, **balora) -> Method:
    """A PiSSA-initialised arm (BA-LoRA when ``lambdas`` is given) with extra ``BALoraConfig`` fields."""
    return Method(name, label, "pissa", None if lambdas is None else tuple(float(x) for x in lambdas),
                  tuple(sorted(balora.items())), kl_fraction, family)


def _scaled(l1: float) -> tuple[float, float, float]:
    return (l1, round(RELEASE_RATIO * l1, 12), round(RELEASE_RATIO * l1, 12))


def _frontier_arms() -> list[Method]:
    arms = []
    for l1 in FRONTIER_LAMBDA1:
        arms.append(arm(f"ba_l{l1:g}", f"BA-LoRA λ1={l1:g}", _scaled(l1), "ba_lora"))
    for l1 in FRONTIER_LAMBDA1:
        arms.append(arm(f"cr_l{l1:g}", f"CR only λ1={l1:g}", (l1, 0.0, 0.0), "cr"))
    for l1 in FRONTIER_LAMBDA1:
        arms.append(arm(f"lc_l{l1:g}", f"label-consistent λ1={l1:g}", _scaled(l1), "lc",
                        consistency_positions="label_consistent"))
    arms.append(arm("ba_release", "BA-LoRA, release settings", RELEASE_LAMBDAS, "ba_lora", **RELEASE_OPTIONS))
    for frac in FRONTIER_KL_FRACTIONS:
        # The budget is about the KL alone: λ2 = λ3 = 0, so the controller is the only thing that differs from CR.
        arms.append(arm(f"kl_budget{frac:g}", f"KL budget {frac:.0%} of PiSSA", (KL_BUDGET_START, 0.0, 0.0),
                        "ba_lora", kl_fraction=frac))
    return arms


PAPER_ARMS = ("full_ft", "lora", "pissa", "ba_lora", "ba_lora_cr", "ba_lora_dr", "ba_lora_svdr")
METHODS = {
    m.name: m
    for m in (
        Method("full_ft", "Full FT", None),
        Method("lora", "LoRA", True),
        arm("pissa", "PiSSA"),
        arm("ba_lora", "BA-LoRA", PAPER_LAMBDAS, "ba_lora"),
        arm("ba_lora_cr", "BA-LoRA (CR only)", (PAPER_LAMBDAS[0], 0.0, 0.0)),
        arm("ba_lora_dr", "BA-LoRA (DR only)", (0.0, PAPER_LAMBDAS[1], 0.0)),
        arm("ba_lora_svdr", "BA-LoRA (SVDR only)", (0.0, 0.0, PAPER_LAMBDAS[2])),
        # Our extension, not the paper's: the KL only where the pretrained top-1 token is the label.
        arm("ba_lora_lc", "BA-LoRA (label-consistent KL)", PAPER_LAMBDAS, consistency_positions="label_consistent"),
        *_frontier_arms(),
    )
}
# The frontier sweep (issue 19; README "Pre-registration (lab v4)"), shrunk to the 90-minute budget from measured
# per-run times: PiSSA; BA-LoRA at the paper's λ, over the whole λ1 grid, with the release's settings and at two KL
# budgets; CR only at λ1 = 1e-2 and label-consistent at 1e-2 and 1e-1 (paired with BA-LoRA at the same λ1); LoRA and
# Full FT as context. Every arm defined above can still be run with --methods.
FRONTIER_ARMS = ("pissa", "ba_lora", *(f"ba_l{l1:g}" for l1 in FRONTIER_LAMBDA1), "ba_release", "kl_budget0.25",
                 "kl_budget0.5", "cr_l0.01", "lc_l0.01", "lc_l0.1", "lora", "full_ft")
FRONTIER_CONTEXT = ("lora", "full_ft")  # run on fewer seeds (context, not tested)
FRONTIER_CONTROL = ("pissa", "ba_l0.01", "ba_l0.1")  # the noise-0 control's arms


def resolve_kl_target(method: Method, pissa_val_kl: float) -> Method:
    """A KL-budget arm with its ``kl_target`` fixed: ``kl_fraction`` × PiSSA's validation KL (nats per response
    token, the unit of both the controller's measurement and ``lab.evaluate.response_kl_and_entropy``)."""
    if method.kl_fraction is None:
        return method
    if not pissa_val_kl > 0:
        raise ValueError(f"{method.name}: PiSSA's validation KL must be > 0 to set a KL budget, got {pissa_val_kl!r}")
    kwargs = dict(method.balora, kl_target=round(method.kl_fraction * pissa_val_kl, 4))
    return replace(method, balora=tuple(sorted(kwargs.items())))


def method_from_dict(name: str, d: dict) -> Method:
    """The arm a job spec describes (``Method.to_dict`` plus the name), as the worker rebuilds it."""
    base = METHODS[name]
    return replace(base, peft_init=d["peft_init"], lambdas=None if d["lambdas"] is None else tuple(d["lambdas"]),
                   balora=tuple(sorted(d["balora"].items())), kl_fraction=d["kl_fraction"])


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
        if method.kl_fraction is not None and "kl_target" not in method.balora_kwargs:
            raise ValueError(f"{method.name}: a KL-budget arm needs its kl_target resolved (resolve_kl_target)")
        args = BALoraConfig(output_dir, lambda_consistency=l1, lambda_diversity=l2, lambda_svd=l3,
                            svd_top_k=cfg.svd_top_k, **method.balora_kwargs, **common)
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
    keys = ["loss", "ba_lora/sft_loss", "ba_lora/kl", "ba_lora/entropy", "ba_lora/svd_ratio",
            "ba_lora/anchored_fraction", "ba_lora/lambda_consistency", "ba_lora/lambda_diversity", "ba_lora/lambda_svd"]
    out: dict[str, list] = {"step": []}
    rows = [h for h in history if "loss" in h and "step" in h]
    for h in rows:
        out["step"].append(h["step"])
        for k in keys:
            out.setdefault(k, []).append(h.get(k))
    return {k: v for k, v in out.items() if any(x is not None for x in v)}


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

