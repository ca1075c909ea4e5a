"""Benchmark rows: shipped in ``eval/data`` (GSM8K test, MT-Bench), from the Hugging Face Hub (MATH, MBPP), or from a
local file (``--data_file``) to run offline. Every problem with a file is a ``ValueError`` naming the file and line."""

from __future__ import annotations

import csv
import gzip
import json
import os
from importlib import resources


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl / .jsonl.gz / .json (a list, or {"data"|"rows": [...]}) / .parquet / .csv file."""
    if not os.path.isfile(path):
        raise ValueError(f"no such data file: {path}")
    name = path.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            if name.endswith((".jsonl", ".jsonl.gz")):
                from balora_trl.dataset_formats import json_lines

                rows = list(json_lines(path, f))
            elif name.endswith((".json", ".json.gz")):
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
                if isinstance(data, dict):
                    data = data.get("data", data.get("rows"))
                if not isinstance(data, list):
                    raise ValueError(f"{path}: expected a list of rows (or {{'data': [...]}})")
                rows = data
            elif name.endswith(".csv"):
                rows = list(csv.DictReader(f))
            else:
                raise ValueError(f"{path}: unsupported data file type (use .jsonl, .json, .parquet or .csv)")
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def hub_rows(name: str, config: str | None = None, split: str = "test", hint: str = "") -> list[dict]:
    """A split from the Hugging Face Hub (cached by ``datasets``; honours HF_HUB_OFFLINE). Failing to reach it is a
    one-line ``ValueError`` that says to pass ``--data_file``."""
    from datasets import load_dataset

    try:
        return list(load_dataset(name, config, split=split))
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"could not load {name}{'/' + config if config else ''} ({split}) from the Hub ({reason}); "
                         f"offline, pass a local copy with --data_file{' (' + hint + ')' if hint else ''}") from None


def packaged(name: str) -> str:
    """Path of a data file shipped inside the ``eval`` package (MT-Bench questions, judge prompts, GSM8K test...)."""
    return str(resources.files("eval") / "data" / name)


def limit_rows(rows: list, limit: int | None) -> list:
    return rows if limit is None or limit < 0 else rows[:limit]
