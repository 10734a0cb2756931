"""What an output projector receives and returns for one request, with decoding switched off.

Shared by the probes that study the output side (`signal_states.py`, `conditioning_mix.py`,
`video_conditioning_noise.py`, `linear_output_map.py`): each asks the model for media, keeps the
LLM's hidden states at the signal tokens (the projector's input) and the conditioning it hands the
decoder, and needs no media drawn while it does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nextgpt.mini.evaluate import generation_items
from nextgpt.mini.world import World
from nextgpt.model import NextGPT


class ProjectorTap:
    """Wraps `model`'s `modality` output projector (this instance only) and stubs its decoder.

    `decode` keeps the decoder's own `generate`, for probes that draw from conditioning of their
    own afterwards.
    """

    def __init__(self, model: NextGPT, modality: str) -> None:
        self.model, self.modality = model, modality
        projector = model.output_projectors[modality]
        project = projector.forward
        self._seen: dict[str, torch.Tensor] = {}

        def keep(hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
            cond = project(hidden, embeds)
            self._seen.update(states=hidden[0].detach().clone(), cond=cond[0].detach().clone())
            return cond

        projector.forward = keep  # the instance attribute shadows the method: only this model
        decoder = model.decoders[modality]
        self.decode: Callable[..., list] = decoder.generate
        decoder.generate = lambda cond, **options: [None]  # no media needed to read the states

    def ask(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(signal-token states, conditioning) of one request, as the model answers it."""
        self._seen.clear()
        self.model.generate(prompt, modalities=[self.modality], max_new_tokens=30, seed=0)
        if not self._seen:
            raise RuntimeError(f"the model emitted no {self.modality} signal tokens for {prompt!r}")
        return self._seen["states"], self._seen["cond"]

    def requests(
        self, world: World, count: int = 48
    ) -> dict[str, tuple[torch.Tensor, list[dict[str, str]]]]:
        """Per split, the float conditioning of the eval's `count` generation requests (stacked)
        and their gold attributes: what the probes that redraw or refit the conditioning start
        from."""
        out = {}
        for split in ("train", "heldout"):
            items = generation_items(world, split, self.modality, count)
            conds = torch.stack([self.ask(item.prompt)[1].float() for item in items])
            out[split] = (conds, [item.attributes for item in items])
        return out
