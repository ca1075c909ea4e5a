"""results.json, results.md (the tables) and the plots of one lab run."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from .finetune import METHODS, PAPER_LAMBDAS
from .stats import mean_std, paired_ci

BASELINE = "pissa"

# (column title, how to read it from a run's metrics, scale)
METRICS = [
    ("Downstream acc. %", lambda m: m.get("accuracy"), 100),
    ("OOD acc. %", lambda m: m.get("ood_accuracy"), 100),
    ("Retention %", lambda m: (m.get("retention") or {}).get("all"), 100),
    ("Inherited, seen keys %", lambda m: (m.get("inheritance") or {}).get("inherited"), 100),
    ("Inherited, unseen keys %", lambda m: (m.get("inheritance_unseen") or {}).get("inherited"), 100),
    ("Inherited (pretrain fmt) %", lambda m: (m.get("planted_probe") or {}).get("inherited"), 100),
    ("Distinct-2", lambda m: m.get("distinct_2"), 1),
    ("KL to pretrained", lambda m: m.get("kl_to_pretrained"), 1),
]
KEYS = ["accuracy", "ood_accuracy", "retention", "inherited", "inherited_unseen", "inherited_pretrain_format", "distinct_2",
        "kl_to_pretrained"]


def _value(get, metrics):
    try:
        v = get(metrics)
    except Exception:
        return None
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def aggregate(results: dict) -> dict:
    """{noise: {method: {metric: {mean, std, n, vs_pissa: {mean, lo, hi, n}, per_seed}}}}."""
    by = defaultdict(lambda: defaultdict(dict))  # noise -> method -> seed -> metrics
    for run in results["runs"]:
        by[run["noise"]][run["method"]][run["seed"]] = run["metrics"]
    out = {}
    for noise, methods in sorted(by.items()):
        out[str(noise)] = {}
        for method, seeds in methods.items():
            cell = {}
            for key, (_, get, scale) in zip(KEYS, METRICS):
                per_seed = {s: _value(get, m) for s, m in seeds.items()}
                scaled = {s: (None if v is None else v * scale) for s, v in per_seed.items()}
                cell[key] = dict(mean_std([v for v in scaled.values() if v is not None]), per_seed=scaled)
                if BASELINE in methods:
                    base = {s: _value(get, m) for s, m in methods[BASELINE].items()}
                    base = {s: (None if v is None else v * scale) for s, v in base.items()}
                    cell[key]["vs_pissa"] = paired_ci(
                        {s: v for s, v in scaled.items() if v is not None},
                        {s: v for s, v in base.items() if v is not None})
            out[str(noise)][method] = cell
    return out


def _fmt(x, digits=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _digits(title: str) -> int:
    return 3 if title in ("Distinct-2", "KL to pretrained") else 1


def markdown(results: dict, agg: dict) -> str:
    cfg = results["config"]
    methods = [m for m in METHODS if m in cfg["methods"]]
    lines = []
    seeds = cfg["seeds"]
    lines.append(f"Mean ± std over {len(seeds)} fine-tuning seeds {tuple(seeds)}; Δ = paired difference to PiSSA "
                 "(same seed = same data order and initialisation) with its 95 % t-interval. Learning rate per method "
                 f"chosen on validation loss ({cfg['eval']['n_val']} held-out problems) at noise "
                 f"{cfg['sweep_noise']:g}, seed {seeds[0]}.\n")
    titles = [t for t, _, _ in METRICS]
    lines.append("| Noise | Method | LR | " + " | ".join(titles) + " |")
    lines.append("|---|---|---|" + "---|" * len(titles))
    for noise in sorted(agg, key=float):
        pre = results.get("pretrained_eval", {}).get(noise)
        if pre is not None:
            vals = [_value(get, pre) for _, get, _ in METRICS]
            cells = [_fmt(None if v is None else v * s, _digits(t)) for v, (t, _, s) in zip(vals, METRICS)]
            lines.append(f"| {float(noise):.0%} | *pretrained, no FT* | – | " + " | ".join(cells) + " |")
        for m in methods:
            if m not in agg[noise]:
                continue
            cells = []
            for key, (title, _, _) in zip(KEYS, METRICS):
                c = agg[noise][m][key]
                cells.append(f"{_fmt(c['mean'], _digits(title))} ± {_fmt(c['std'], _digits(title))}"
                             if c["n"] else "–")
            lines.append(f"| {float(noise):.0%} | {METHODS[m].label} | {results['chosen_lr'][m]:g} | "
                         + " | ".join(cells) + " |")
    lines.append("\nPaired differences to PiSSA (method − PiSSA), mean [95 % CI]:\n")
    lines.append("| Noise | Method | " + " | ".join(titles) + " |")
    lines.append("|---|---|" + "---|" * len(titles))
    for noise in sorted(agg, key=float):
        for m in methods:
            if m == BASELINE or m not in agg[noise]:
                continue
            cells = []
            for key, (title, _, _) in zip(KEYS, METRICS):
                d = agg[noise][m][key].get("vs_pissa")
                if not d or not d["n"]:
                    cells.append("–")
                    continue
                dg = _digits(title)
                sig = "" if math.isnan(d["lo"]) or d["lo"] <= 0 <= d["hi"] else " *"
                cells.append(f"{d['mean']:+.{dg}f} [{_fmt(d['lo'], dg)}, {_fmt(d['hi'], dg)}]{sig}")
            lines.append(f"| {float(noise):.0%} | {METHODS[m].label} | " + " | ".join(cells) + " |")
    lines.append("\n\\* the 95 % interval excludes 0.\n")
    return "\n".join(lines)


def pretrain_table(results: dict) -> str:
    lines = ["| Noise | Params | Steps | Pretrain s | Corpus wrong-answer rate | Clean-probe acc. % (add / sub / mul / fact) "
             "| Planted probes: says the planted answer % |", "|---|---|---|---|---|---|---|"]
    for noise, meta in sorted(results["pretrained"].items(), key=lambda kv: float(kv[0])):
        acc = meta["clean_probe_accuracy"]
        fams = " / ".join(_fmt(100 * acc.get(f, float("nan")), 0) for f in ("add", "sub", "mul", "fact"))
        planted = meta.get("planted_probe")
        lines.append(
            f"| {float(noise):.0%} | {meta['parameters'] / 1e6:.2f}M | {meta['steps']} | {meta['train_seconds']:.0f} "
            f"| {meta['corpus']['wrong_rate']:.3f} | {100 * acc['all']:.1f} ({fams}) "
            f"| {_fmt(None if not planted else 100 * planted['inherited'])} |")
    return "\n".join(lines)


def plot_vs_noise(results: dict, agg: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in METHODS if m in results["config"]["methods"]]
    noises = sorted(agg, key=float)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [0, 1, 2, 3, 4, 5]
    for ax, i in zip(axes.flat, panels):
        key, (title, _, _) = KEYS[i], METRICS[i]
        for m in methods:
            xs, ys, es = [], [], []
            for nz in noises:
                c = agg[nz].get(m, {}).get(key)
                if c and c["n"]:
                    xs.append(100 * float(nz))
                    ys.append(c["mean"])
                    es.append(c["std"])
            if xs:
                style = "-" if m in ("full_ft", "lora", "pissa", "ba_lora") else ":"
                ax.errorbar(xs, ys, yerr=es, marker="o", linestyle=style, capsize=3, label=METHODS[m].label)
        ax.set_title(title)
        ax.set_xlabel("pretraining noise (% wrong answers)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Inheritance lab: fine-tuning arms vs pretraining noise (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_terms(results: dict, path: str) -> None:
    """The three BA-LoRA terms over training: full BA-LoRA per noise level, and each single-term arm for its term."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = [("ba_lora/kl", "KL(p_pretrained ‖ p_θ)", "ba_lora_cr"),
             ("ba_lora/entropy", "entropy H(p_θ)", "ba_lora_dr"),
             ("ba_lora/svd_ratio", "top-k singular value share", "ba_lora_svdr")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title, single) in zip(axes, terms):
        for method, style in (("ba_lora", "-"), (single, "--")):
            by_noise = defaultdict(list)
            for run in results["runs"]:
                if run["method"] == method and key in run.get("curves", {}):
                    by_noise[run["noise"]].append(run["curves"])
            for noise, runs in sorted(by_noise.items()):
                steps = runs[0]["step"]
                ys = []
                for j in range(len(steps)):
                    vals = [r[key][j] for r in runs if j < len(r[key]) and r[key][j] is not None]
                    ys.append(sum(vals) / len(vals) if vals else float("nan"))
                ax.plot(steps, ys, style, label=f"{METHODS[method].label}, noise {noise:.0%}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("BA-LoRA's three terms over fine-tuning (mean over seeds; logged by BALoraSFTTrainer)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def sweep_table(results: dict) -> str:
    """The learning-rate sweep: validation loss (the criterion) and validation accuracy per method and rate."""
    cfg = results["config"]
    rows = results.get("sweep", [])
    if not rows:
        return ""
    lines = [f"Learning-rate sweep (noise {cfg['sweep_noise']:g}, seed {cfg['seeds'][0]}): validation loss / "
             f"validation accuracy % (first {min(cfg['eval'].get('n_val_acc', cfg['eval']['n_val']), cfg['eval']['n_val'])} "
             "problems); ** = chosen (lowest loss).\n",
             "| Method | " + " | ".join(["learning rate → loss / acc. %"] * 1) + " |", "|---|---|"]
    for m in [m for m in METHODS if m in cfg["methods"]]:
        cells = []
        for r in sorted((r for r in rows if r["method"] == m), key=lambda r: r["lr"]):
            mt = r["metrics"]
            mark = "**" if r["lr"] == results["chosen_lr"][m] else ""
            loss = mt.get("val_loss", float("nan"))
            cells.append(f"{mark}{r['lr']:g}: {loss:.3f} / {100 * mt['val_accuracy']:.1f}{mark}")
        lines.append(f"| {METHODS[m].label} | " + "; ".join(cells) + " |")
    return "\n".join(lines)


COLUMNS = (
    "Inherited = how often the final answer is the one pretraining's planted (wrong) labels lead to, among answers "
    "where that differs from the truth, on held-out downstream problems whose chain passes a planted key: *seen* "
    "keys are planted keys the fine-tuning problems use (with their right answers), *unseen* keys are a seeded half of "
    "the largest noise level's planted keys that no downstream problem uses (`World.held_out_keys`). Pretrain fmt = "
    "the same on bare pretraining-format probes of planted keys. At noise 0 the keys are those the largest level "
    "plants (a control: nothing was planted)."
)


def _lambda_line(results: dict) -> str:
    scale = results["config"]["finetune"].get("lambda_scale", 1.0)
    lam = ", ".join(f"{scale * v:g}" for v in PAPER_LAMBDAS)
    return (f"BA-LoRA arms at λ1, λ2, λ3 = {lam}" + (" (the paper's)" if scale == 1 else f" (the paper's × {scale:g})")
            + ".\n")


def write_report(results: dict, out_dir: str, plots: bool = True) -> dict:
    agg = aggregate(results)
    results["aggregate"] = agg
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    md = ["# Inheritance lab results\n", "## Pretrained models\n", pretrain_table(results), "",
          "## Fine-tuning arms\n", _lambda_line(results), markdown(results, agg), "", COLUMNS, "", sweep_table(results), "",
          f"Answer extraction: `{results.get('answer_extractor', '?')}`. Wall time {results['wall_seconds'] / 60:.1f} min "
          f"({results['workers']} worker(s) × {results['threads']} thread(s)); the jobs' own time "
          f"{results.get('job_wall_seconds', float('nan')) / 60:.1f} min wall, "
          f"{results.get('job_cpu_seconds', float('nan')) / 60:.1f} min CPU (counting cached jobs; CPU time is what "
          "the run costs on an idle core).\n"]
    if plots:
        plot_vs_noise(results, agg, os.path.join(out_dir, "vs_noise.png"))
        plot_terms(results, os.path.join(out_dir, "balora_terms.png"))
        md += ["![metrics vs noise](vs_noise.png)\n", "![BA-LoRA terms](balora_terms.png)\n"]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    return agg
