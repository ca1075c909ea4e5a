"""results.json, results.md (the tables) and the plots of one lab run."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict

from .finetune import METHODS, PAPER_LAMBDAS
from .stats import mean_ci, mean_std, paired_ci

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
# Validation measurements (the only ones a setting or learning-rate choice may read): aggregated, not tabulated.
VAL_METRICS = {"val_loss": (lambda m: m.get("val_loss"), 1), "val_accuracy": (lambda m: m.get("val_accuracy"), 100),
               "val_kl_to_pretrained": (lambda m: m.get("val_kl_to_pretrained"), 1)}
# The pre-registered setting rule (README "Pre-registration (lab v4)"): within a family, the arms whose mean
# validation accuracy at the primary noise is at most VAL_ACC_TOLERANCE points below PiSSA's are admissible; the
# chosen one is the admissible arm with the lowest mean validation KL to the start model (none admissible: the
# highest validation accuracy). Accuracy, not loss: after the format warm-up PiSSA's validation loss is ~0.02 nats,
# where a relative tolerance is a few thousandths of a nat, inside the seed-to-seed spread.
PRIMARY_NOISE = "0.3"
VAL_ACC_TOLERANCE = 2.0  # points
LC_HYPOTHESIS = ("lc_l0.01", "ba_l0.01")  # label-consistent − full anchoring at λ1 = 1e-2, unseen keys, noise 30 %


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
            for key, (_, get, scale) in [*zip(KEYS, METRICS),
                                         *((k, (k, g, sc)) for k, (g, sc) in VAL_METRICS.items())]:
                per_seed = {s: _value(get, m) for s, m in seeds.items()}
                scaled = {s: (None if v is None else v * scale) for s, v in per_seed.items()}
                cell[key] = dict(mean_std([v for v in scaled.values() if v is not None]), per_seed=scaled,
                                 ci=mean_ci([v for v in scaled.values() if v is not None]))
                if BASELINE in methods:
                    base = {s: _value(get, m) for s, m in methods[BASELINE].items()}
                    base = {s: (None if v is None else v * scale) for s, v in base.items()}
                    cell[key]["vs_pissa"] = paired_ci(
                        {s: v for s, v in scaled.items() if v is not None},
                        {s: v for s, v in base.items() if v is not None})
            out[str(noise)][method] = cell
    return out


def _label(results: dict, m: str) -> str:
    return results.get("arms", {}).get(m, {}).get("label") or METHODS[m].label


def _methods(results: dict) -> list[str]:
    """The run's arms in its own order (the frontier's order is its definition's)."""
    return list(results["config"]["methods"])


def _fmt(x, digits=1):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def _digits(title: str) -> int:
    return 3 if title in ("Distinct-2", "KL to pretrained") else 1


