"""The benchmarks the paper reports, by CLI name."""

from .code import MBPP, HumanEval
from .gsm8k import GSM8K
from .math import MATH
from .mt_bench import MTBench

TASKS = {task.name: task for task in (GSM8K, MATH, HumanEval, MBPP, MTBench)}

__all__ = ["TASKS", "GSM8K", "MATH", "HumanEval", "MBPP", "MTBench"]
