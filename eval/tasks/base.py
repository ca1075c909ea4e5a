"""What every task is: samples in, records out, a summary over the records.

A task runs under a named *protocol* (``protocols``: name -> the generation settings it implies: ``max_new_tokens``,
``prompt_suffix`` appended to the rendered prompt, extra ``stop`` strings). ``default`` is the clean, lenient one;
``authors`` reproduces the BA-LoRA release's scripts where they differ. The protocol is saved in the run's settings and
summary and printed in the table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from ..backends import Backend, GenerationParams
from ..benchmark_rows import hub_rows
from ..prompting import Prompt, PromptFormatter, display
from ..report import markdown_table

PROTOCOL_NAMES = ("default", "authors", "authors_inference")  # the last: gsm8k only (eval/tasks/gsm8k.py)


@dataclass
class Generator:
    """A backend, the model's prompt format and the run's sampling parameters, bound together for tasks."""

    backend: Backend
    formatter: PromptFormatter
    params: GenerationParams
    prompt_suffix: str = ""

    def prompt(self, turns: Sequence[str], answers: Sequence[str] = ()) -> Prompt:
        return self.formatter.build(turns, answers, suffix=self.prompt_suffix)

    def generate(self, prompts: Sequence[Prompt], **overrides) -> list[str]:
        """``overrides`` replace fields of the run's parameters (MT-Bench's per-category temperature)."""
        params = dataclasses.replace(self.params, **overrides) if overrides else self.params
        return self.backend.generate(prompts, params)

    def display(self, prompt: Prompt) -> str:
        return display(prompt, self.backend.tokenizer)


class Task:
    """Subclasses set ``name`` and ``protocols`` and implement ``load``, ``instruction`` and ``score``."""

    name: str = ""
    max_new_tokens: int = 512  # default when --max_new_tokens is not given (the protocol's, if it sets one)
    # ``template_stop``: whether the prompt template's next-instruction header ends an answer. The release's
    # generation script (utils/gen_vllm.py, the `authors` protocol) stops at nothing: its answers run on.
    protocols: dict[str, dict] = {"default": {}, "authors": {"template_stop": False}}
    hub_hint: str = ""  # what to pass as --data_file when the Hub is out of reach

    def __init__(self, data_file: str | None = None, dataset: str | None = None, limit: int | None = None,
                 protocol: str = "default", **options):
        if protocol not in self.protocols:
            raise ValueError(f"{self.name}: unknown protocol {protocol!r}; choose one of {', '.join(self.protocols)}.")
        self.data_file = data_file
        self.dataset = dataset
        self.limit = limit
        self.protocol = protocol
        self.options = options

    @property
    def settings(self) -> dict:
        """The generation settings of the protocol: max_new_tokens, prompt_suffix, stop, template_stop."""
        spec = self.protocols[self.protocol]
        return {"max_new_tokens": spec.get("max_new_tokens", self.max_new_tokens),
                "prompt_suffix": spec.get("prompt_suffix", ""), "stop": tuple(spec.get("stop", ())),
                "template_stop": spec.get("template_stop", True)}

    def hub_rows(self, name: str, config: str | None = None, split: str = "test") -> list[dict]:
        return hub_rows(name, config, split, hint=self.hub_hint)

    def load(self) -> list[dict]:
        """Samples, each with a unique ``id``."""
        raise NotImplementedError

    def samples(self) -> list[dict]:
        """``load()``, once (the CLI loads before the model, to fail early on a bad data file)."""
        if getattr(self, "_samples", None) is None:
            self._samples = self.load()
        return self._samples

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
        """Accuracy over ``correct`` under the run's protocol, and under every protocol recorded in ``by_protocol``
        (the same generations scored each way)."""
        n = len(records)
        correct = sum(bool(r["correct"]) for r in records)
        accuracy = 100.0 * correct / n if n else 0.0
        summary = {"metric": "accuracy", "protocol": self.protocol, "accuracy": accuracy, "correct": correct, "n": n}
        rows = [[self.name, self.protocol, n, correct, accuracy]]
        others = sorted({p for r in records for p in r.get("by_protocol", {})} - {self.protocol})
        if others and all("by_protocol" in r for r in records):
            summary["accuracy_by_protocol"] = {self.protocol: accuracy}
            for other in others:
                count = sum(bool(r["by_protocol"][other]["correct"]) for r in records)
                summary["accuracy_by_protocol"][other] = 100.0 * count / n if n else 0.0
                rows.append([self.name, f"{other} (scoring only, same generations)", n, count,
                             summary["accuracy_by_protocol"][other]])
        return summary, markdown_table(["task", "protocol", "n", "correct", "accuracy (%)"], rows)
