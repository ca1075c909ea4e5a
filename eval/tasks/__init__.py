"""The benchmarks the paper reports, by CLI name (``mbpp`` is Google's full test split, ``mbpp_plus`` EvalPlus's)."""

from .code import MBPP, HumanEval, MBPPPlus
from .gsm8k import GSM8K
from .math import MATH
from .mt_bench import MTBench

TASKS = {task.name: task for task in (GSM8K, MATH, HumanEval, MBPP, MBPPPlus, MTBench)}

__all__ = ["TASKS", "GSM8K", "MATH", "HumanEval", "MBPP", "MBPPPlus", "MTBench"]
