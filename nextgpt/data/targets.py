"""Target media for the diffusion loss, in the layout each decoder's `denoising_loss` takes.

Image (3, H, W) and video (F, 3, H, W) in [-1, 1] at the decoder's output size; audio a mono
waveform at the vocoder's rate, cut or padded to the decoder's clip length. Sizes are read once
from the decoders so that data-loading workers carry numbers, not pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nextgpt import media as media_io
from nextgpt.encoders.preprocess import resample


@dataclass
class TargetSize:
    height: int = 0
    width: int = 0
    frames: int = 0
    sample_rate: int = 0
    samples: int = 0


class TargetMedia:
    """Loads diffusion targets from files for the decoders of one model."""

    def __init__(self, decoders: dict) -> None:
        self.sizes: dict[str, TargetSize] = {}
        for modality, decoder in decoders.items():
            cfg = decoder.config
            if modality == "audio":
                rate = decoder.sample_rate
                self.sizes[modality] = TargetSize(
                    sample_rate=rate, samples=int(round(cfg.audio_seconds * rate))
                )
                continue
            pipe = decoder.pipeline
            native = pipe.unet.config.sample_size * pipe.vae_scale_factor
            self.sizes[modality] = TargetSize(
                height=cfg.height or native, width=cfg.width or native, frames=cfg.num_frames
            )

    def __call__(self, modality: str, path: Path) -> torch.Tensor:
        size = self.sizes[modality]
        if modality == "image":
            return _pixels(media_io.load_image(path), size)
        if modality == "video":
            frames, _ = media_io.load_video(path)
            pick = np.linspace(0, len(frames) - 1, size.frames).round().astype(int)
            return torch.stack([_pixels(Image.fromarray(frames[i]), size) for i in pick])
        wave, rate = media_io.load_audio(path)
        wave = resample(wave, rate, size.sample_rate)[: size.samples]
        return torch.nn.functional.pad(wave, (0, size.samples - wave.shape[0]))


def _pixels(image: Image.Image, size: TargetSize) -> torch.Tensor:
    """Cover-resize and center-crop to (height, width); (3, H, W) in [-1, 1]."""
    w, h = image.size
    scale = max(size.width / w, size.height / h)
    new_w, new_h = max(size.width, round(w * scale)), max(size.height, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size.width) // 2, (new_h - size.height) // 2
    image = image.crop((left, top, left + size.width, top + size.height))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return x.permute(2, 0, 1).contiguous()
