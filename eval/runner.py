"""Run one task end to end: skip what a previous run finished, generate and score the rest in chunks (each chunk is
saved as soon as it is scored, so an interrupted run loses at most one chunk), then summarise everything."""

from __future__ import annotations

from tqdm.auto import tqdm

from .report import ResultStore
from .tasks.base import Generator, Task


def run_task(task: Task, generator: Generator, store: ResultStore, chunk_size: int = 64, meta: dict | None = None) -> dict:
    samples = task.samples()
    ids = [str(s["id"]) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{task.name}: sample ids are not unique.")
    done = store.load()
    todo = [s for s in samples if str(s["id"]) not in done]
    resumed = len(samples) - len(todo)
    with tqdm(total=len(samples), initial=resumed, desc=task.name, unit="sample") as bar:
        for start in range(0, len(todo), chunk_size):
            chunk = todo[start:start + chunk_size]
            records = task.evaluate(chunk, generator)
            store.append(records)
            done.update((str(r["id"]), r) for r in records)
            bar.update(len(chunk))
    records = [done[i] for i in ids]
    summary, table = task.summarize(records)
    summary = {"task": task.name, **summary, "resumed": resumed, "records": store.records_path, **(meta or {})}
    if store.replaced:
        summary["replaced"] = {"moved_to": store.replaced[0], "reason": store.replaced[1]}
    store.write_summary(summary, table)
    return summary
