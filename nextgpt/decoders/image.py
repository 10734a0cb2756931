"""Image decoder: Stable Diffusion (SD-1.5 77x768, SD-2 77x1024, both read from their configs)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from nextgpt.decoders.base import CrossAttentionDecoder, vae_latents


class ImageDecoder(CrossAttentionDecoder):
    modality = "image"
    pipeline_class = StableDiffusionPipeline
    size_keys = ("height", "width")

    def _sample(self, pipe: Any, **kwargs: Any) -> list[Image.Image]:
        kwargs.setdefault("height", self.config.height)
        kwargs.setdefault("width", self.config.width)
        return pipe(**kwargs, output_type="pil").images

    def _latents(
        self, pipe: Any, targets: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        if targets.dim() != 4 or targets.shape[1] != 3:
            raise ValueError(f"image targets must be (B, 3, H, W) in [-1, 1], got {targets.shape}")
        return vae_latents(pipe, targets, generator)
