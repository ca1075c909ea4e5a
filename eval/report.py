"""What a run leaves behind: per-sample JSONL (appended as samples finish, so a rerun resumes), a summary JSON and a
markdown table.

``<output_dir>/<task>.jsonl`` one record per finished sample (``id``, ``prompt``, ``generation``, ``extracted``,
``verdict``, ...); ``<task>.config.json`` the settings and the model identity that produced them;
``<task>_summary.json`` and ``<task>.md``.

A rerun resumes only what the same model made with the same settings. Other settings (protocol, tokens, sampling,
prompt template, data): refused, since mixing them is a mistake (``--overwrite`` or another ``--output_dir``).
Another model at the same path (``balora merge --force`` rewrote it), another backend or dtype: the earlier files
are moved to ``<task>.replaced-<time>/`` and the run starts over, saying why — never reported as resumed.

One run writes a task's files at a time: the store holds ``<task>.claim`` (`balora_trl.claims`: the writer's pid)
while it is open, and a second run on the same ``--output_dir`` and task stops with one line instead of appending
its generations between the first one's. A claim whose writer died (killed) is taken over.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from balora_trl import claims

IDENTITY = "model_identity"


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _identity_change(old: dict, new: dict) -> str:
    """One line: what differs between two model identities."""
    parts = []
    for key in _differences(old, new):
        if key in ("files", "base_files"):
            a, b = old.get(key) or {}, new.get(key) or {}
            changed = [n for n in sorted(set(a) | set(b)) if a.get(n) != b.get(n)]
            shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
            parts.append(f"{'base model' if key == 'base_files' else 'model'} files changed ({shown})")
        else:
            parts.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return "; ".join(parts)


class ResultStore:
    """A task's files in ``output_dir``, held by this process until `close` (a context manager)."""

    def __init__(self, output_dir: str, task: str, config: dict, overwrite: bool = False, log=None):
        """``config`` holds the run's settings and, under ``model_identity``, what identifies the model."""
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.task = task
        self.records_path = os.path.join(output_dir, f"{task}.jsonl")
        self.config_path = os.path.join(output_dir, f"{task}.config.json")
        self.summary_path = os.path.join(output_dir, f"{task}_summary.json")
        self.table_path = os.path.join(output_dir, f"{task}.md")
        self.claim_path = Path(output_dir) / f"{task}.claim"
        if not claims.claim(self.claim_path):
            raise ValueError(f"{self.records_path} is being written by another run (pid "
                             f"{claims.owner_of(self.claim_path)}); wait for it to finish, or use another --output_dir")
        try:
            self._open(config, overwrite, log)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        claims.release(self.claim_path)

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self, config: dict, overwrite: bool, log) -> None:
        task, output_dir = self.task, self.output_dir
        if overwrite:
            for path in (self.records_path, self.config_path, self.summary_path, self.table_path):
                if os.path.exists(path):
                    os.remove(path)
        self.replaced = None  # (folder, reason) when earlier results of another model were moved aside
        config = json.loads(json.dumps(config))
        if os.path.exists(self.config_path):
            with open(self.config_path) as f:
                previous = json.load(f)
            old_identity, new_identity = previous.pop(IDENTITY, {}), config.get(IDENTITY, {})
            settings = {k: v for k, v in config.items() if k != IDENTITY}
            if previous != settings:
                raise ValueError(f"{self.records_path} holds results made with other settings (differing: "
                                 f"{', '.join(_differences(previous, settings))}); use another --output_dir, or "
                                 f"--overwrite to start over")
            if old_identity != new_identity:
                reason = _identity_change(old_identity, new_identity)
                self.replaced = (self._move_aside(), reason)
                print(f"[{task}] not resuming: the results in {output_dir} were made by another model ({reason}); "
                      f"moved them to {self.replaced[0]} and starting over.", file=log or sys.stderr)
        if not os.path.exists(self.config_path):
            with open(self.config_path, "w") as f:
                json.dump(config, f, indent=2)

    def _move_aside(self) -> str:
        folder = os.path.join(self.output_dir, f"{self.task}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
        suffix, unique = 1, folder
        while os.path.exists(unique):
            suffix += 1
            unique = f"{folder}-{suffix}"
        os.makedirs(unique)
        for path in (self.records_path, self.config_path, self.summary_path, self.table_path):
            if os.path.exists(path):
                os.replace(path, os.path.join(unique, os.path.basename(path)))
        return unique

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
