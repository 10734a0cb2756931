"""The multimodal encoder (ImageBind architecture) and its input preprocessing."""

from nextgpt.encoders.imagebind import EncoderOutput, ImageBindEncoder
from nextgpt.encoders.preprocess import (
    kaldi_fbank,
    preprocess_audio,
    preprocess_image,
    preprocess_video,
    resample,
)

__all__ = [
    "EncoderOutput",
    "ImageBindEncoder",
    "kaldi_fbank",
    "preprocess_audio",
    "preprocess_image",
    "preprocess_video",
    "resample",
]
