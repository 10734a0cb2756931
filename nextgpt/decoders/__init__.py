"""Frozen diffusion decoders (image, video, audio) driven by NExT-GPT's projected embeddings."""

from __future__ import annotations

import torch

from nextgpt.config import DecoderConfig
from nextgpt.decoders.audio import AudioDecoder
from nextgpt.decoders.base import Decoder
from nextgpt.decoders.image import ImageDecoder
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.decoders.video import VideoDecoder

DECODERS: dict[str, type[Decoder]] = {
    "image": ImageDecoder,
    "video": VideoDecoder,
    "audio": AudioDecoder,
}


def build_decoder(
    config: DecoderConfig, seed: int = 0, *, device: str | torch.device | None = None
) -> Decoder:
    """The decoder for `config.modality`; nothing is loaded until it is first used."""
    if config.modality not in DECODERS:
        raise ValueError(
            f"unknown decoder modality {config.modality!r}; expected one of {list(DECODERS)}"
        )
    return DECODERS[config.modality](config, seed, device=device)


__all__ = [
    "DECODERS",
    "AudioDecoder",
    "Decoder",
    "DecoderConfig",
    "ImageDecoder",
    "VideoDecoder",
    "build_decoder",
    "build_tiny_pipeline",
]
