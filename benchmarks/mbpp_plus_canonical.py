"""Every MBPP+ canonical solution through balora's MBPP+ scorer (EvalPlus's checker inside the sandbox), in one run.

Prints the time EvalPlus's ground-truth computation takes here, the sandbox run's time, how many canonical solutions
pass base and base + plus, and every task that does not, with the checker's reason. Not a test: it takes ~15 min on
2 busy CPU cores for the 399 tasks shipped in ``eval/data`` (Mbpp/599's canonical solution alone ~2 min).

    python benchmarks/mbpp_plus_canonical.py                      # all 399 shipped tasks
    python benchmarks/mbpp_plus_canonical.py --data_file MbppPlus.jsonl --workers 8
    python benchmarks/mbpp_plus_canonical.py --tasks Mbpp/2,Mbpp/737
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from eval.tasks.code import MBPPPlus  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_file", help="default: the shipped 399-task file")
    parser.add_argument("--tasks", help="comma-separated task ids (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    task = MBPPPlus(data_file=args.data_file, workers=args.workers)
    samples = task.load()
    if args.tasks:
        wanted = set(args.tasks.split(","))
        samples = [s for s in samples if s["id"] in wanted]
    start = time.monotonic()
    for sample in samples:
        task.reference_times(sample)
    truth_s = time.monotonic() - start
    start = time.monotonic()
    records = task.score(samples, [s["canonical_solution"] for s in samples])
    sandbox_s = time.monotonic() - start
    n = len(samples)
    base = sum(r["passed_base"] for r in records)
    plus = sum(r["passed"] for r in records)
    print(f"{n} tasks; EvalPlus ground truth {truth_s:.0f} s; sandbox run {sandbox_s:.0f} s "
          f"(backstop {task.sandbox.limits.timeout_s:.0f} s, {args.workers} workers)")
    print(f"canonical solutions passing: base {base}/{n}, base + plus {plus}/{n}")
    for sample, record in zip(samples, records):
        if not record["passed"]:
            reason = (record["error"] or "").strip().splitlines()[-1:] or [record["verdict"]]
            print(f"  {sample['id']}: base {'pass' if record['passed_base'] else 'FAIL'}, {record['verdict']}: "
                  f"{reason[0][:200]}")


if __name__ == "__main__":
    main()
