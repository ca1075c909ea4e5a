"""t-SNE of last-hidden (pooled) features per method, side by side, like the paper's Figure 1 (and Figs. 6-9 over steps).

    # features dumped by the trainer (`--feature_dump_steps 0 100 -1` in examples/nlu_glue.py)
    python examples/tsne.py --run LoRA=outputs/lora/features --run BA-LoRA=outputs/ba/features --steps 0 -1 \
        --out figures/tsne_sst2.png

Each ``--run NAME=PATH`` is a folder with ``features_step_<S>.npy`` / ``labels_step_<S>.npy`` (the trainer's dumps)
or with ``features.npy`` / ``labels.npy`` (``benchmarks/nlu_sst2.py --feature_dir``), or a ``features*.npy`` file
with its ``labels*.npy`` beside it. One ``--steps`` entry: the runs side by side (Figure 1); several: one row per
run, one column per step (the evolution figures 6-9); -1 is the last dumped step.
Every panel gets its silhouette score (scikit-learn, by gold label), printed and in the panel title:

* ``2-D``: on the t-SNE embedding, the number for the picture as drawn;
* ``features``: on the original features (cosine distance), which t-SNE's distortions do not affect.

Writes the PNG and a PDF beside it. The same rows are drawn in every panel (``--max_points`` subsample, seeded).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", nargs="+", action="extend", required=True, metavar="NAME=PATH",
                   help="a method's features folder or file (repeatable)")
    p.add_argument("--steps", nargs="+", type=int, default=[-1], help="dump steps to draw (-1: the last)")
    p.add_argument("--out", default="tsne.png", help="PNG path; a PDF is written beside it")
    p.add_argument("--max_points", type=int, default=2000)
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label_names", nargs="+", help="class names for the legend (default: the label values)")
    p.add_argument("--title", default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="OpenMP/BLAS threads for t-SNE (default 1: on a shared CPU more threads spin, not speed up)")
    return p.parse_args(argv)


def available_steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in folder.glob("features_step_*.npy")
                  if (m := re.fullmatch(r"features_step_(-?\d+)\.npy", f.name)))


def load_panel(path: Path, step: int) -> tuple[np.ndarray, np.ndarray, int | None]:
    """(features [N, D], labels [N], the step actually loaded or None)."""
    if path.is_file():
        labels = path.with_name(path.name.replace("features", "labels", 1))
        if not labels.exists():
            raise FileNotFoundError(f"{path}: no labels file {labels.name} beside it.")
        return np.load(path), np.load(labels), None
    if not path.is_dir():
        raise FileNotFoundError(f"No features folder or file at {path}.")
    steps = available_steps(path)
    if steps:
        chosen = steps[-1] if step == -1 else step
        if chosen not in steps:
            raise FileNotFoundError(f"{path}: no dump for step {step} (dumped steps: {steps}).")
        return np.load(path / f"features_step_{chosen}.npy"), np.load(path / f"labels_step_{chosen}.npy"), chosen
    if (path / "features.npy").exists():
        return np.load(path / "features.npy"), np.load(path / "labels.npy"), None
    raise FileNotFoundError(f"{path}: neither features_step_*.npy nor features.npy found.")


def silhouettes(features: np.ndarray, embedding: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import silhouette_score

    if len(np.unique(labels)) < 2:
        return {"2d": float("nan"), "features": float("nan")}
    return {"2d": float(silhouette_score(embedding, labels)),
            "features": float(silhouette_score(features, labels, metric="cosine"))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=args.threads):
        return draw(args, plt, TSNE)


def draw(args, plt, TSNE) -> dict:
    runs = []
    for spec in args.run:
        if "=" not in spec:
            raise SystemExit(f"--run expects NAME=PATH, got {spec!r}")
        name, path = spec.split("=", 1)
        runs.append((name, Path(path)))

    rng = np.random.default_rng(args.seed)
    panels, keep = [], None
    for name, path in runs:
        row = []
        for step in args.steps:
            features, labels, loaded = load_panel(path, step)
            if len(features) != len(labels):
                raise ValueError(f"{path}: {len(features)} feature rows but {len(labels)} labels.")
            if keep is None:
                n = len(labels)
                keep = np.sort(rng.choice(n, size=min(n, args.max_points), replace=False))
            if len(labels) <= keep[-1]:
                raise ValueError(f"{path}: {len(labels)} rows; every run must dump the same evaluation set.")
            row.append((name, loaded, features[keep].astype(np.float64), labels[keep]))  # step None: a final dump
        panels.append(row)

    # One step: the methods side by side (Figure 1). Several steps: a row per method, a column per step (Figs. 6-9).
    side_by_side = len(args.steps) == 1
    n_rows, n_cols = (1, len(panels)) if side_by_side else (len(panels), len(args.steps))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 4.0 * n_rows), squeeze=False)
    scores: dict = {}
    classes = np.unique(np.concatenate([p[3] for row in panels for p in row]))
    names = args.label_names or [str(c) for c in classes]
    colours = plt.get_cmap("tab10")
    for r, row in enumerate(panels):
        for c, (name, step, features, labels) in enumerate(row):
            perplexity = min(args.perplexity, (len(labels) - 1) / 3)
            embedding = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=args.seed).fit_transform(
                features)
            score = silhouettes(features, embedding, labels)
            scores[(name, step)] = score
            ax = axes[0][r] if side_by_side else axes[r][c]
            for i, cls in enumerate(classes):
                mask = labels == cls
                ax.scatter(embedding[mask, 0], embedding[mask, 1], s=5, alpha=0.7, color=colours(i % 10),
                           label=names[i] if i < len(names) else str(cls))
            step_text = "" if step is None else f" — step {step}"
            ax.set_title(f"{name}{step_text}\nsilhouette 2-D {score['2d']:.3f} | features {score['features']:.3f}",
                         fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            print(f"{name:>12s} {'final' if step is None else f'step {step}'}: silhouette (t-SNE 2-D) {score['2d']:.4f}, "
                  f"silhouette (features, cosine) {score['features']:.4f}, n = {len(labels)}", flush=True)
    axes[0][0].legend(loc="best", fontsize=8, markerscale=2)
    if args.title:
        fig.suptitle(args.title)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=150)
    fig.savefig(out.with_suffix(".pdf"))
    plt.close(fig)
    print(f"wrote {out} and {out.with_suffix('.pdf')}")
    return scores


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
