"""ImageBind preprocessing: image / audio / video tensors, fbank and resampler numbers."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.audio_utils import mel_filter_bank, spectrogram, window_function

from nextgpt.config import EncoderConfig, tiny_config
from nextgpt.encoders.preprocess import (
    AUDIO_MEAN,
    AUDIO_STD,
    CLIP_MEAN,
    CLIP_STD,
    clip_spans,
    kaldi_fbank,
    preprocess_audio,
    preprocess_image,
    preprocess_video,
    resample,
)

TINY = tiny_config().encoder


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(rate * seconds), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave.double() * torch.hann_window(len(wave), dtype=torch.float64))
    return float(torch.fft.rfftfreq(len(wave), 1 / rate)[spectrum.abs().argmax()])


def clip_normalised(rgb: tuple[float, float, float]) -> list[float]:
    return [(v / 255 - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)]


def test_official_normalisation_constants() -> None:
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert (AUDIO_MEAN, AUDIO_STD) == (-4.268, 9.138)


# ---- image -----------------------------------------------------------------------------------
def test_image_flat_colour_values() -> None:
    x = preprocess_image(Image.new("RGB", (50, 40), (255, 0, 128)), TINY)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    expected = torch.tensor(clip_normalised((255, 0, 128)))
    torch.testing.assert_close(x.mean(dim=(1, 2)), expected, atol=1e-5, rtol=0)
    assert float(x.std(dim=(1, 2)).max()) < 1e-5


def test_image_shorter_side_resize_and_center_crop() -> None:
    # 128 x 64 (w x h) with white columns 48..79: the shorter side 64 -> 32 gives 64 x 32 with
    # white columns 24..39; the center crop starts at column 16, so crop columns 8..23 are white.
    pixels = np.zeros((64, 128, 3), np.uint8)
    pixels[:, 48:80] = 255
    white = torch.tensor(clip_normalised((255,) * 3))
    black = torch.tensor(clip_normalised((0,) * 3))
    for x in (
        preprocess_image(Image.fromarray(pixels), TINY),
        preprocess_image(Image.fromarray(pixels.transpose(1, 0, 2)), TINY).transpose(1, 2),
    ):
        assert x.shape == (3, 32, 32)
        for cols, colour in ((slice(10, 22), white), (slice(0, 6), black), (slice(26, 32), black)):
            mean = x[:, :, cols].mean(dim=(1, 2))
            torch.testing.assert_close(mean, colour, atol=2e-3, rtol=0)


# ---- clip sampling ---------------------------------------------------------------------------
def test_clip_spans_follow_constant_clips_per_video() -> None:
    assert clip_spans(10.0, 2.0, 3) == [(0, 2), (4, 6), (8, 10)]
    assert clip_spans(1.0, 2.0, 3) == [(0, 2)] * 3  # shorter than a clip: all start at 0
    assert clip_spans(5.0, 2.0, 1) == [(0, 2)]
    spans = clip_spans(7.5, 2.0, 5)
    assert [float(s) for s, _ in spans] == [0.0, 1.375, 2.75, 4.125, 5.5]
    assert all(isinstance(s, Fraction) for s, _ in spans)


# ---- audio -----------------------------------------------------------------------------------
def test_fbank_frames_and_pure_tone_peak() -> None:
    wave = tone(1000.0, 16000, 1.0)
    fbank = kaldi_fbank(wave, 16000, num_mel_bins=128)
    assert fbank.shape == (98, 128)  # 1 + (16000 - 400) // 160
    # mel(f) = 1127 ln(1 + f/700); 128 bins evenly spaced in mel over 20..8000 Hz, centers at
    # mel(20) + (i + 1) * (mel(8000) - mel(20)) / 129. 1000 Hz (mel 1000.0) is nearest bin 43.
    peaks = fbank.argmax(dim=1)
    assert (peaks == 43).all()
    # 32 bins: spacing 87.1 mel, 1000 Hz is nearest bin 10 (center 989.9 mel)
    assert (kaldi_fbank(wave, 16000, num_mel_bins=32).argmax(dim=1) == 10).all()
    # silence is floored at log(float32 eps)
    silent = kaldi_fbank(torch.zeros(800), 16000, 8)
    torch.testing.assert_close(silent, torch.full((3, 8), math.log(1.1920929e-07)))
    assert kaldi_fbank(torch.zeros(399), 16000).shape == (0, 128)


@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_fbank_matches_an_independent_kaldi_implementation() -> None:
    """transformers' numpy spectrogram with Kaldi's settings (its fallback for torchaudio)."""
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(0)) * 0.1
    bank = mel_filter_bank(
        num_frequency_bins=257,
        num_mel_filters=128,
        min_frequency=20,
        max_frequency=8000,
        sampling_rate=16000,
        norm=None,
        mel_scale="kaldi",
        triangularize_in_mel_space=True,
    )
    reference = spectrogram(
        wave.numpy(),
        window_function(400, "hann", periodic=False),
        frame_length=400,
        hop_length=160,
        fft_length=512,
        power=2.0,
        center=False,
        preemphasis=0.97,
        mel_filters=bank,
        log_mel="log",
        mel_floor=1.192092955078125e-07,
        remove_dc_offset=True,
    ).T
    ours = kaldi_fbank(wave, 16000, 128)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours.numpy(), reference, atol=2e-3)


def test_resample_keeps_frequency_length_and_level() -> None:
    wave = tone(1000.0, 44100, 1.0)
    out = resample(wave, 44100, 16000)
    assert out.shape == (16000,)
    assert peak_hz(out, 16000) == 1000.0
    rms = out[200:-200].square().mean().sqrt()
    assert float(rms) == pytest.approx(0.5 / math.sqrt(2), rel=0.01)
    reference = tone(1000.0, 16000, 1.0)
    assert float((out - reference)[100:-100].abs().max()) < 0.01  # same phase, no delay
    assert resample(torch.zeros(44101), 44100, 16000).shape == (16001,)  # ceil


def test_resample_removes_what_the_new_rate_cannot_hold() -> None:
    aliased = resample(tone(10000.0, 44100, 0.5), 44100, 16000)  # above the 8 kHz Nyquist
    assert float(aliased[100:-100].abs().max()) < 0.01
    up = resample(tone(440.0, 8000, 0.5), 8000, 22050)  # up-sampling, odd ratio
    assert up.shape == (11025,)
    assert float((up - tone(440.0, 22050, 0.5))[200:-200].abs().max()) < 0.01
    batch = resample(torch.stack([tone(300.0, 8000, 0.1), tone(600.0, 8000, 0.1)]), 8000, 16000)
    assert batch.shape == (2, 1600)
    torch.testing.assert_close(batch[1], resample(tone(600.0, 8000, 0.1), 8000, 16000))


def test_audio_tensor_shape_and_values() -> None:
    x = preprocess_audio(tone(1000.0, 44100, 2.0).numpy(), 44100, TINY)
    assert x.shape == (2, 1, 32, 64) and x.dtype == torch.float32
    # clips of 0.64 s = 10240 samples -> 62 fbank frames, then 2 frames of zero padding
    padding = (0 - AUDIO_MEAN) / AUDIO_STD
    torch.testing.assert_close(x[..., 62:], torch.full((2, 1, 32, 2), padding))
    assert (x[..., :62] != padding).all()
    fbank = kaldi_fbank(resample(tone(1000.0, 44100, 2.0), 44100, 16000)[:10240], 16000, 32)
    torch.testing.assert_close(
        x[0, 0, :, :62], (fbank.T - AUDIO_MEAN) / AUDIO_STD, atol=1e-3, rtol=0
    )
    assert (x[0, 0, :, :62].argmax(dim=0) == 10).all()


def test_audio_clips_are_evenly_spaced() -> None:
    config = dataclasses.replace(TINY, audio_clips=3)
    # 3 s at 16 kHz: silence, then a tone in the last 0.64 s; the last clip starts at 3 - 0.64
    wave = torch.zeros(48000)
    wave[-10240:] = tone(2000.0, 16000, 0.64)
    x = preprocess_audio(wave, 16000, config)
    assert x.shape == (3, 1, 32, 64)
    floor = (math.log(1.1920929e-07) - AUDIO_MEAN) / AUDIO_STD
    torch.testing.assert_close(x[:2, ..., :62], torch.full((2, 1, 32, 62), floor))
    assert float(x[2, ..., :62].max()) > 0


def test_short_and_empty_audio() -> None:
    short = preprocess_audio(np.ones(100, np.float32), 16000, TINY)  # less than one frame
    assert short.shape == (2, 1, 32, 64)
    padding = (0 - AUDIO_MEAN) / AUDIO_STD
    torch.testing.assert_close(short[..., 1:], torch.full((2, 1, 32, 63), padding))
    floor = (math.log(1.1920929e-07) - AUDIO_MEAN) / AUDIO_STD  # a constant has no content
    torch.testing.assert_close(short[..., 0], torch.full((2, 1, 32), floor))
    with pytest.raises(ValueError, match="empty"):
        preprocess_audio(np.zeros(0, np.float32), 16000, TINY)
    with pytest.raises(ValueError, match="mono"):
        preprocess_audio(np.zeros((2, 100), np.float32), 16000, TINY)


# ---- video -----------------------------------------------------------------------------------
def test_video_clip_and_frame_sampling() -> None:
    # 20 grey frames at 10 fps (2 s); frame t has value 10 t. Tiny config: 2 clips of 0.5 s, 2
    # frames each. Spans (0, 0.5) and (1.5, 2): frames 0..4 and 15..19, taking the first and last.
    frames = (np.arange(20, dtype=np.uint8) * 10)[:, None, None, None] * np.ones(
        (1, 40, 60, 3), np.uint8
    )
    x = preprocess_video(frames, 10.0, TINY)
    assert x.shape == (2, 3, 2, 32, 32)
    picked = []
    for clip in range(2):
        for f in range(2):
            value = x[clip, 0, f].mean() * CLIP_STD[0] + CLIP_MEAN[0]
            picked.append(round(float(value) * 255 / 10))
    assert picked == [0, 4, 15, 19]
    assert float(x.std(dim=(-2, -1)).max()) < 1e-5
    config = dataclasses.replace(TINY, video_frames_per_clip=4, video_clips=1)
    assert preprocess_video(frames[:3], 10.0, config).shape == (1, 3, 4, 32, 32)


def test_video_center_crop_and_errors() -> None:
    frames = np.zeros((4, 40, 120, 3), np.uint8)
    frames[:, :, 40:80] = 255  # white middle third: after 96 x 32 resize, columns 32..63
    x = preprocess_video(frames, 4.0, TINY)
    white = torch.tensor(clip_normalised((255,) * 3))
    torch.testing.assert_close(x[0, :, 0, :, 2:30].mean(dim=(1, 2)), white, atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="expected frames"):
        preprocess_video(frames[..., 0], 4.0, TINY)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_video(frames.astype(np.float32), 4.0, TINY)
    with pytest.raises(ValueError, match="fps"):
        preprocess_video(frames, 0.0, TINY)


def test_huge_defaults_give_the_official_shapes() -> None:
    huge = EncoderConfig()
    assert preprocess_image(Image.new("RGB", (300, 200)), huge).shape == (3, 224, 224)
    audio = preprocess_audio(np.zeros(16000 * 5, np.float32), 16000, huge)
    assert audio.shape == (3, 1, 128, 204)
