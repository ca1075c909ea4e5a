"""Inheritance lab (issues 8, 19): noisy, imbalanced pretraining from scratch, then Full FT / LoRA / PiSSA / BA-LoRA.

    python benchmarks/inheritance_lab.py            # default run, < 1 h on 2 CPU cores -> benchmarks/results/inheritance_lab/
    python benchmarks/inheritance_lab.py --quick    # smoke test, < 5 min -> $TMPDIR/balora_lab_quick/
    python benchmarks/inheritance_lab.py --sweep frontier   # the pre-registered λ / KL / accuracy frontier (lab v4)
                                                            # -> benchmarks/results/inheritance_lab/frontier_v4/
    python benchmarks/inheritance_lab.py --help

Everything lives in the `lab` package (lab/run.py describes the stages). Pretrained checkpoints and per-job results
are cached under ~/.cache/balora_lab (``--cache_dir``); the results folder gets only results.md, results.json and
the plots.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from lab.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
