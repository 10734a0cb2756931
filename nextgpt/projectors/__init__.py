"""Trained bridges between the frozen parts: encoder -> LLM (input) and LLM -> decoders (output)."""

from nextgpt.projectors.input import (
    INPUT_PROJECTOR_KINDS,
    GroupingProjector,
    LinearProjector,
    build_input_projector,
)
from nextgpt.projectors.output import (
    OUTPUT_PROJECTOR_KINDS,
    LinearOutputProjector,
    OutputProjector,
    build_output_projector,
)

__all__ = [
    "INPUT_PROJECTOR_KINDS",
    "OUTPUT_PROJECTOR_KINDS",
    "GroupingProjector",
    "LinearOutputProjector",
    "LinearProjector",
    "OutputProjector",
    "build_input_projector",
    "build_output_projector",
]