def markdown(results: dict, agg: dict) -> str:
    cfg = results["config"]
    methods = _methods(results)
    lines = []
    seeds = cfg["seeds"]
    lines.append(f"Mean ± std over {len(seeds)} fine-tuning seeds {tuple(seeds)}; Δ = paired difference to PiSSA "
                 "(same seed = same data order and initialisation) with its 95 % t-interval. Learning rate per method "
                 f"chosen on validation loss ({cfg['eval']['n_val']} held-out problems) at noise "
                 f"{cfg['sweep_noise']:g}, seed {seeds[0]}."
                 + (" Every arm starts from the pretrained model after the shared format warm-up "
                    f"({cfg['warmup']['steps']} steps), which is also the reference of 'KL to pretrained' and of "
                    "BA-LoRA's KL." if results.get("warmup") else "") + "\n")
    titles = [t for t, _, _ in METRICS]
    lines.append("| Noise | Method | LR | " + " | ".join(titles) + " |")
    lines.append("|---|---|---|" + "---|" * len(titles))
    for noise in sorted(agg, key=float):
        pre = results.get("pretrained_eval", {}).get(noise)
        if pre is not None:
            vals = [_value(get, pre) for _, get, _ in METRICS]
            cells = [_fmt(None if v is None else v * s, _digits(t)) for v, (t, _, s) in zip(vals, METRICS)]
            start = "*pretrained + format warm-up, no FT*" if results.get("warmup") else "*pretrained, no FT*"
            lines.append(f"| {float(noise):.0%} | {start} | – | " + " | ".join(cells) + " |")
        for m in methods:
            if m not in agg[noise]:
                continue
            cells = []
            for key, (title, _, _) in zip(KEYS, METRICS):
                c = agg[noise][m][key]
                cells.append(f"{_fmt(c['mean'], _digits(title))} ± {_fmt(c['std'], _digits(title))}"
                             if c["n"] else "–")
            lines.append(f"| {float(noise):.0%} | {_label(results, m)} | {results['chosen_lr'][m]:g} | "
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
            lines.append(f"| {float(noise):.0%} | {_label(results, m)} | " + " | ".join(cells) + " |")
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

    methods = _methods(results)
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
                ax.errorbar(xs, ys, yerr=es, marker="o", linestyle=style, capsize=3, label=_label(results, m))
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
                ax.plot(steps, ys, style, label=f"{_label(results, method)}, noise {noise:.0%}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
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
    for m in [m for m in _methods(results) if m in results["chosen_lr"]]:
        if not any(r["method"] == m for r in rows):
            lines.append(f"| {_label(results, m)} | (no sweep: {results['config'].get('lr_tie', {}).get(m, '?')}'s "
                         f"rate, {results['chosen_lr'][m]:g}) |")
            continue
        cells = []
        for r in sorted((r for r in rows if r["method"] == m), key=lambda r: r["lr"]):
            mt = r["metrics"]
            mark = "**" if r["lr"] == results["chosen_lr"][m] else ""
            loss = mt.get("val_loss", float("nan"))
            cells.append(f"{mark}{r['lr']:g}: {loss:.3f} / {100 * mt['val_accuracy']:.1f}{mark}")
        lines.append(f"| {_label(results, m)} | " + "; ".join(cells) + " |")
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
    if "arms" in results:
        scaled = f" (every λ of the arm's definition × {scale:g})" if scale != 1 else ""
        return f"BA-LoRA arms' settings{scaled}:\n"
    lam = ", ".join(f"{scale * v:g}" for v in PAPER_LAMBDAS)
    return (f"BA-LoRA arms at λ1, λ2, λ3 = {lam}" + (" (the paper's)" if scale == 1 else f" (the paper's × {scale:g})")
            + ".\n")


def arms_table(results: dict) -> str:
    """Each BA-LoRA arm's λ and further BALoraConfig settings (the frontier's arms differ in them)."""
    arms = results.get("arms", {})
    scale = results["config"]["finetune"].get("lambda_scale", 1.0)
    lines = ["| Arm | λ1, λ2, λ3 | other BALoraConfig settings |", "|---|---|---|"]
    for m in _methods(results):
        a = arms.get(m)
        if not a or a.get("lambdas") is None:
            continue
        lam = ", ".join(f"{scale * v:.4g}" for v in a["lambdas"])
        extra = "; ".join(f"{k}={v}" for k, v in sorted(a.get("balora", {}).items())) or "–"
        if a.get("kl_fraction") is not None:
            extra += f" (KL budget: {a['kl_fraction']:g} × PiSSA's validation KL; λ1 above is the controller's start)"
        lines.append(f"| {_label(results, m)} | {lam} | {extra} |")
    return "\n".join(lines)


def choose_settings(results: dict, agg: dict, noise: str = PRIMARY_NOISE) -> dict:
    """The pre-registered setting rule, per family: {family: {"chosen", "admissible", "threshold", "why"}}.

    Reads validation metrics only (``val_accuracy``, ``val_kl_to_pretrained``: validation problems, never test
    ones)."""
    cells = agg.get(noise, {})
    if "pissa" not in cells:
        return {}
    threshold = cells["pissa"]["val_accuracy"]["mean"] - VAL_ACC_TOLERANCE
    families = defaultdict(list)
    for m in _methods(results):
        fam = results.get("arms", {}).get(m, {}).get("family", METHODS[m].family if m in METHODS else "")
        if fam and m in cells and cells[m]["val_accuracy"]["n"]:
            families[fam].append(m)
    out = {}
    for fam, members in families.items():
        admissible = [m for m in members if cells[m]["val_accuracy"]["mean"] >= threshold]

        def kl(m):
            v = cells[m]["val_kl_to_pretrained"]["mean"]
            return float("inf") if v != v else v

        if admissible:
            chosen, why = min(admissible, key=lambda m: (kl(m), m)), "lowest validation KL among the admissible"
        else:
            chosen = min(members, key=lambda m: (-cells[m]["val_accuracy"]["mean"], m))
            why = "none admissible: highest validation accuracy"
        out[fam] = {"chosen": chosen, "admissible": admissible, "threshold": threshold, "why": why}
    return out


def _paired(agg: dict, noise: str, a: str, b: str, key: str) -> dict | None:
    cells = agg.get(noise, {})
    if a not in cells or b not in cells:
        return None
    x = {s: v for s, v in cells[a][key]["per_seed"].items() if v is not None}
    y = {s: v for s, v in cells[b][key]["per_seed"].items() if v is not None}
    return paired_ci(x, y)


def _interval(d: dict | None, digits: int = 1) -> str:
    if not d or not d["n"]:
        return "–"
    sig = "" if math.isnan(d["lo"]) or d["lo"] <= 0 <= d["hi"] else " *"
    return f"{d['mean']:+.{digits}f} [{_fmt(d['lo'], digits)}, {_fmt(d['hi'], digits)}]{sig} (n = {d['n']})"


def preregistered(results: dict, agg: dict) -> str:
    """The pre-registered tests (README "Pre-registration (lab v4)"), whatever they show."""
    choice = choose_settings(results, agg)
    if not choice:
        return ""
    lines = [f"Setting rule (validation only): admissible = mean validation accuracy at noise "
             f"{float(PRIMARY_NOISE):.0%} ≥ PiSSA's − {VAL_ACC_TOLERANCE:g} points = "
             f"{next(iter(choice.values()))['threshold']:.1f} %; chosen = "
             "lowest mean validation KL to the start model among the admissible.\n",
             "| Family | chosen arm | why | admissible |", "|---|---|---|---|"]
    for fam, c in choice.items():
        lines.append(f"| {fam} | {_label(results, c['chosen'])} | {c['why']} | "
                     f"{', '.join(_label(results, m) for m in c['admissible']) or '–'} |")
    lines.append("")
    if "ba_lora" in choice:
        chosen = choice["ba_lora"]["chosen"]
        d = _paired(agg, PRIMARY_NOISE, chosen, "pissa", "inherited_unseen")
        lines.append(f"**Primary** (noise {float(PRIMARY_NOISE):.0%}): unseen-key inheritance, "
                     f"{_label(results, chosen)} − PiSSA, paired mean [95 % t-interval]: {_interval(d)}. The hypothesis holds if the whole "
                     "interval is below 0.")
    a, b = LC_HYPOTHESIS
    d = _paired(agg, PRIMARY_NOISE, a, b, "inherited_unseen")
    if d is not None:
        lines.append(f"\n**Label-consistent** (noise {float(PRIMARY_NOISE):.0%}): unseen-key inheritance, "
                     f"{_label(results, a)} − {_label(results, b)}: {_interval(d)}; the hypothesis holds if the "
                     "whole interval is below 0.")
    return "\n".join(lines)


def frontier_points(results: dict, agg: dict, noise: str = PRIMARY_NOISE) -> dict:
    """{arm: {metric: {mean, lo, hi, n}}} for the frontier figure: the per-arm means of the table with their
    95 % t-intervals over seeds."""
    out = {}
    for m in _methods(results):
        c = agg.get(noise, {}).get(m)
        if c is None:
            continue
        out[m] = {k: {x: c[k]["ci"][x] for x in ("mean", "lo", "hi", "n")}
                  for k in ("accuracy", "inherited_unseen", "kl_to_pretrained")}
    return out


FAMILY_LABELS = {"ba_lora": "BA-LoRA (paper λ, λ1 grid, release, KL budgets)", "cr": "CR only (λ1 grid)",
                 "lc": "label-consistent KL (λ1 grid)"}


def plot_frontier(results: dict, agg: dict, path: str, noise: str = PRIMARY_NOISE) -> dict:
    """Two panels: x = downstream accuracy (left) or KL to the start model (right), y = unseen-key inheritance;
    one point per arm with 95 % interval bars on both axes; PiSSA and LoRA marked. Returns the plotted points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = frontier_points(results, agg, noise)
    colours = {"ba_lora": "tab:blue", "cr": "tab:orange", "lc": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    for ax, xkey, xtitle in ((axes[0], "accuracy", "downstream accuracy % (test)"),
                             (axes[1], "kl_to_pretrained", "KL to the start model (nats / response token)")):
        for m, p in points.items():
            x, y = p[xkey], p["inherited_unseen"]
            if not (x["n"] and y["n"]):
                continue

            def err(c):
                return [[c["mean"] - c["lo"]], [c["hi"] - c["mean"]]] if c["n"] > 1 else None

            family = results.get("arms", {}).get(m, {}).get("family", "")
            style = dict(marker="o", color=colours.get(family, "tab:grey"), markersize=5)
            if m == "pissa":
                style = dict(marker="*", color="black", markersize=16)
            elif m == "lora":
                style = dict(marker="s", color="tab:red", markersize=10)
            elif m == "full_ft":
                style = dict(marker="D", color="tab:purple", markersize=8)
            ax.errorbar(x["mean"], y["mean"], xerr=err(x), yerr=err(y), linestyle="none", capsize=2, alpha=0.85,
                        **style)
            ax.annotate(_label(results, m), (x["mean"], y["mean"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", weight="bold" if m in ("pissa", "lora") else "normal")
        if "pissa" in points and points["pissa"]["inherited_unseen"]["n"]:
            ax.axhline(points["pissa"]["inherited_unseen"]["mean"], color="black", linewidth=0.6, linestyle="--")
        ax.set_xlabel(xtitle)
        ax.set_ylabel("inherited planted errors, unseen keys % (test)")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="*", color="black", linestyle="none", markersize=12, label="PiSSA"),
               plt.Line2D([], [], marker="s", color="tab:red", linestyle="none", label="LoRA"),
               plt.Line2D([], [], marker="D", color="tab:purple", linestyle="none", label="Full FT"),
               *(plt.Line2D([], [], marker="o", color=c, linestyle="none", label=FAMILY_LABELS[f])
                 for f, c in colours.items())]
    axes[0].legend(handles=handles, fontsize=8, loc="best")
    n = max((p["accuracy"]["n"] for p in points.values()), default=0)
    fig.suptitle(f"Inheritance lab frontier at noise {float(noise):.0%}: mean over {n} seeds, 95 % t-interval bars "
                 "(lower is better on y)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return points


STRIP_LABELS = {"accuracy": "downstream accuracy % (test)", "inherited_unseen": "inherited, unseen keys % (test)"}


def plot_strip(groups: dict, path: str, title: str = "", ylabel: str = STRIP_LABELS["accuracy"]) -> None:
    """Per-seed values as a strip plot: ``groups`` maps a label to {seed: value}; one column per label, one dot
    per seed (annotated with the seed), the mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(groups), 4.5))
    for i, (label, per_seed) in enumerate(groups.items()):
        items = sorted((s, v) for s, v in per_seed.items() if v is not None)
        for j, (seed, v) in enumerate(items):
            x = i + 0.12 * ((j % 5) - 2)
            ax.plot(x, v, "o", color=f"C{i}", alpha=0.8)
            ax.annotate(str(seed), (x, v), fontsize=6, xytext=(3, 0), textcoords="offset points")
        if items:
            mean = sum(v for _, v in items) / len(items)
            ax.hlines(mean, i - 0.35, i + 0.35, color=f"C{i}", linewidth=2)
    ax.set_xticks(range(len(groups)), list(groups), fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def strip_from_results(paths: list[str], labels: list[str], method: str, noise: str, out: str,
                       key: str = "accuracy") -> dict:
    """The strip plot of ``method``'s per-seed ``key`` at ``noise`` from several results.json files."""
    groups = {}
    for path, label in zip(paths, labels, strict=True):
        with open(path) as f:
            agg = json.load(f)["aggregate"]
        groups[label] = {int(s): v for s, v in agg[noise][method][key]["per_seed"].items()}
    plot_strip(groups, out, f"{method}, noise {float(noise):.0%}: per-seed {key}", STRIP_LABELS.get(key, key))
    return groups


def write_report(results: dict, out_dir: str, plots: bool = True) -> dict:
    agg = aggregate(results)
    results["aggregate"] = agg
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    md = ["# Inheritance lab results\n", "## Pretrained models\n", pretrain_table(results), "",
          "## Fine-tuning arms\n", _lambda_line(results), arms_table(results), "", markdown(results, agg), "", COLUMNS,
          "", sweep_table(results), "",
          f"Answer extraction: `{results.get('answer_extractor', '?')}`. Wall time {results['wall_seconds'] / 60:.1f} min "
          f"({results['workers']} worker(s) × {results['threads']} thread(s)); the jobs' own time "
          f"{results.get('job_wall_seconds', float('nan')) / 60:.1f} min wall, "
          f"{results.get('job_cpu_seconds', float('nan')) / 60:.1f} min CPU (counting cached jobs; CPU time is what "
          "the run costs on an idle core).\n"]
    pre = preregistered(results, agg)
    if pre:
        md += ["## Pre-registered tests (lab v4)\n", pre, ""]
    if plots and PRIMARY_NOISE in agg and "pissa" in agg[PRIMARY_NOISE]:
        plot_frontier(results, agg, os.path.join(out_dir, "frontier.png"))
        md += ["![frontier](frontier.png)\n"]
    if plots:
        plot_vs_noise(results, agg, os.path.join(out_dir, "vs_noise.png"))
        plot_terms(results, os.path.join(out_dir, "balora_terms.png"))
        md += ["![metrics vs noise](vs_noise.png)\n", "![BA-LoRA terms](balora_terms.png)\n"]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    return agg


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.report strip A/results.json B/results.json --labels before after --out strip.png``."""
    import argparse

    parser = argparse.ArgumentParser(description="Strip plot of per-seed values from lab results.json files.")
    parser.add_argument("command", choices=["strip"])
    parser.add_argument("results", nargs="+", help="results.json files")
    parser.add_argument("--labels", nargs="+", help="one label per file (default: the file names)")
    parser.add_argument("--method", default="pissa")
    parser.add_argument("--noise", default=PRIMARY_NOISE)
    parser.add_argument("--key", default="accuracy")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    labels = args.labels or args.results
    if len(labels) != len(args.results):
        parser.error(f"--labels: {len(labels)} labels for {len(args.results)} files")
    groups = strip_from_results(args.results, labels, args.method, args.noise, args.out, args.key)
    for label, per_seed in groups.items():
        print(label, {s: round(v, 1) for s, v in sorted(per_seed.items())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
