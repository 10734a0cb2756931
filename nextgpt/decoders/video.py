"""Video decoder: a text-to-video UNet3D pipeline (Zeroscope v2 576w, 77x1024)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers import TextToVideoSDPipeline

from nextgpt.decoders.base import CrossAttentionDecoder, vae_latents

# The frame rate generated videos are written at: text-to-video models return frames, no timing
# (Zeroscope's clips are made at 8 fps).
OUTPUT_FPS = 8.0


class VideoDecoder(CrossAttentionDecoder):
    modality = "video"
    pipeline_class = TextToVideoSDPipeline
    size_keys = ("num_frames", "height", "width")

    def _sample(self, pipe: Any, **kwargs: Any) -> list[np.ndarray]:
        """Each video as uint8 frames (F, H, W, 3)."""
        kwargs.setdefault("num_frames", self.config.num_frames)
        kwargs.setdefault("height", self.config.height)
        kwargs.setdefault("width", self.config.width)
        frames = pipe(**kwargs, output_type="np").frames  # (B, F, H, W, 3) floats in [0, 1]
        return [(np.clip(v, 0.0, 1.0) * 255).round().astype(np.uint8) for v in frames]

    def _latents(
        self, pipe: Any, targets: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Frames are encoded one by one, then laid out (B, C, F, h, w) as the UNet3D takes them."""
        if targets.dim() != 5 or targets.shape[2] != 3:
            raise ValueError(
                f"video targets must be (B, F, 3, H, W) in [-1, 1], got {targets.shape}"
            )
        b, f = targets.shape[:2]
        latents = vae_latents(pipe, targets.flatten(0, 1), generator)
        return latents.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)
