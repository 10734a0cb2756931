"""ImageBind's input preprocessing (official `imagebind/data.py`) without torchvision/torchaudio.

Each function turns one decoded item into the encoder's input for that item (no batch dim):
image (3,S,S), audio (clips, 1, mel_bins, target_len), video (clips, 3, frames_per_clip, S, S).
The steps, constants and clip sampling follow the official code so that the official weights see
what they were trained on; the Kaldi fbank and the resampler are written here in plain torch.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nextgpt.config import EncoderConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AUDIO_MEAN = -4.268  # the official fbank normalisation (AudioSet statistics)
AUDIO_STD = 9.138
_RESAMPLE_CHUNK = 16384  # output samples per step of `resample` (bounds its memory)


# ---- clip sampling ---------------------------------------------------------------------------
def clip_spans(duration: float, clip_seconds: float, clips: int) -> list[tuple[Fraction, Fraction]]:
    """Start/end times (s) of `clips` evenly spaced clips, as pytorchvideo's
    ConstantClipsPerVideoSampler: the first starts at 0, the last ends at the end of the media;
    media shorter than one clip give `clips` identical clips starting at 0."""
    length = Fraction(clip_seconds)
    last_start = Fraction(max(duration - length, 0))
    step = last_start / max(clips - 1, 1)
    return [(step * i, step * i + length) for i in range(clips)]


# ---- image -----------------------------------------------------------------------------------
def _normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation of (3, ...) values in [0, 1]."""
    shape = (3,) + (1,) * (x.ndim - 1)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).reshape(shape)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).reshape(shape)
    return (x - mean) / std


def preprocess_image(image: Image.Image, config: EncoderConfig) -> torch.Tensor:
    """Shorter side to `image_size` (PIL bicubic, as torchvision does on PIL images), center crop,
    [0, 1], CLIP normalisation -> (3, S, S) float32."""
    size = config.image_size
    image = image.convert("RGB")
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return _normalize(x)


# ---- audio -----------------------------------------------------------------------------------
def resample(
    waveform: torch.Tensor | np.ndarray,
    orig_sr: int,
    new_sr: int,
    zero_crossings: int = 6,
    rolloff: float = 0.99,
) -> torch.Tensor:
    """Band-limited resampling along the last axis with a Hann-windowed sinc.

    Output sample n sits at input position n * orig_sr / new_sr; it is the sum of the nearby input
    samples weighted by a low-pass sinc whose cutoff is `rolloff` times the lower Nyquist
    frequency, windowed to `zero_crossings` zero crossings each side (torchaudio's defaults).
    Works for any pair of integer rates; output length is ceil(len * new_sr / orig_sr).
    """
    x = torch.as_tensor(waveform, dtype=torch.float32)
    if orig_sr <= 0 or new_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {new_sr}")
    if orig_sr == new_sr:
        return x.clone()
    n_in = x.shape[-1]
    n_out = math.ceil(n_in * new_sr / orig_sr)
    cutoff = rolloff * min(orig_sr, new_sr) / (2 * orig_sr)  # cycles per input sample
    half = zero_crossings / (2 * cutoff)  # kernel half-width in input samples
    offsets = torch.arange(-math.floor(half), math.floor(half) + 2)
    flat = x.reshape(-1, n_in).double()
    out = []
    for start in range(0, n_out, _RESAMPLE_CHUNK):
        n = torch.arange(start, min(start + _RESAMPLE_CHUNK, n_out))
        base = n * orig_sr // new_sr  # integer part of the input position, exactly
        frac = (n * orig_sr % new_sr).double() / new_sr
        idx = base[:, None] + offsets[None]
        dist = offsets[None].double() - frac[:, None]  # input sample minus output position
        window = torch.cos(math.pi * dist / (2 * half)).square() * (dist.abs() <= half)
        weights = 2 * cutoff * torch.sinc(2 * cutoff * dist) * window
        inside = (idx >= 0) & (idx < n_in)
        samples = flat[:, idx.clamp(0, n_in - 1)] * inside
        out.append((samples * weights).sum(-1))
    return torch.cat(out, dim=-1).reshape(*x.shape[:-1], n_out).float()


def _mel(freq: torch.Tensor) -> torch.Tensor:
    return 1127.0 * torch.log1p(freq / 700.0)


