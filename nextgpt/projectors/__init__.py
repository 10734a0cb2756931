"""Trained bridges between the frozen parts: encoder -> LLM (input) and LLM -> decoders (output)."""

from nextgpt.projectors.input import (
    INPUT_PROJECTOR_KINDS,
    GroupingProjector,
    LinearProjector,
    build_input_projector,
)
from nextgpt.projectors.output import OutputProjector

__all__ = [
    "INPUT_PROJECTOR_KINDS",
    "GroupingProjector",
    "LinearProjector",
    "OutputProjector",
    "build_input_projector",
]
