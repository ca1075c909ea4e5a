"""The inheritance lab, end to end: pretrain per noise level → learning-rate sweep → seeds × methods → report.

    python benchmarks/inheritance_lab.py            # default run (< 1 h on 2 CPU cores, 2 workers)
    python benchmarks/inheritance_lab.py --quick    # smoke test (< 5 min)
    python benchmarks/inheritance_lab.py --sweep frontier   # the pre-registered frontier (README, lab v4)

Stages:

1. Tokenizer (shared) and one pretrained model per noise level, cached under ``--cache_dir``; then (lab v4) the
   shared format warm-up of each (``WarmupConfig``), cached beside it: every arm starts from and anchors to it.
2. Learning-rate sweep: every method × every learning rate of its grid at ``sweep_noise``, seed ``seeds[0]``;
   the learning rate with the lowest *validation* loss (ties: the smaller rate) is kept for that method at every
   noise level (``lr_tie``: an arm takes another's rate instead). The sweep run at the kept rate is that (method,
   noise, seed) cell's final run: test sets are never used for the choice. KL-budget arms get their target from
   PiSSA's validation KL here.
3. Every method × noise level × seed at its kept rate, plus the start model itself per noise level.
4. ``results.json``, ``results.md`` and the plots in ``--out_dir``.

Each run's result is written to ``<cache_dir>/jobs/`` as soon as it finishes, keyed by a hash of its full
specification: an interrupted run resumes where it stopped and a finished one is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace

from .finetune import (FRONTIER_ARMS, FRONTIER_CONTEXT, FRONTIER_CONTROL, METHODS, PAPER_ARMS, FinetuneConfig,
                       method_from_dict, resolve_kl_target)
from .model import ModelConfig
from .pretrain import DEFAULT_CACHE, PretrainConfig
from .world import WorldConfig

# Format warm-up (lab v4; WarmupConfig): 500 steps at 3e-3, chosen on PiSSA's per-seed validation and test accuracy at
# noise 0.3, seeds 0-4 (README "Format warm-up: per-seed accuracy"): none 14.8 ± 3.9 %, 200 steps at 1e-3
# 37.1 ± 7.6 %, 500 steps at 3e-3 88.8 ± 3.6 %.
WARMUP_STEPS = 500
LAB_VERSION = "lab-v2"  # pretraining jobs; v2: ~3600 pretraining steps instead of ~900 (clean probes ~35 % -> ~98 %)
# v5: shared format warm-up, arms as data (lab v4 protocol); v4: held-out planted keys; v3: lab-v2 models;
# v2: one-step problems, lr on val loss
DOWNSTREAM_VERSION = "downstream-v5"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "inheritance_lab")  # small files only: md, json, png
FRONTIER_OUT = os.path.join(DEFAULT_OUT, "frontier_v4")  # the pre-registered sweep; v3's files stay as they are
QUICK_OUT = os.path.join(tempfile.gettempdir(), "balora_lab_quick")


@dataclass(frozen=True)
class EvalConfig:
    n_train: int = 2000
    n_val: int = 200  # validation loss (the learning-rate criterion) on all of it; accuracy on the first n_val_acc
    n_val_acc: int = 100
    n_test: int = 150
    n_ood: int = 100
    n_retention: int = 120
    n_planted_probes: int = 80
    n_inherit: int = 80
    n_div_prompts: int = 20
    n_div_samples: int = 4
    n_kl: int = 50
    max_new_tokens: int = 48  # the longest reference solution (two steps) is ~25 tokens
    batch_size: int = 100
    # downstream design: the share of two-step problems (the rest are one-step); see World.sample_problem
    two_step_share: float = 0.25
    # the share of the largest noise level's planted keys that no downstream problem uses (World.held_out_keys):
    # inheritance is measured on those ("unseen") apart from planted keys the fine-tuning data corrects ("seen")
    held_out_share: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WarmupConfig:
    """The format warm-up every arm shares (lab v4): ``steps`` optimizer steps of full fine-tuning (TRL's
    ``SFTTrainer``, batch ``batch_size``, linear schedule) of each pretrained model on ``n_problems`` downstream-format
    problems that touch no planted key and are disjoint from every train / val / test / OOD problem
    (``World.format_warmup_problems``). The warmed model is every arm's starting point *and* its "pretrained"
    reference (BA-LoRA's KL, the KL-to-pretrained metric, the "start model" row), like a real base model that already
    writes "The answer is: N". 0 steps: no warm-up (the v3 protocol)."""

    steps: int = 0
    learning_rate: float = 3e-3  # 1e-3 (Full FT's v3 choice) left the warmed model at 10 % validation accuracy
    batch_size: int = 16
    n_problems: int = 2000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LabConfig:
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    # Subsets instead of every arm × level × seed (the frontier's budget): per noise level, the arms it runs
    # (noise_methods) and their seeds (noise_seeds); per arm, its seeds at every level (method_seeds, e.g. context arms)
    noise_methods: dict = field(default_factory=dict)
    noise_seeds: dict = field(default_factory=dict)
    method_seeds: dict = field(default_factory=dict)
    # The paper's arms; the extensions (ba_lora_lc, the frontier's arms) run when asked for (--methods, --sweep).
    methods: tuple[str, ...] = PAPER_ARMS
    lr_grid: dict = field(default_factory=lambda: {
        # Each grid is centred on that method's lab-v1 choice: Full FT and LoRA chose their grid's middle (1e-3,
        # 1e-2); PiSSA and every BA-LoRA arm chose the bottom edge (3e-3 of 3e-3 / 1e-2 / 3e-2; a PiSSA adapter starts
        # on the principal singular directions, so the same rate moves the weights more), so their grid goes lower.
        "full_ft": [3e-4, 1e-3, 3e-3],
        "lora": [3e-3, 1e-2, 3e-2],
        **{m: [1e-3, 3e-3, 1e-2] for m, spec in METHODS.items() if spec.peft_init == "pissa"},
    })
    # arm -> the arm whose chosen learning rate it uses instead of a sweep of its own (the frontier ties every
    # PiSSA-family arm to PiSSA's rate: in v3 PiSSA and all six BA-LoRA arms chose the same rate)
    lr_tie: dict = field(default_factory=dict)
    sweep_noise: float = 0.1
    # Sized so that the whole default run fits in 60 minutes on 2 CPU cores (--workers 2, 1 thread each).
    # Operands up to 20 (and 12 for ×): a key space small enough that a 0.4M-parameter model memorises it, planted
    # errors included, in the ~3600 steps (~7 min) one core affords. Downstream in-distribution operands stay <= 10,
    # out-of-distribution numbers go up to 20. Downstream problems are mostly one step (EvalConfig.two_step_share
    # of two-step ones) with bare-equation solutions: the 2-3-step design of lab-v1 was not learned at all in 160
    # steps (every arm ~ the pretrained model), so it could not tell methods apart.
    world: WorldConfig = WorldConfig(n_pretrain=30_000, max_operand=20, id_max_operand=10)
    model: ModelConfig = ModelConfig(hidden_size=96, num_layers=3, intermediate_size=256)
    # Steps, not parameters, were what the lab-v1 models lacked: this 0.40M model learns the key space in a sudden
    # transition whose timing varies with the corpus (3 epochs = ~900 steps left clean probes at 26-45 %, × at ~8 %;
    # at 8 epochs = ~2400 steps the 10 %-noise corpus's model reached 99 % but the 0 % and 30 % ones 83 %, × 46-60 %),
    # while a 0.92M model (hidden 128, 4 layers) at the same wall time gets half the steps and stays below 40 %.
    # 12 epochs (~3600 steps, ~7 min on one core) take every noise level past the transition, so the levels differ
    # in their planted errors, not in how far pretraining got.
    pretrain: PretrainConfig = PretrainConfig(epochs=12.0, batch_size=16, learning_rate=5e-3)
    # 320 steps (2.6 epochs of the 2000 problems): at 160 the arms still miscopy the question's numbers (LoRA 14 %,
    # PiSSA 7 % test accuracy on the lab-v2 model at noise 0.1); at 320 LoRA reaches 61 %, PiSSA 42 %.
    finetune: FinetuneConfig = FinetuneConfig(max_steps=320)
    eval: EvalConfig = EvalConfig()
    # lab v4: a shared format warm-up so that every arm learns the answer format (v3: two accuracy modes)
    warmup: WarmupConfig = WarmupConfig(steps=WARMUP_STEPS)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def cell_seeds(self, method: str, noise: float) -> tuple[int, ...]:
        """The seeds of one (arm, noise level) cell: the arm's own, else the level's, else ``seeds``."""
        return tuple(self.method_seeds.get(method) or self.noise_seeds.get(noise) or self.seeds)


def frontier_config() -> LabConfig:
    """The frontier sweep (issue 19, pre-registered in README "Pre-registration (lab v4)"): the frontier's arms at
    noise 0.3 (primary) on fine-tuning seeds 0-9 (10-19 are kept for an independent check), LoRA and Full FT
    (context) on seeds 0-4; the noise-0 control runs PiSSA, BA-LoRA λ1 = 1e-2 and 1e-1 on seeds 0-4. Learning
    rates: PiSSA, LoRA and Full FT each from their grid on validation loss at noise 0.3, seed 0; every other
    PiSSA-family arm uses PiSSA's rate."""
    tied = {m: "pissa" for m in FRONTIER_ARMS if METHODS[m].peft_init == "pissa" and m != "pissa"}
    return replace(LabConfig(), methods=FRONTIER_ARMS, noise_levels=(0.0, 0.3), seeds=tuple(range(10)),
                   sweep_noise=0.3, lr_tie=tied, noise_methods={0.0: FRONTIER_CONTROL},
                   noise_seeds={0.0: tuple(range(5))}, method_seeds={m: tuple(range(5)) for m in FRONTIER_CONTEXT})


def quick_frontier_config() -> LabConfig:
    """Smoke test of the frontier's machinery (release options, KL budget resolved from PiSSA's validation KL,
    learning-rate ties): the quick world, three arms, one noise level, two seeds."""
    arms = ("pissa", "ba_release", "kl_budget0.5")
    return replace(quick_config(), methods=arms, noise_levels=(0.3,), lr_tie={m: "pissa" for m in arms[1:]})


def quick_config() -> LabConfig:
    """A smoke test of every stage: tiny model and data, 2 noise levels, 2 seeds, a 2-point sweep."""
    grid2 = [3e-3, 1e-2]
    return LabConfig(
        noise_levels=(0.0, 0.3), seeds=(0, 1), sweep_noise=0.3,
        lr_grid={m: ([1e-3, 3e-3] if m == "full_ft" else grid2) for m in METHODS},
        world=WorldConfig(n_pretrain=6000),
        model=ModelConfig(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=192),
        pretrain=PretrainConfig(epochs=1.0, batch_size=32, learning_rate=3e-3),
        finetune=FinetuneConfig(max_steps=12, batch_size=8, logging_steps=4),
        warmup=WarmupConfig(steps=6, batch_size=8, n_problems=64),
        eval=EvalConfig(n_train=200, n_val=16, n_test=24, n_ood=16, n_retention=24, n_planted_probes=16, n_inherit=16,
                        n_div_prompts=6, n_div_samples=2, n_kl=16, max_new_tokens=48, batch_size=32),
    )


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _spec_hash(spec: dict) -> str:
    core = {k: v for k, v in spec.items() if k not in ("purpose", "threads")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------------
# worker side
# ----------------------------------------------------------------------------------------------------------------

_WORLD_CACHE: dict = {}


def _init_worker(threads: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import torch
    import transformers

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _world_and_sets(world_dict: dict, ev: dict, control: float):
    """The world (at the job's noise level) and its downstream / probe sets (cached per worker process). The sets
    avoid the held-out planted keys of the largest noise level ``control``, so they are the same at every level."""
    from .world import World

    key = json.dumps([world_dict, ev, control], sort_keys=True)
    if key not in _WORLD_CACHE:
        world = World(WorldConfig(**world_dict))
        avoid = world.held_out_keys(control, ev["held_out_share"]) if control > 0 else set()
        sets = world.downstream_sets(ev["n_train"], ev["n_val"], ev["n_test"], ev["n_ood"], ev["two_step_share"],
                                     avoid=avoid)
        sets["held_out_keys"] = avoid
        _WORLD_CACHE.clear()
        _WORLD_CACHE[key] = (world, sets)
    return _WORLD_CACHE[key]


def run_pretrain_job(spec: dict) -> dict:
    from .pretrain import pretrain

    _init_worker(spec["threads"])
    t0, c0 = time.time(), time.process_time()
    path = pretrain(WorldConfig(**spec["world"]), ModelConfig(**spec["model"]), PretrainConfig(**spec["pretrain"]),
                    cache_dir=spec["cache_dir"], log=_log)
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    return {"path": path, "meta": meta, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}


def warmup_path(spec: dict) -> str:
    return os.path.join(spec["cache_dir"], f"warmup-{_spec_hash(spec)}")


def run_warmup_job(spec: dict) -> dict:
    """The shared format warm-up of one pretrained model (``WarmupConfig``), saved like a pretrained checkpoint (so
    ``load_pretrained`` reads it) under ``<cache_dir>/warmup-<hash>``; reused when there."""
    from .finetune import finetune, sft_rows
    from .pretrain import load_pretrained, save_checkpoint

    _init_worker(spec["threads"])
    path = warmup_path(spec)
    if os.path.isfile(os.path.join(path, "meta.json")):
        with open(os.path.join(path, "meta.json")) as f:
            return {"path": path, "meta": json.load(f)["warmup"], "wall_s": 0.0, "cpu_s": 0.0}
    t0, c0 = time.time(), time.process_time()
    world, sets = _world_and_sets(spec["world"], spec["eval"], spec["control_noise"])
    wu = WarmupConfig(**spec["warmup"])
    taken = {p.question for part in ("train", "val", "test", "ood_template", "ood_numbers") for p in sets[part]}
    problems = world.format_warmup_problems(wu.n_problems, set(world.planted_at(spec["control_noise"])), taken,
                                            spec["eval"]["two_step_share"])
    model, tokenizer, meta = load_pretrained(spec["pretrained"])
    cfg = FinetuneConfig(**{**spec["finetune"], "max_steps": wu.steps, "batch_size": wu.batch_size})
    with tempfile.TemporaryDirectory() as tmp:
        model, history, train_s = finetune(model, tokenizer, sft_rows(world, problems), METHODS["full_ft"],
                                           wu.learning_rate, wu.seed, cfg, tmp)
    from . import evaluate as E

    val = sets["val"][: spec["eval"]["n_val_acc"]]
    _, preds = E.downstream_predictions(model, tokenizer, val, spec["eval"]["max_new_tokens"],
                                        spec["eval"]["batch_size"])
    info = dict(wu.to_dict(), train_s=train_s, val_loss=E.downstream_loss(model, tokenizer, world, sets["val"]),
                val_accuracy=E.downstream_accuracy(world, val, preds),
                final_loss=next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None))
    meta = dict(meta, warmup=info, warmed_from=spec["pretrained"])

    save_checkpoint(path, model, tokenizer, meta)
    return {"path": path, "meta": info, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}


def evaluate_model(model, reference, tokenizer, world, sets, spec: dict, purpose: str) -> dict:
    """Every measurement of one model. ``purpose == "sweep_only"`` measures validation loss and accuracy alone."""
    from . import evaluate as E

    ev, noise, control = spec["eval"], spec["noise"], spec["control_noise"]
    out: dict = {}
    out["val_loss"] = E.downstream_loss(model, tokenizer, world, sets["val"])
    val_acc = sets["val"][: ev["n_val_acc"]]
    _, preds = E.downstream_predictions(model, tokenizer, val_acc, ev["max_new_tokens"], ev["batch_size"])
    out["val_accuracy"] = E.downstream_accuracy(world, val_acc, preds)
    if reference is not None:  # the setting-choice rule's drift measure (validation problems only)
        out["val_kl_to_pretrained"] = E.response_kl_and_entropy(
            model, reference, tokenizer, world, sets["val"][: ev["n_kl"]])["kl_to_pretrained"]
    if purpose == "sweep_only":
        return out
    texts, preds = E.downstream_predictions(model, tokenizer, sets["test"], ev["max_new_tokens"], ev["batch_size"])
    out["accuracy"] = E.downstream_accuracy(world, sets["test"], preds)
    out["test_samples"] = [{"question": p.question, "output": t, "answer": world.answer(p)}
                           for p, t in list(zip(sets["test"], texts))[:3]]
    ood = {}
    for part in ("ood_template", "ood_numbers"):
        _, preds = E.downstream_predictions(model, tokenizer, sets[part], ev["max_new_tokens"], ev["batch_size"])
        ood[part] = E.downstream_accuracy(world, sets[part], preds)
    n_t, n_n = len(sets["ood_template"]), len(sets["ood_numbers"])
    out["ood_accuracy"] = (ood["ood_template"] * n_t + ood["ood_numbers"] * n_n) / max(1, n_t + n_n)
    out.update({f"{k}_accuracy": v for k, v in ood.items()})
    retention = world.retention_probes(ev["n_retention"])
    out["retention"] = E.probe_accuracy(model, tokenizer, retention)
    # Inheritance: keys planted at this noise level; at noise 0 the keys that the largest level plants (a
    # control: how often a model never shown those wrong answers produces them anyway).
    probe_noise = noise if noise > 0 else control
    if probe_noise > 0:
        planted = world.planted_probes(ev["n_planted_probes"], probe_noise)
        out["planted_probe"] = E.planted_probe_rates(model, tokenizer, world, planted)
        # "seen": planted keys the fine-tuning problems use (with their right answers); "unseen": the held-out ones
        exclude = {p.question for p in sets["train"]}
        planted_keys, held_out = set(world.planted_at(probe_noise)), sets["held_out_keys"]
        for name, keys in (("inheritance", planted_keys - held_out), ("inheritance_unseen", planted_keys & held_out)):
            problems = world.inheritance_problems(ev["n_inherit"], probe_noise, exclude, ev["two_step_share"], keys)
            _, preds = E.downstream_predictions(model, tokenizer, problems, ev["max_new_tokens"], ev["batch_size"])
            out[name] = E.inheritance_rates(world, problems, preds, probe_noise)
        out["inheritance_probe_noise"] = probe_noise
    prompts = [p for p in sets["test"][: ev["n_div_prompts"]] for _ in range(ev["n_div_samples"])]
    samples, _ = E.downstream_predictions(model, tokenizer, prompts, ev["max_new_tokens"], ev["batch_size"],
                                          do_sample=True, temperature=1.0, seed=spec["seed"])
    out["distinct_1"] = E.distinct_n(samples, 1)
    out["distinct_2"] = E.distinct_n(samples, 2)
    if reference is not None:
        out.update(E.response_kl_and_entropy(model, reference, tokenizer, world, sets["test"][: ev["n_kl"]]))
    return out


def run_finetune_job(spec: dict) -> dict:
    """One (method, noise, seed, learning rate) cell: fine-tune the cached pretrained model, then measure."""
    from .finetune import curves, finetune, sft_rows
    from .pretrain import load_pretrained

    _init_worker(spec["threads"])
    t0, c0 = time.time(), time.process_time()
    world, sets = _world_and_sets(spec["world"], spec["eval"], spec["control_noise"])
    model, tokenizer, _ = load_pretrained(spec["pretrained"])
    reference, _, _ = load_pretrained(spec["pretrained"])
    method = method_from_dict(spec["method"], spec["method_spec"])
    with tempfile.TemporaryDirectory() as tmp:
        model, history, train_s = finetune(
            model, tokenizer, sft_rows(world, sets["train"]), method, spec["lr"], spec["seed"],
            FinetuneConfig(**spec["finetune"]), tmp,
        )
    train_cpu = time.process_time() - c0
    metrics = evaluate_model(model, reference, tokenizer, world, sets, spec, spec.get("evaluate", "full"))
    return {
        "spec": spec, "metrics": metrics, "curves": curves(history), "train_s": train_s, "train_cpu_s": train_cpu,
        "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
        "final_loss": next((h["train_loss"] for h in reversed(history) if "train_loss" in h), None),
    }


def run_pretrained_eval_job(spec: dict) -> dict:
    """The pretrained model itself (no fine-tuning), measured like every arm."""
    from .pretrain import load_pretrained

    _init_worker(spec["threads"])
    t0, c0 = time.time(), time.process_time()
    world, sets = _world_and_sets(spec["world"], spec["eval"], spec["control_noise"])
    model, tokenizer, _ = load_pretrained(spec["pretrained"])
    metrics = evaluate_model(model, None, tokenizer, world, sets, spec, "full")
    metrics["kl_to_pretrained"] = 0.0
    return {"spec": spec, "metrics": metrics, "curves": {}, "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - c0}


# ----------------------------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------------------------


class Runner:
    """Runs job specs in ``workers`` processes (or in-process for 1), caching each result as JSON."""

    def __init__(self, jobs_dir: str, workers: int, threads: int):
        self.jobs_dir = jobs_dir
        os.makedirs(self.jobs_dir, exist_ok=True)
        self.workers, self.threads = workers, threads
        self.pool = None
        if workers > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                            initializer=_init_worker, initargs=(threads,))
        else:
            _init_worker(threads)

    def _path(self, fn, spec) -> str:
        name = spec.get("name", fn.__name__)
        return os.path.join(self.jobs_dir, f"{name}-{_spec_hash(spec)}.json")

    def map(self, fn, specs: list[dict], label: str) -> list[dict]:
        results: list[dict | None] = [None] * len(specs)
        todo = []
        for i, spec in enumerate(specs):
            spec = dict(spec, threads=self.threads)
            specs[i] = spec
            path = self._path(fn, spec)
            if os.path.isfile(path):
                with open(path) as f:
                    results[i] = json.load(f)
            else:
                todo.append(i)
        if len(todo) < len(specs):
            _log(f"{label}: {len(specs) - len(todo)} of {len(specs)} reused from {self.jobs_dir}")
        t0, done = time.time(), 0

        def finish(i, result):
            nonlocal done
            with open(self._path(fn, specs[i]), "w") as f:
                json.dump(result, f)
            results[i] = result
            done += 1
            eta = (time.time() - t0) / done * (len(todo) - done)
            _log(f"{label}: {done}/{len(todo)} {specs[i].get('name', '')} {_brief(result)} (eta {eta / 60:.1f} min)")

        if self.pool is None:
            for i in todo:
                finish(i, fn(specs[i]))
        else:
            from concurrent.futures import as_completed

            futures = {self.pool.submit(fn, specs[i]): i for i in todo}
            for fut in as_completed(futures):
                finish(futures[fut], fut.result())
        return results  # type: ignore[return-value]

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def _brief(result: dict) -> str:
    m = result.get("metrics", {})
    parts = []
    for k in ("val_loss", "val_accuracy", "accuracy", "ood_accuracy"):
        if k in m:
            parts.append(f"{k}={m[k]:.3f}")
    if "inheritance" in m:
        parts.append(f"inherited={m['inheritance']['inherited']:.3f}")
    if "train_s" in result:
        parts.append(f"train {result['train_s']:.0f}s")
    if "wall_s" in result:
        parts.append(f"total {result['wall_s']:.0f}s")
    return " ".join(parts)


def choose_lr(results: list[dict]) -> float:
    """The learning rate with the lowest validation loss (SFT loss on held-out problems; NaN counts as worst);
    ties go to the smaller rate."""
    def loss(r):
        v = r["metrics"]["val_loss"]
        return float("inf") if v != v else v

    best = sorted(results, key=lambda r: (loss(r), r["spec"]["lr"]))[0]
    return best["spec"]["lr"]


def validate(cfg: LabConfig) -> None:
    """Raise ValueError (one line) for a configuration the lab cannot run."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if cfg.sweep_noise not in cfg.noise_levels:
        raise ValueError(f"sweep_noise {cfg.sweep_noise} must be one of the noise levels {cfg.noise_levels}")
    for nz, ms in cfg.noise_methods.items():
        if nz not in cfg.noise_levels or not set(ms) <= set(cfg.methods):
            raise ValueError(f"noise_methods[{nz}]: must name a noise level and a subset of the methods, got {ms}")
    for m in cfg.methods:
        if m not in cfg.lr_tie and cfg.seeds[0] not in cfg.cell_seeds(m, cfg.sweep_noise):
            raise ValueError(f"{m}: its seeds at the sweep's noise {cfg.sweep_noise} must include the sweep's seed "
                             f"{cfg.seeds[0]} (that run is reused as a final cell)")
    for m, target in cfg.lr_tie.items():
        if m in cfg.methods and (target not in cfg.methods or target in cfg.lr_tie):
            raise ValueError(f"lr_tie: {m} uses {target}'s learning rate, but {target} is not a swept method of "
                             f"this run ({list(cfg.methods)})")
    if any(METHODS[m].kl_fraction is not None for m in cfg.methods) and (
            "pissa" not in cfg.methods or "pissa" in cfg.lr_tie):
        raise ValueError("KL-budget arms take their target from PiSSA's validation KL: add pissa to --methods")


def run_lab(cfg: LabConfig, out_dir: str, cache_dir: str = DEFAULT_CACHE, workers: int = 1, threads: int = 1,
            plots: bool = True) -> dict:
    from .pretrain import get_tokenizer
    from .report import write_report

    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    validate(cfg)
    control = max(cfg.noise_levels)
    _log(f"inheritance lab -> {out_dir} (cache {cache_dir}); {len(cfg.methods)} methods, noise {cfg.noise_levels}, "
         f"seeds {cfg.seeds}, {workers} worker(s) x {threads} thread(s)")
    get_tokenizer(cfg.world, cache_dir)  # once, before the workers race for it

    runner = Runner(os.path.join(cache_dir, "jobs"), workers, threads)
    try:
        # 1. pretraining ------------------------------------------------------------------------------------------
        pre_specs = [dict(name=f"pretrain-n{nz}", world=cfg.world.replace(noise=nz).to_dict(),
                          model=cfg.model.to_dict(), pretrain=cfg.pretrain.to_dict(), cache_dir=cache_dir,
                          version=LAB_VERSION) for nz in cfg.noise_levels]
        pre = runner.map(run_pretrain_job, pre_specs, "pretrain")
        pretrained = {nz: r for nz, r in zip(cfg.noise_levels, pre)}
        for nz, r in pretrained.items():
            if not os.path.isfile(os.path.join(r["path"], "meta.json")):  # a reused record whose cache was wiped
                r.update(run_pretrain_job(dict(pre_specs[cfg.noise_levels.index(nz)], threads=threads)))

        # 1b. the shared format warm-up: every arm starts from (and anchors to) the warmed model ---------------------
        start = {nz: r["path"] for nz, r in pretrained.items()}
        warm = []
        if cfg.warmup.steps > 0:
            warm_specs = [dict(name=f"warmup-n{nz}", pretrained=start[nz], warmup=cfg.warmup.to_dict(),
                               finetune=cfg.finetune.to_dict(), world=cfg.world.replace(noise=nz).to_dict(),
                               eval=cfg.eval.to_dict(), control_noise=control, cache_dir=cache_dir,
                               version=DOWNSTREAM_VERSION) for nz in cfg.noise_levels]
            warm = runner.map(run_warmup_job, warm_specs, "format warm-up")
            for i, (nz, r) in enumerate(zip(cfg.noise_levels, warm)):
                if not os.path.isfile(os.path.join(r["path"], "meta.json")):  # a reused record whose cache was wiped
                    r.update(run_warmup_job(dict(warm_specs[i], threads=threads)))
                start[nz] = r["path"]
            _log("format warm-up, validation accuracy: " + ", ".join(
                f"noise {nz}: {r['meta']['val_accuracy']:.2f}" for nz, r in zip(cfg.noise_levels, warm)))
        arms = {m: METHODS[m] for m in cfg.methods}

        def spec(method, nz, seed, lr, purpose="full"):
            return dict(
                name=f"{method}-n{nz}-s{seed}-lr{lr:g}", method=method,
                method_spec=arms[method].to_dict() if method in arms else None, noise=nz,
                seed=seed, lr=lr, control_noise=control, world=cfg.world.replace(noise=nz).to_dict(),
                finetune=cfg.finetune.to_dict(), eval=cfg.eval.to_dict(), pretrained=start[nz], evaluate=purpose,
                version=DOWNSTREAM_VERSION,
            )

        # 2. learning-rate sweep (validation loss; tied arms take their target's rate) -------------------------------
        sweep_seed = cfg.seeds[0]
        swept = [m for m in cfg.methods if m not in cfg.lr_tie]
        sweep_specs = [spec(m, cfg.sweep_noise, sweep_seed, lr) for m in swept for lr in cfg.lr_grid[m]]
        sweep = runner.map(run_finetune_job, sweep_specs, "sweep")
        chosen = {m: choose_lr([r for r in sweep if r["spec"]["method"] == m]) for m in swept}
        chosen.update({m: chosen[cfg.lr_tie[m]] for m in cfg.methods if m in cfg.lr_tie})
        _log("chosen learning rates (validation loss): " + ", ".join(f"{m}={lr:g}" for m, lr in chosen.items()))
        # KL budgets: a fraction of PiSSA's validation KL at its chosen rate (validation problems only)
        kl_reference = None
        if any(a.kl_fraction is not None for a in arms.values()):
            pissa = next(r for r in sweep if r["spec"]["method"] == "pissa" and r["spec"]["lr"] == chosen["pissa"])
            kl_reference = pissa["metrics"]["val_kl_to_pretrained"]
            arms = {m: resolve_kl_target(a, kl_reference) for m, a in arms.items()}
            _log(f"KL budgets from PiSSA's validation KL {kl_reference:.3f}: " + ", ".join(
                f"{m}={a.balora_kwargs['kl_target']:g}" for m, a in arms.items() if a.kl_fraction is not None))

        # 3. every method x noise x seed ----------------------------------------------------------------------------
        final_specs = [spec(m, nz, s, chosen[m]) for nz in cfg.noise_levels
                       for m in cfg.noise_methods.get(nz, cfg.methods) for s in cfg.cell_seeds(m, nz)]
        finals = runner.map(run_finetune_job, final_specs, "runs")  # the sweep's seed at its kept rate is reused
        base_specs = [dict(spec("pretrained", nz, 0, 0.0), name=f"pretrained-n{nz}") for nz in cfg.noise_levels]
        base = runner.map(run_pretrained_eval_job, base_specs, "pretrained eval")
    finally:
        runner.close()

    results = dict(
        config=cfg.to_dict(), lab_version=LAB_VERSION, downstream_version=DOWNSTREAM_VERSION, out_dir=out_dir,
        workers=workers, threads=threads, chosen_lr=chosen,
        arms={m: dict(a.to_dict(), label=a.label, family=a.family) for m, a in arms.items()},
        kl_reference=kl_reference, warmup={str(nz): r["meta"] for nz, r in zip(cfg.noise_levels, warm)},
        sweep=[_strip(r) for r in sweep], runs=[_strip(r) for r in finals],
        pretrained={str(nz): {"path": r["path"], **r["meta"]} for nz, r in pretrained.items()},
        pretrained_eval={str(r["spec"]["noise"]): r["metrics"] for r in base},
        wall_seconds=time.time() - t_start,
        # CPU seconds of every job (this run's or reused from the job cache): the run's cost on an idle machine,
        # whatever else shared the CPU while it ran
        job_cpu_seconds=_total(pre_specs, pre, sweep_specs + final_specs + base_specs, sweep + finals + base, "cpu_s"),
        job_wall_seconds=_total(pre_specs, pre, sweep_specs + final_specs + base_specs, sweep + finals + base,
                                "wall_s"),
        # fine-tuning jobs only (the sweep and the runs, each once): what the budget of the sweep is about
        finetune_cpu_seconds=_total([], [], sweep_specs + final_specs, sweep + finals, "cpu_s"),
    )
    from .evaluate import EXTRACTOR_NAME

    results["answer_extractor"] = EXTRACTOR_NAME
    write_report(results, out_dir, plots=plots)
    _log(f"done in {(time.time() - t_start) / 60:.1f} min: {os.path.join(out_dir, 'results.md')}")
    return results


def _total(pre_specs, pre, specs, results, key: str) -> float:
    """Sum of ``key`` over distinct jobs (a sweep run reused as a final run counts once)."""
    seen = {}
    for spec, result in zip(list(pre_specs) + list(specs), list(pre) + list(results)):
        seen[_spec_hash(spec)] = result.get(key, 0.0)
    return float(sum(seen.values()))


def _strip(result: dict) -> dict:
    """A job record for results.json: no file paths or repeated configs."""
    spec = result["spec"]
    keep = {k: spec[k] for k in ("method", "noise", "seed", "lr")}
    return {**keep, "metrics": result["metrics"], "curves": result.get("curves", {}),
            **{k: result[k] for k in ("train_s", "train_cpu_s", "wall_s", "final_loss") if k in result}}


def build_config(args) -> LabConfig:
    if args.sweep == "frontier":
        cfg = quick_frontier_config() if args.quick else frontier_config()
    else:
        cfg = quick_config() if args.quick else LabConfig()
    changes = {}
    if args.format_warmup is not None:
        if args.format_warmup < 0:
            raise ValueError(f"--format_warmup must be >= 0 steps, got {args.format_warmup}")
        changes["warmup"] = replace(cfg.warmup, steps=args.format_warmup)
    if args.format_warmup_lr is not None:
        if not args.format_warmup_lr > 0:
            raise ValueError(f"--format_warmup_lr must be > 0, got {args.format_warmup_lr}")
        changes["warmup"] = replace(changes.get("warmup", cfg.warmup), learning_rate=args.format_warmup_lr)
    if args.noise is not None:
        changes["noise_levels"] = tuple(args.noise)
    if args.seeds is not None:
        changes["seeds"] = tuple(args.seeds)
    if args.methods is not None:
        changes["methods"] = tuple(args.methods)
    if args.sweep_noise is not None:
        changes["sweep_noise"] = args.sweep_noise
    cfg = replace(cfg, **changes)
    # per-level subsets follow the chosen levels; explicit --seeds / --methods apply to every level
    cfg = replace(cfg, noise_methods={} if args.methods is not None else
                  {nz: ms for nz, ms in cfg.noise_methods.items() if nz in cfg.noise_levels},
                  noise_seeds={} if args.seeds is not None else
                  {nz: ss for nz, ss in cfg.noise_seeds.items() if nz in cfg.noise_levels},
                  method_seeds={} if args.seeds is not None else cfg.method_seeds)
    if args.sweep_noise is None and cfg.sweep_noise not in cfg.noise_levels:
        cfg = replace(cfg, sweep_noise=sorted(cfg.noise_levels)[len(cfg.noise_levels) // 2])
    if args.max_steps is not None or args.lambda_scale is not None:
        cfg = replace(cfg, finetune=replace(
            cfg.finetune, **({"max_steps": args.max_steps} if args.max_steps is not None else {}),
            **({"lambda_scale": args.lambda_scale} if args.lambda_scale is not None else {})))
    if args.lr is not None:
        cfg = replace(cfg, lr_grid={m: list(args.lr) for m in METHODS})
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model and data (< 5 min on 2 cores)")
    parser.add_argument("--sweep", choices=["paper", "frontier"], default="paper",
                        help="paper: the paper's arms at noise 0 / 0.1 / 0.3, seeds 0-2 (default); frontier: the "
                             "pre-registered λ / KL / accuracy frontier (README 'Pre-registration (lab v4)'): "
                             f"{len(FRONTIER_ARMS)} arms at noise 0 / 0.3, seeds 0-9")
    parser.add_argument("--format_warmup", type=int,
                        help=f"steps of the shared format warm-up (default {WARMUP_STEPS}; 0: none, the v3 protocol)")
    parser.add_argument("--format_warmup_lr", type=float,
                        help=f"learning rate of the format warm-up (default {WarmupConfig.learning_rate:g})")
    parser.add_argument("--out_dir", default=None,
                        help=f"results folder (default {DEFAULT_OUT}; --sweep frontier: {FRONTIER_OUT}; "
                             f"--quick: {QUICK_OUT})")
    parser.add_argument("--cache_dir", default=None, help=f"pretrained-model cache (default {DEFAULT_CACHE})")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, 1 thread each by default (default: 2, or 1 on a 1-core machine; "
                             "the default run is sized for 2: < 1 h on 2 cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--noise", type=float, nargs="+", help="pretraining noise levels")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), metavar="ARM",
                        help=f"arms to run, of: {' '.join(METHODS)}")
    parser.add_argument("--sweep_noise", type=float, help="noise level of the learning-rate sweep")
    parser.add_argument("--lr", type=float, nargs="+", help="one learning-rate grid for every method")
    parser.add_argument("--max_steps", type=int, help="fine-tuning steps")
    parser.add_argument("--lambda_scale", type=float, help="multiply the paper's BA-LoRA λs by this")
    parser.add_argument("--no_plots", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = build_config(args)
        validate(cfg)
    except ValueError as e:
        parser.error(str(e))
    out_dir = args.out_dir or (QUICK_OUT if args.quick else
                               FRONTIER_OUT if args.sweep == "frontier" else DEFAULT_OUT)
    cache_dir = args.cache_dir or (os.path.join(out_dir, "cache") if args.quick else DEFAULT_CACHE)
    run_lab(cfg, out_dir, cache_dir=cache_dir, workers=args.workers, threads=args.threads, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
