"""Audio decoder: AudioLDM, conditioned through its UNet's class embedding on a CLAP text vector.

Its conditioning is one L2-normalised CLAP text embedding per clip, shape (1, D) per item here,
passed to the pipeline as (B, D). AudioLDM's UNet only ever sees unit vectors (the pipeline
normalises the CLAP embeddings it computes, but passes `prompt_embeds` given to it as they are),
so a conditioning from elsewhere (an output projector) is put on that unit sphere here, when
sampling and in `denoising_loss` alike (`on_clap_sphere`).

Training targets are waveforms; they become log-mel spectrograms the way AudioLDM made them
(peak-normalised, STFT magnitude, Slaney mel, natural log) with the vocoder's own sample rate, hop
and number of bins, so the VAE sees what it was trained on.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from diffusers import AudioLDMPipeline
from transformers.audio_utils import mel_filter_bank

from nextgpt.decoders.base import Decoder, vae_latents

LOG_FLOOR = 1e-5  # AudioLDM clamps mel magnitudes here before the log


def mel_hop(vocoder_config: Any) -> int:
    """Waveform samples per mel frame: the vocoder's total upsampling."""
    return math.prod(vocoder_config.upsample_rates)


@lru_cache(maxsize=8)
def _slaney_bank(n_fft: int, mels: int, rate: int) -> torch.Tensor:
    """(freq, mels) Slaney mel filters as AudioLDM made its spectrograms; cached, since every
    training step asks for the same bank."""
    bank = mel_filter_bank(
        num_frequency_bins=n_fft // 2 + 1,
        num_mel_filters=mels,
        min_frequency=0.0,
        max_frequency=rate / 2,
        sampling_rate=rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return torch.from_numpy(bank).float()


def mel_magnitude(wav: torch.Tensor, vocoder_config: Any) -> torch.Tensor:
    """(B, samples) -> (B, frames, mels) mel magnitudes, one frame per vocoder hop (centred STFT,
    window 4 hops rounded up to a power of two: 1024 for AudioLDM's 160-sample hop). `log_mel`
    takes their log after peak-normalising; the mini vocoder's loss compares them unnormalised."""
    hop = mel_hop(vocoder_config)
    n_fft = 2 ** math.ceil(math.log2(4 * hop))
    window = torch.hann_window(n_fft, device=wav.device)
    spec = torch.stft(wav, n_fft, hop, n_fft, window, center=True, return_complex=True).abs()
    rate = int(vocoder_config.sampling_rate)
    bank = _slaney_bank(n_fft, int(vocoder_config.model_in_dim), rate).to(wav.device)
    return spec.transpose(1, 2) @ bank


def on_clap_sphere(cond: torch.Tensor) -> torch.Tensor:
    """`cond` (..., D) scaled to unit length, as AudioLDM's CLAP text embeddings are.

    Why: an output projector fitted by L2 to unit targets shrinks towards their mean where it is
    unsure, on requests unlike its training ones (nextgpt-mini's held-out audio requests came out
    at norm 0.83 against 1.00 on train), and the UNet, trained on unit vectors only, draws a
    shrunken vector as something else. Only the direction carries meaning in CLAP's space.
    """
    return torch.nn.functional.normalize(cond, dim=-1)


class AudioDecoder(Decoder):
    modality = "audio"
    pipeline_class = AudioLDMPipeline
    size_keys = ("seconds",)

    def _tiny_shape(self) -> tuple[int, int]:
        return 1, self.config.tiny.projection_dim

    def _pretrained_shape(self) -> tuple[int, int]:
        unet = self._require_json("unet")
        width = unet.get("projection_class_embeddings_input_dim")
        if unet.get("class_embed_type") != "simple_projection" or width is None:
            raise ValueError(
                f"{self.source}: not an AudioLDM UNet (no simple_projection class embed)"
            )
        return 1, int(width)

    @property
    def sample_rate(self) -> int:
        """The vocoder's sample rate: of generated waveforms and of `denoising_loss` targets."""
        if self.is_loaded:
            return int(self.pipeline.vocoder.config.sampling_rate)
        if self.config.pretrained is None:
            return self.config.tiny.sample_rate
        return int(self._require_json("vocoder")["sampling_rate"])

    def _encode(self, pipe: Any, captions: list[str]) -> torch.Tensor:
        # normalised CLAP text_embeds (B, D), as AudioLDM itself conditions
        return pipe._encode_prompt(captions, pipe._execution_device, 1, False).unsqueeze(1)

    def _sample(self, pipe: Any, **kwargs: Any) -> list[tuple[np.ndarray, int]]:
        """Each clip as (float32 waveform, sample rate)."""
        seconds = kwargs.pop("seconds", self.config.audio_seconds)
        kwargs["prompt_embeds"] = on_clap_sphere(kwargs["prompt_embeds"][:, 0])
        # the empty caption's own CLAP embedding (`negative_embeddings`): unit already
        kwargs["negative_prompt_embeds"] = kwargs["negative_prompt_embeds"][:, 0]
        audios = pipe(**kwargs, audio_length_in_s=seconds, output_type="np").audios
        rate = int(pipe.vocoder.config.sampling_rate)
        return [(np.asarray(a, dtype=np.float32), rate) for a in audios]

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, samples) waveforms at `sample_rate` -> (B, T, n_mels) log-mel spectrograms.

        One frame per vocoder hop (T = samples // hop), padded with silence to a multiple of the
        VAE's downsampling, as the pipeline rounds its own spectrogram length.
        """
        if waveform.dim() != 2:
            raise ValueError(f"audio targets must be (B, samples), got {tuple(waveform.shape)}")
        pipe = self.pipeline
        cfg = pipe.vocoder.config
        hop = mel_hop(cfg)
        wav = waveform.float()
        wav = wav - wav.mean(dim=1, keepdim=True)
        wav = 0.5 * wav / (wav.abs().amax(dim=1, keepdim=True) + 1e-8)
        mel = torch.log(mel_magnitude(wav, cfg).clamp(min=LOG_FLOOR))
        frames = wav.shape[1] // hop
        scale = pipe.vae_scale_factor
        padded = math.ceil(frames / scale) * scale
        mel = mel[:, :frames]
        return torch.nn.functional.pad(mel, (0, 0, 0, padded - frames), value=math.log(LOG_FLOOR))

    def _latents(
        self, pipe: Any, targets: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        return vae_latents(pipe, self.log_mel(targets).unsqueeze(1), generator)

    def _predict(
        self, pipe: Any, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        labels = on_clap_sphere(cond[:, 0])
        return pipe.unet(noisy, t, encoder_hidden_states=None, class_labels=labels).sample
