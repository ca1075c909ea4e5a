"""Benchmark rows from the Hugging Face Hub by default, or from a local file (``--data_file``) to run offline."""

from __future__ import annotations

import csv
import gzip
import json
import os
from importlib import resources


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl / .jsonl.gz / .json (a list, or {"data"|"rows": [...]}) / .parquet / .csv file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No data file at {path}")
    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return [json.loads(line) for line in f if line.strip()]
        if name.endswith((".json", ".json.gz")):
            data = json.load(f)
            if isinstance(data, dict):
                data = data.get("data", data.get("rows"))
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a list of rows (or {{'data': [...]}})")
            return data
        if name.endswith(".csv"):
            return list(csv.DictReader(f))
    raise ValueError(f"{path}: unsupported data file type (use .jsonl, .json, .parquet or .csv)")


def hub_rows(name: str, config: str | None = None, split: str = "test") -> list[dict]:
    """A split from the Hugging Face Hub (cached by ``datasets``; honours HF_HUB_OFFLINE)."""
    from datasets import load_dataset

    try:
        return list(load_dataset(name, config, split=split))
    except Exception as e:
        raise RuntimeError(f"Could not load {name}{'/' + config if config else ''} ({split}) from the Hub: {e}. "
                           f"Offline? Pass a local copy with --data_file.") from e


def packaged(name: str) -> str:
    """Path of a data file shipped inside the ``eval`` package (MT-Bench questions, judge prompts, ...)."""
    return str(resources.files("eval") / "data" / name)


def limit_rows(rows: list, limit: int | None) -> list:
    return rows if limit is None or limit < 0 else rows[:limit]
