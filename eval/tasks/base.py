"""What every task is: samples in, records out, a summary over the records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..backends import Backend, GenerationParams
from ..prompting import Prompt, PromptFormatter, display
from ..report import markdown_table


@dataclass
class Generator:
    """A backend, the model's prompt format and the run's sampling parameters, bound together for tasks."""

    backend: Backend
    formatter: PromptFormatter
    params: GenerationParams

    def prompt(self, turns: Sequence[str], answers: Sequence[str] = ()) -> Prompt:
        return self.formatter.build(turns, answers)

    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        return self.backend.generate(prompts, self.params)

    def display(self, prompt: Prompt) -> str:
        return display(prompt, self.backend.tokenizer)


class Task:
    """Subclasses set ``name`` and ``max_new_tokens`` and implement ``load``, ``instruction`` and ``score``."""

    name: str = ""
    max_new_tokens: int = 512  # default when --max_new_tokens is not given

    def __init__(self, data_file: str | None = None, dataset: str | None = None, limit: int | None = None, **options):
        self.data_file = data_file
        self.dataset = dataset
        self.limit = limit
        self.options = options

    def load(self) -> list[dict]:
        """Samples, each with a unique ``id``."""
        raise NotImplementedError

    def instruction(self, sample: dict) -> str:
        raise NotImplementedError

    def score(self, samples: list[dict], generations: list[str]) -> list[dict]:
        """Per sample: at least ``extracted`` and ``verdict``."""
        raise NotImplementedError

    def evaluate(self, samples: list[dict], generator: Generator) -> list[dict]:
        """Single-turn: prompt, generate, score. Returns one record per sample."""
        prompts = [generator.prompt([self.instruction(s)]) for s in samples]
        generations = generator.generate(prompts)
        scores = self.score(samples, generations)
        return [{"id": s["id"], "prompt": generator.display(p), "generation": g, **sc}
                for s, p, g, sc in zip(samples, prompts, generations, scores)]

    def summarize(self, records: list[dict]) -> tuple[dict, str]:
        """Accuracy over ``correct``; tasks with other metrics override."""
        n = len(records)
        correct = sum(bool(r["correct"]) for r in records)
        accuracy = 100.0 * correct / n if n else 0.0
        summary = {"metric": "accuracy", "accuracy": accuracy, "correct": correct, "n": n}
        return summary, markdown_table(["task", "n", "correct", "accuracy (%)"], [[self.name, n, correct, accuracy]])
