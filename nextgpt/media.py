"""Reading and writing media files, and coercing user inputs into plain arrays.

Every failure is a `MediaError` whose one-line message names the file (or input) and what was
expected, so the CLI and the API can show it as is. Images go through Pillow, audio through
soundfile (WAV/FLAC/OGG/MP3) with PyAV as the fallback, video through PyAV (libx264 for writing).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
from PIL import Image, UnidentifiedImageError

PathLike = str | Path


class MediaError(ValueError):
    """A media input could not be read, written or understood."""


def _existing_file(src: PathLike) -> Path:
    path = Path(src)
    if not path.is_file():
        raise MediaError(f"{path}: file not found")
    return path


def _reason(e: Exception) -> str:
    """The library's reason without the path it repeats (PyAV puts it in str(e))."""
    return str(getattr(e, "strerror", None) or e)


def _array(value: Any) -> np.ndarray:
    """numpy view of an array-like (a torch tensor included) without importing torch here."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _to_uint8(arr: np.ndarray, what: str) -> np.ndarray:
    """uint8 as is; floats are taken as [0, 1] (clipped) and rounded to 0..255."""
    if arr.dtype == np.uint8:
        return arr
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise MediaError(f"{what}: contains NaN or infinite values; expected values in [0, 1]")
        return np.round(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise MediaError(f"{what}: dtype {arr.dtype}; expected uint8 or float in [0, 1]")


# ---- images ----------------------------------------------------------------------------------
def load_image(src: PathLike | Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a path, a PIL image, or an (H, W, 3) uint8 / float [0, 1] array
    (also (H, W) grey or (H, W, 4) RGBA, whose alpha is dropped)."""
    if isinstance(src, Image.Image):
        return src.convert("RGB")
    if isinstance(src, (str, Path)):
        path = _existing_file(src)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")  # convert() forces the full decode inside the try
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
            raise MediaError(f"{path}: cannot read an image ({e}); expected PNG, JPEG, ...") from e
    arr = _array(src)
    what = f"image array of shape {arr.shape}"
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4) or 0 in arr.shape:
        raise MediaError(f"{what}: expected (H, W, 3) (or (H, W), (H, W, 4))")
    return Image.fromarray(np.ascontiguousarray(_to_uint8(arr, what)[..., :3]), "RGB")


def save_png(image: Image.Image | np.ndarray, path: PathLike) -> Path:
    """Write an image (anything `load_image` accepts but a path) as PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load_image(image).save(path, format="PNG")
    return path


# ---- audio -----------------------------------------------------------------------------------
def _mono_waveform(waveform: Any, what: str) -> np.ndarray:
    """float32 mono from (samples,) or (samples, channels) / (channels, samples), channels <= 8."""
    arr = _array(waveform)
    if arr.ndim == 2:
        channel_axis = 1 if arr.shape[1] <= arr.shape[0] else 0
        if arr.shape[channel_axis] > 8:
            raise MediaError(f"{what}: shape {arr.shape}; expected (samples,) or (samples, ch)")
        arr = arr.mean(axis=channel_axis)
    if arr.ndim != 1:
        raise MediaError(f"{what}: shape {arr.shape}; expected a waveform (samples,)")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.signedinteger)):
        raise MediaError(f"{what}: dtype {arr.dtype}; expected float samples in [-1, 1]")
    if np.issubdtype(arr.dtype, np.signedinteger):  # PCM integers -> [-1, 1]
        arr = arr / float(np.iinfo(arr.dtype).max + 1)
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all():
        raise MediaError(f"{what}: contains NaN or infinite samples")
    return arr


def _sample_rate(rate: Any, what: str) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise MediaError(f"{what}: sample rate {rate!r}; expected a positive integer (Hz)")
    return int(rate)


def load_audio(src: PathLike | tuple | dict) -> tuple[np.ndarray, int]:
    """Mono float32 waveform and its sample rate, from a file, `(waveform, sample_rate)` or
    `{"waveform": ..., "sample_rate": ...}`. Channels are averaged."""
    if isinstance(src, dict):
        if "waveform" not in src or "sample_rate" not in src:
            raise MediaError(f"audio dict with keys {sorted(src)}: expected waveform, sample_rate")
        src = (src["waveform"], src["sample_rate"])
    if isinstance(src, tuple):
        if len(src) != 2:
            raise MediaError(f"audio tuple of length {len(src)}: expected (waveform, sample_rate)")
        what = "audio waveform"
        return _mono_waveform(src[0], what), _sample_rate(src[1], what)
    if not isinstance(src, (str, Path)):
        raise MediaError(f"audio input of type {type(src).__name__}: expected a path or tuple")
    path = _existing_file(src)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except sf.LibsndfileError:  # not a format libsndfile knows (AAC, M4A, a video's track, ...)
        data, rate = _read_audio_av(path)
    if data.shape[0] == 0:
        raise MediaError(f"{path}: the audio has no samples; expected a non-empty recording")
    return data.mean(axis=1).astype(np.float32), int(rate)


def _read_audio_av(path: Path) -> tuple[np.ndarray, int]:
    """(samples, channels) float32 and rate of the first audio stream, decoded with PyAV."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise MediaError(f"{path}: no audio stream; expected an audio file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
            chunks = [
                out.to_ndarray()
                for frame in container.decode(stream)
                for out in resampler.resample(frame)
            ]
            chunks += [out.to_ndarray() for out in resampler.resample(None)]
            rate = stream.rate
    except av.FFmpegError as e:
        raise MediaError(
            f"{path}: cannot read audio ({_reason(e)}); expected WAV, FLAC, MP3, ..."
        ) from e
    if not chunks:
        raise MediaError(f"{path}: the audio has no samples; expected a non-empty recording")
    return np.concatenate(chunks, axis=1).T, rate