def mel_filterbank(
    num_mel_bins: int, n_fft: int, sample_rate: int, low_freq: float, high_freq: float
) -> torch.Tensor:
    """Kaldi's triangular mel filters (triangles in mel space), (num_mel_bins, n_fft // 2 + 1).

    Like Kaldi, the Nyquist bin gets zero weight.
    """
    nyquist = sample_rate / 2
    high = high_freq if high_freq > 0 else nyquist + high_freq
    if not 0 <= low_freq < high <= nyquist:
        raise ValueError(f"bad mel range {low_freq}..{high} Hz for {sample_rate} Hz audio")
    lo, hi = (
        _mel(torch.tensor(low_freq, dtype=torch.float64)),
        _mel(torch.tensor(high, dtype=torch.float64)),
    )
    edges = lo + (hi - lo) / (num_mel_bins + 1) * torch.arange(num_mel_bins + 2)
    left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fft_mel = _mel(sample_rate / n_fft * torch.arange(n_fft // 2, dtype=torch.float64))[None]
    rising = (fft_mel - left) / (center - left)
    falling = (right - fft_mel) / (right - center)
    bank = torch.minimum(rising, falling).clamp(min=0)
    return F.pad(bank, (0, 1)).float()


def kaldi_fbank(
    waveform: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    frame_length_ms: float = 25.0,
    frame_shift_ms: float = 10.0,
    low_freq: float = 20.0,
    high_freq: float = 0.0,
    preemphasis: float = 0.97,
) -> torch.Tensor:
    """Log mel filterbank like `torchaudio.compliance.kaldi.fbank` with the options ImageBind uses.

    Those options: hanning window, htk_compat, no energy, dither 0, power spectrum, FFT size the
    next power of two, snip_edges (only whole frames). Per frame: remove the DC offset,
    pre-emphasise, window, |FFT|^2, mel filters, log (floored at float32 eps).
    Returns (frames, num_mel_bins); fewer samples than one frame give zero frames.
    """
    x = torch.as_tensor(waveform, dtype=torch.float32).reshape(-1)
    win = int(sample_rate * frame_length_ms * 0.001)
    shift = int(sample_rate * frame_shift_ms * 0.001)
    n_fft = 1 << (win - 1).bit_length()
    if x.numel() < win:
        return x.new_zeros(0, num_mel_bins)
    n_frames = 1 + (x.numel() - win) // shift
    frames = x.unfold(0, win, shift)[:n_frames]
    frames = frames - frames.mean(dim=1, keepdim=True)
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)  # first sample repeats itself
    frames = frames - preemphasis * previous
    frames = frames * torch.hann_window(win, periodic=False, dtype=torch.float32)
    power = torch.fft.rfft(frames, n=n_fft).abs().square()
    bank = mel_filterbank(num_mel_bins, n_fft, sample_rate, low_freq, high_freq)
    energies = power @ bank.T
    return energies.clamp(min=torch.finfo(torch.float32).eps).log()


def preprocess_audio(
    waveform: np.ndarray | torch.Tensor, sample_rate: int, config: EncoderConfig
) -> torch.Tensor:
    """Mono waveform at any rate -> (audio_clips, 1, audio_mel_bins, audio_target_len).

    Official steps: resample to `audio_sample_rate`; cut `audio_clips` evenly spaced clips of
    `audio_clip_seconds`; per clip subtract its mean, take the Kaldi fbank, pad with zeros or crop
    to `audio_target_len` frames; normalise with the AudioSet mean/std. Audio shorter than a clip
    is zero-padded (a clip shorter than one 25 ms frame is padded to one frame, where the official
    code would fail); empty audio is an error.
    """
    x = torch.as_tensor(waveform, dtype=torch.float32)
    if x.ndim == 2 and 1 in x.shape:
        x = x.reshape(-1)
    if x.ndim != 1:
        raise ValueError(f"audio of shape {tuple(x.shape)}: expected a mono waveform (samples,)")
    if x.numel() == 0:
        raise ValueError("audio is empty: expected at least one sample")
    if not torch.isfinite(x).all():
        raise ValueError("audio contains NaN or infinite samples")
    rate = config.audio_sample_rate
    if sample_rate != rate:
        x = resample(x, sample_rate, rate)
    frame = int(rate * 0.025)
    clips = []
    for start, end in clip_spans(x.numel() / rate, config.audio_clip_seconds, config.audio_clips):
        clip = x[int(start * rate) : int(end * rate)]
        clip = clip - clip.mean()
        if clip.numel() < frame:
            clip = F.pad(clip, (0, frame - clip.numel()))
        fbank = kaldi_fbank(clip, rate, config.audio_mel_bins).T  # (mel, frames)
        missing = config.audio_target_len - fbank.shape[1]
        fbank = F.pad(fbank, (0, missing)) if missing > 0 else fbank[:, : config.audio_target_len]
        clips.append(((fbank - AUDIO_MEAN) / AUDIO_STD).unsqueeze(0))
    return torch.stack(clips)


# ---- video -----------------------------------------------------------------------------------
def preprocess_video(
    frames: np.ndarray | torch.Tensor, fps: float, config: EncoderConfig
) -> torch.Tensor:
    """Frames uint8 (T, H, W, 3) at `fps` -> (video_clips, 3, video_frames_per_clip, S, S).

    Official steps: `video_clips` evenly spaced clips of `video_clip_seconds` (frame indices as
    pytorchvideo's decord reader: ceil(fps * t)), `video_frames_per_clip` frames spread evenly over
    each clip, [0, 1], shorter side to `image_size` (bilinear, no antialias, as pytorchvideo),
    CLIP normalisation. Only the center crop is taken: the official code also adds left and right
    crops (3x the clips), which would triple the tokens for little gain.
    """
    video = torch.as_tensor(np.asarray(frames))
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f"video of shape {tuple(video.shape)}: expected frames (T, H, W, 3)")
    if video.dtype != torch.uint8:
        raise ValueError(f"video frames of dtype {video.dtype}: expected uint8")
    if not fps > 0:
        raise ValueError(f"video fps {fps}: expected a positive frame rate")
    count, size, per_clip = video.shape[0], config.image_size, config.video_frames_per_clip
    clips = []
    for start, end in clip_spans(count / fps, config.video_clip_seconds, config.video_clips):
        first = min(math.ceil(fps * start), count - 1)
        stop = max(min(math.ceil(fps * end), count), first + 1)
        picks = first + torch.linspace(0, stop - first - 1, per_clip).long()
        clip = video[picks].permute(3, 0, 1, 2).float() / 255.0  # (3, F, H, W)
        clips.append(_normalize(_short_side_center_crop(clip, size)))
    return torch.stack(clips)


def _short_side_center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """pytorchvideo's ShortSideScale (floor of the long side) then its center crop (ceil offset)."""
    h, w = clip.shape[-2:]
    new_h, new_w = (math.floor(h / w * size), size) if w < h else (size, math.floor(w / h * size))
    clip = F.interpolate(clip, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = math.ceil((new_h - size) / 2), math.ceil((new_w - size) / 2)
    return clip[..., top : top + size, left : left + size]
