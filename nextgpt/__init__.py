"""NExT-GPT, the any-to-any multimodal LLM."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nextgpt.config import NextGPTConfig

__all__ = ["NextGPT", "NextGPTConfig"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from nextgpt.model import NextGPT


def __getattr__(name: str):
    # the model pulls in torch, transformers and diffusers: import it only when asked for
    if name == "NextGPT":
        from nextgpt.model import NextGPT

        return NextGPT
    raise AttributeError(name)