def save_wav(waveform: Any, sample_rate: int, path: PathLike) -> Path:
    """Write 16-bit PCM WAV (samples clipped to [-1, 1]); (samples,) or (samples, channels)."""
    what = f"waveform for {path}"
    arr = _array(waveform).astype(np.float32)
    if arr.ndim not in (1, 2) or arr.shape[0] == 0:
        raise MediaError(f"{what}: shape {arr.shape}; expected (samples,) or (samples, channels)")
    if not np.isfinite(arr).all():
        raise MediaError(f"{what}: contains NaN or infinite samples")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.clip(arr, -1.0, 1.0), _sample_rate(sample_rate, what), "PCM_16")
    return path


# ---- video -----------------------------------------------------------------------------------
def _frames_array(frames: Any, what: str) -> np.ndarray:
    arr = _array(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3 or 0 in arr.shape:
        raise MediaError(f"{what}: shape {arr.shape}; expected frames (T, H, W, 3)")
    return _to_uint8(arr, what)


def _fps(fps: Any, what: str) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction, np.number)):
        raise MediaError(f"{what}: fps {fps!r}; expected a positive number")
    if not (math.isfinite(float(fps)) and fps > 0):
        raise MediaError(f"{what}: fps {fps!r}; expected a positive number")
    return float(fps)


def load_video(src: PathLike | tuple, max_seconds: float | None = 30.0) -> tuple[np.ndarray, float]:
    """RGB frames uint8 (T, H, W, 3) and the frame rate, from a file (PyAV) or `(frames, fps)`.

    Decoding stops after `max_seconds` of video (None: the whole file) so that a long file does
    not fill memory; ImageBind samples its clips from what is returned.
    """
    if isinstance(src, tuple):
        if len(src) != 2:
            raise MediaError(f"video tuple of length {len(src)}: expected (frames, fps)")
        return _frames_array(src[0], "video frames"), _fps(src[1], "video frames")
    if not isinstance(src, (str, Path)):
        raise MediaError(f"video input of type {type(src).__name__}: expected a path or tuple")
    path = _existing_file(src)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream; expected a video file (MP4, WebM, ...)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            if not rate:
                raise MediaError(f"{path}: unknown frame rate; expected a constant-rate video")
            fps = float(rate)
            limit = math.inf if max_seconds is None else max(1, math.ceil(max_seconds * fps))
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) >= limit:
                    break
    except av.FFmpegError as e:
        raise MediaError(
            f"{path}: cannot read video ({_reason(e)}); expected MP4, WebM, ..."
        ) from e
    if not frames:
        raise MediaError(f"{path}: no frames decoded; expected a non-empty video")
    return np.stack(frames), fps


def save_mp4(frames: Any, fps: float, path: PathLike) -> Path:
    """Write H.264 (libx264, yuv420p) MP4. yuv420p needs even sizes, so an odd height or width is
    padded by repeating the last row / column."""
    what = f"video for {path}"
    arr = _frames_array(frames, what)
    rate = Fraction(_fps(fps, what)).limit_denominator(1001)
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if pad_h or pad_w:
        arr = np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with av.open(str(path), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = arr.shape[2], arr.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "18"}
            for image in arr:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode(None))
    except av.FFmpegError as e:
        raise MediaError(f"{path}: cannot write MP4 ({_reason(e)})") from e
    return path
