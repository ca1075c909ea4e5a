"""The inheritance lab, end to end: pretrain per noise level → learning-rate sweep → seeds × methods → report.

    python benchmarks/inheritance_lab.py            # default run (< 1 h on 2 CPU cores, 2 workers)
    python benchmarks/inheritance_lab.py --quick    # smoke test (< 5 min)

Stages:

1. Tokenizer (shared) and one pretrained model per noise level, cached under ``--cache_dir``.
2. Learning-rate sweep: every method × every learning rate of its grid at ``sweep_noise``, seed ``seeds[0]``;
   the learning rate with the lowest *validation* loss (ties: the smaller rate) is kept for that method at every
   noise level. The sweep run at the kept rate is that (method, noise, seed) cell's final run: test sets are never
   used for the choice.
3. Every method × noise level × seed at its kept rate, plus the pretrained model itself per noise level.
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

from .finetune import METHODS, FinetuneConfig
from .model import ModelConfig
from .pretrain import DEFAULT_CACHE, PretrainConfig
from .world import WorldConfig

LAB_VERSION = "lab-v2"  # pretraining jobs; v2: ~3600 pretraining steps instead of ~900 (clean probes ~35 % -> ~98 %)
DOWNSTREAM_VERSION = "downstream-v4"  # v4: held-out planted keys; v3: lab-v2 models; v2: one-step problems, lr on val loss
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "inheritance_lab")  # small files only: md, json, png
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
class LabConfig:
    noise_levels: tuple[float, ...] = (0.0, 0.1, 0.3)
    seeds: tuple[int, ...] = (0, 1, 2)
    methods: tuple[str, ...] = tuple(METHODS)
    lr_grid: dict = field(default_factory=lambda: {
        # Each grid is centred on that method's lab-v1 choice: Full FT and LoRA chose their grid's middle (1e-3,
        # 1e-2); PiSSA and every BA-LoRA arm chose the bottom edge (3e-3 of 3e-3 / 1e-2 / 3e-2; a PiSSA adapter starts
        # on the principal singular directions, so the same rate moves the weights more), so their grid goes lower.
        "full_ft": [3e-4, 1e-3, 3e-3],
        "lora": [3e-3, 1e-2, 3e-2],
        **{m: [1e-3, 3e-3, 1e-2] for m in ("pissa", "ba_lora", "ba_lora_cr", "ba_lora_dr", "ba_lora_svdr")},
    })
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

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))


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


def evaluate_model(model, reference, tokenizer, world, sets, spec: dict, purpose: str) -> dict:
    """Every measurement of one model. ``purpose == "sweep_only"`` measures validation loss and accuracy alone."""
    from . import evaluate as E

    ev, noise, control = spec["eval"], spec["noise"], spec["control_noise"]
    out: dict = {}
    out["val_loss"] = E.downstream_loss(model, tokenizer, world, sets["val"])
    val_acc = sets["val"][: ev["n_val_acc"]]
    _, preds = E.downstream_predictions(model, tokenizer, val_acc, ev["max_new_tokens"], ev["batch_size"])
    out["val_accuracy"] = E.downstream_accuracy(world, val_acc, preds)
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
    method = METHODS[spec["method"]]
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


def run_lab(cfg: LabConfig, out_dir: str, cache_dir: str = DEFAULT_CACHE, workers: int = 1, threads: int = 1,
            plots: bool = True) -> dict:
    from .pretrain import get_tokenizer
    from .report import write_report

    t_start = time.time()
    os.makedirs(out_dir, exist_ok=True)
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if cfg.sweep_noise not in cfg.noise_levels:
        raise ValueError(f"sweep_noise {cfg.sweep_noise} must be one of the noise levels {cfg.noise_levels}")
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

        def spec(method, nz, seed, lr, purpose="full"):
            return dict(
                name=f"{method}-n{nz}-s{seed}-lr{lr:g}", method=method, noise=nz, seed=seed, lr=lr,
                control_noise=control, world=cfg.world.replace(noise=nz).to_dict(), finetune=cfg.finetune.to_dict(),
                eval=cfg.eval.to_dict(), pretrained=pretrained[nz]["path"], evaluate=purpose, version=DOWNSTREAM_VERSION,
            )

        # 2. learning-rate sweep -----------------------------------------------------------------------------------
        sweep_seed = cfg.seeds[0]
        sweep_specs = [spec(m, cfg.sweep_noise, sweep_seed, lr) for m in cfg.methods for lr in cfg.lr_grid[m]]
        sweep = runner.map(run_finetune_job, sweep_specs, "sweep")
        chosen = {m: choose_lr([r for r in sweep if r["spec"]["method"] == m]) for m in cfg.methods}
        _log("chosen learning rates (validation loss): " + ", ".join(f"{m}={lr:g}" for m, lr in chosen.items()))

        # 3. every method x noise x seed ----------------------------------------------------------------------------
        final_specs = [spec(m, nz, s, chosen[m]) for nz in cfg.noise_levels for m in cfg.methods for s in cfg.seeds]
        finals = runner.map(run_finetune_job, final_specs, "runs")  # the sweep's seed at its kept rate is reused
        base_specs = [dict(spec("pretrained", nz, 0, 0.0), name=f"pretrained-n{nz}") for nz in cfg.noise_levels]
        base = runner.map(run_pretrained_eval_job, base_specs, "pretrained eval")
    finally:
        runner.close()

    results = dict(
        config=cfg.to_dict(), lab_version=LAB_VERSION, out_dir=out_dir, workers=workers, threads=threads,
        chosen_lr=chosen, sweep=[_strip(r) for r in sweep], runs=[_strip(r) for r in finals],
        pretrained={str(nz): {"path": r["path"], **r["meta"]} for nz, r in pretrained.items()},
        pretrained_eval={str(r["spec"]["noise"]): r["metrics"] for r in base},
        wall_seconds=time.time() - t_start,
        # CPU seconds of every job (this run's or reused from the job cache): the run's cost on an idle machine,
        # whatever else shared the CPU while it ran
        job_cpu_seconds=_total(pre_specs, pre, sweep_specs + final_specs + base_specs, sweep + finals + base, "cpu_s"),
        job_wall_seconds=_total(pre_specs, pre, sweep_specs + final_specs + base_specs, sweep + finals + base,
                                "wall_s"),
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
    cfg = quick_config() if args.quick else LabConfig()
    changes = {}
    if args.noise is not None:
        changes["noise_levels"] = tuple(args.noise)
    if args.seeds is not None:
        changes["seeds"] = tuple(args.seeds)
    if args.methods is not None:
        changes["methods"] = tuple(args.methods)
    if args.sweep_noise is not None:
        changes["sweep_noise"] = args.sweep_noise
    cfg = replace(cfg, **changes)
    if args.sweep_noise is None and cfg.sweep_noise not in cfg.noise_levels:
        cfg = replace(cfg, sweep_noise=sorted(cfg.noise_levels)[len(cfg.noise_levels) // 2])
    if args.max_steps is not None or args.lambda_scale is not None:
        cfg = replace(cfg, finetune=replace(
            cfg.finetune, **({"max_steps": args.max_steps} if args.max_steps is not None else {}),
            **({"lambda_scale": args.lambda_scale} if args.lambda_scale is not None else {})))
    if args.lr is not None:
        cfg = replace(cfg, lr_grid={m: list(args.lr) for m in METHODS})
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model and data (< 5 min on 2 cores)")
    parser.add_argument("--out_dir", default=None,
                        help=f"results folder (default {DEFAULT_OUT}, or {QUICK_OUT} with --quick)")
    parser.add_argument("--cache_dir", default=None, help=f"pretrained-model cache (default {DEFAULT_CACHE})")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="parallel processes, 1 thread each by default (default: 2, or 1 on a 1-core machine; "
                             "the default run is sized for 2: < 1 h on 2 cores)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    parser.add_argument("--noise", type=float, nargs="+", help="pretraining noise levels")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), help="arms to run")
    parser.add_argument("--sweep_noise", type=float, help="noise level of the learning-rate sweep")
    parser.add_argument("--lr", type=float, nargs="+", help="one learning-rate grid for every method")
    parser.add_argument("--max_steps", type=int, help="fine-tuning steps")
    parser.add_argument("--lambda_scale", type=float, help="multiply the paper's BA-LoRA λs by this")
    parser.add_argument("--no_plots", action="store_true")
    args = parser.parse_args(argv)
    cfg = build_config(args)
    out_dir = args.out_dir or (QUICK_OUT if args.quick else DEFAULT_OUT)
    cache_dir = args.cache_dir or (os.path.join(out_dir, "cache") if args.quick else DEFAULT_CACHE)
    run_lab(cfg, out_dir, cache_dir=cache_dir, workers=args.workers, threads=args.threads, plots=not args.no_plots)
    return 0


if __name__ == "__main__":
    sys.exit(main())
