"""What a run leaves behind: per-sample JSONL (appended as samples finish, so a rerun resumes), a summary JSON and a
markdown table.

``<output_dir>/<task>.jsonl`` one record per finished sample (``id``, ``prompt``, ``generation``, ``extracted``,
``verdict``, ...); ``<task>.config.json`` the settings that produced them (a rerun with different settings
refuses to mix results unless ``--overwrite``); ``<task>_summary.json`` and ``<task>.md``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable


class ResultStore:
    def __init__(self, output_dir: str, task: str, config: dict, overwrite: bool = False):
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.task = task
        self.records_path = os.path.join(output_dir, f"{task}.jsonl")
        self.config_path = os.path.join(output_dir, f"{task}.config.json")
        self.summary_path = os.path.join(output_dir, f"{task}_summary.json")
        self.table_path = os.path.join(output_dir, f"{task}.md")
        if overwrite:
            for path in (self.records_path, self.config_path, self.summary_path, self.table_path):
                if os.path.exists(path):
                    os.remove(path)
        if os.path.exists(self.config_path):
            with open(self.config_path) as f:
                previous = json.load(f)
            if previous != json.loads(json.dumps(config)):
                changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
                raise ValueError(f"{self.records_path} holds results made with other settings (differing: "
                                 f"{', '.join(changed)}). Use another --output_dir, or --overwrite to start over.")
        else:
            with open(self.config_path, "w") as f:
                json.dump(config, f, indent=2)

    def load(self) -> dict:
        """Finished records by sample id; a torn last line (killed mid-write) is ignored and redone."""
        done = {}
        if os.path.exists(self.records_path):
            with open(self.records_path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    done[str(record["id"])] = record
        return done

    def append(self, records: Iterable[dict]) -> None:
        with open(self.records_path, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
            else:
                torn = False
        with open(self.records_path, "a") as f:
            if torn:  # a previous run died mid-line: keep that fragment on its own (ignored) line
                f.write("\n")
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def write_summary(self, summary: dict, table: str) -> None:
        with open(self.summary_path, "w") as f:
            json.dump(summary, f, indent=2)
        with open(self.table_path, "w") as f:
            f.write(table)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
