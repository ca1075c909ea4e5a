"""Saving BA-LoRA adapters, PiSSA -> LoRA conversion and merged checkpoints (issue 4, in progress)."""


class BALoraSaveMixin:
    """Save-time behaviour mixed into the BA-LoRA trainers (filled in by the adapter-lifecycle work)."""
