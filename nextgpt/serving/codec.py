"""Bytes <-> media for the front ends: request parts decoded under limits, outputs encoded.

Inputs are checked against the limits as early as their format allows (an image's size from its
header, an audio or video duration from its container) so that an oversized upload is refused
before it is decoded. Errors name the request part (`messages[0].content[1]`), not a temp file.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import mimetypes
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import soundfile as sf
from PIL import Image, UnidentifiedImageError

from nextgpt import media as media_io
from nextgpt.config import MODALITIES
from nextgpt.decoders.video import OUTPUT_FPS
from nextgpt.media import MediaError
from nextgpt.serving.limits import LimitExceeded, Limits

OUTPUT_FORMATS = {
    "image": ("png", "image/png"),
    "audio": ("wav", "audio/wav"),
    "video": ("mp4", "video/mp4"),
}
AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg", "opus", "m4a", "aac", "webm")


class BadInput(ValueError):
    """A malformed request part (bad base64, a data: URL without data, ...): HTTP 400."""


@dataclass
class Blob:
    """Raw bytes of one input, with whatever says what they are."""

    data: bytes
    mime_type: str | None = None
    filename: str | None = None


@dataclass
class EncodedMedia:
    """A generated medium as file bytes, with its size facts (width, frames, seconds, ...)."""

    modality: str
    data: bytes
    mime_type: str
    format: str
    info: dict[str, int | float] = field(default_factory=dict)


# ---- request parts -> bytes --------------------------------------------------------------------
def decode_base64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadInput(f"{what}: not valid base64 ({e})") from e
    if not data:
        raise BadInput(f"{what}: empty data")
    return data


def parse_data_url(url: str, what: str) -> Blob:
    """`data:<mime>;base64,<data>` -> bytes; only base64 data URLs carry binary media."""
    header, sep, payload = url.partition(",")
    if not url.startswith("data:") or not sep:
        raise BadInput(f"{what}: expected a data URL 'data:<mime type>;base64,<data>'")
    params = header[len("data:") :].split(";")
    if "base64" not in params[1:]:
        raise BadInput(f"{what}: the data URL must be base64-encoded (';base64,')")
    return Blob(decode_base64(payload, what), params[0] or None)


def fetch_url(url: str, max_bytes: int, what: str, timeout_s: float = 10.0) -> Blob:
    """GET an http(s) URL, reading at most `max_bytes` (only when the server allows it)."""
    request = urllib.request.Request(url, headers={"User-Agent": "nextgpt"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            data = response.read(max_bytes + 1)
            mime_type = response.headers.get_content_type()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise BadInput(f"{what}: cannot fetch {url} ({e})") from e
    if len(data) > max_bytes:
        raise LimitExceeded(f"{what}: {url} is larger than the limit of {max_bytes} bytes")
    return Blob(data, mime_type, Path(urllib.parse.urlparse(url).path).name or None)


def modality_of(blob: Blob, what: str) -> str:
    """image, audio or video, from the MIME type or else the file name's extension."""
    mime = blob.mime_type
    if (not mime or mime == "application/octet-stream") and blob.filename:
        mime = mimetypes.guess_type(blob.filename)[0]
    kind = (mime or "").split("/")[0]
    if kind not in MODALITIES:
        raise BadInput(
            f"{what}: cannot tell whether {blob.filename or 'the file'} ({mime or 'no type'}) is "
            "an image, audio or video; give it an extension (.png, .wav, .mp4) or a MIME type"
        )
    return kind


# ---- bytes -> model inputs ---------------------------------------------------------------------
def load_input(modality: str, blob: Blob, limits: Limits, what: str) -> Any:
    """A PIL image, `(waveform, rate)` or `(frames, fps)` that `NextGPT.generate` accepts."""
    if modality == "image":
        return _load_image(blob.data, limits, what)
    suffix = _suffix(blob, modality)
    with tempfile.TemporaryDirectory(prefix="nextgpt-") as tmp:
        path = Path(tmp) / f"input{suffix}"
        path.write_bytes(blob.data)
        try:
            if modality == "audio":
                return _load_audio(path, limits, what)
            return _load_video(path, limits, what)
        except MediaError as e:
            raise MediaError(str(e).replace(str(path), what)) from e


def _suffix(blob: Blob, modality: str) -> str:
    if blob.filename and Path(blob.filename).suffix:
        return Path(blob.filename).suffix
    guessed = mimetypes.guess_extension(blob.mime_type) if blob.mime_type else None
    return guessed or (".wav" if modality == "audio" else ".mp4")


def _load_image(data: bytes, limits: Limits, what: str) -> Image.Image:
    errors = (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError)
    try:
        image = Image.open(io.BytesIO(data))
    except errors as e:
        reason = "unknown format" if isinstance(e, UnidentifiedImageError) else str(e)
        raise MediaError(f"{what}: cannot read an image ({reason}); expected PNG, JPEG, ...") from e
    width, height = image.size
    if width * height > limits.max_image_pixels:
        raise LimitExceeded(
            f"{what}: image of {width}x{height} = {width * height} pixels exceeds the limit of "
            f"{limits.max_image_pixels} pixels"
        )
    try:
        return image.convert("RGB")
    except errors as e:
        raise MediaError(f"{what}: cannot decode the image ({e})") from e


def _load_audio(path: Path, limits: Limits, what: str) -> tuple[Any, int]:
    seconds = _audio_duration(path)
    if seconds is not None and seconds > limits.max_audio_seconds:
        raise _too_long(what, seconds, limits)
    wave, rate = media_io.load_audio(path)
    if len(wave) / rate > limits.max_audio_seconds:
        raise _too_long(what, len(wave) / rate, limits)
    return wave, rate


def _too_long(what: str, seconds: float, limits: Limits) -> LimitExceeded:
    return LimitExceeded(
        f"{what}: audio of {seconds:.1f} s exceeds the limit of {limits.max_audio_seconds:g} s"
    )


def _audio_duration(path: Path) -> float | None:
    """Seconds from the container's header, without decoding; None when it does not say."""
    try:
        info = sf.info(str(path))
        return info.frames / info.samplerate
    except (RuntimeError, ValueError):  # not a libsndfile format: ask FFmpeg
        pass
    try:
        with av.open(str(path)) as container:
            return container.duration / 1e6 if container.duration else None
    except av.FFmpegError:
        return None  # load_audio reports the unreadable file


def _load_video(path: Path, limits: Limits, what: str) -> tuple[Any, float]:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{what}: no video stream; expected a video file (MP4, WebM, ...)")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            width, height = stream.codec_context.width, stream.codec_context.height
            frames = stream.frames
            if not frames and fps and container.duration:
                frames = math.ceil(container.duration / 1e6 * fps)
    except av.FFmpegError as e:
        raise MediaError(f"{what}: cannot read video ({e}); expected MP4, WebM, ...") from e
    if width * height > limits.max_video_frame_pixels:
        raise LimitExceeded(
            f"{what}: video frames of {width}x{height} exceed the limit of "
            f"{limits.max_video_frame_pixels} pixels per frame"
        )
    if frames and frames > limits.max_video_frames:
        raise _too_many_frames(what, frames, limits)
    max_seconds = (limits.max_video_frames + 1) / fps if fps else None
    frames_array, fps = media_io.load_video(path, max_seconds=max_seconds)
    if len(frames_array) > limits.max_video_frames:
        raise _too_many_frames(what, len(frames_array), limits)
    return frames_array, fps


def _too_many_frames(what: str, frames: int, limits: Limits) -> LimitExceeded:
    return LimitExceeded(
        f"{what}: video of {frames} frames exceeds the limit of {limits.max_video_frames} frames"
    )


# ---- generated media -> files ------------------------------------------------------------------
def save_output(modality: str, data: Any, stem: Path) -> Path:
    """Write one generated medium as `<stem>.png|.wav|.mp4`; returns the path."""
    path = stem.with_name(f"{stem.name}.{OUTPUT_FORMATS[modality][0]}")
    if modality == "image":
        return media_io.save_png(data, path)
    if modality == "audio":
        return media_io.save_wav(data[0], data[1], path)
    return media_io.save_mp4(data, OUTPUT_FPS, path)


def last_output_number(directory: Path) -> int:
    """The highest `NNN_` prefix among files in `directory` (0 if none), so that a new session
    numbers its files after the old ones instead of overwriting them."""
    prefixes = (p.name.split("_", 1)[0] for p in directory.glob("*_*"))
    return max((int(n) for n in prefixes if n.isdigit()), default=0)


def encode_output(modality: str, data: Any) -> EncodedMedia:
    """File bytes of a generated medium, as a client would download them."""
    fmt, mime_type = OUTPUT_FORMATS[modality]
    with tempfile.TemporaryDirectory(prefix="nextgpt-") as tmp:
        payload = save_output(modality, data, Path(tmp) / "output").read_bytes()
    if modality == "image":
        width, height = media_io.load_image(data).size
        info: dict[str, int | float] = {"width": width, "height": height}
    elif modality == "audio":
        info = {"sample_rate": data[1], "seconds": round(len(data[0]) / data[1], 3)}
    else:
        info = {"frames": len(data), "height": data.shape[1], "width": data.shape[2]}
        info["fps"] = OUTPUT_FPS
    return EncodedMedia(modality, payload, mime_type, fmt, info)


def decoder_options(
    steps: int | None = None, guidance: float | None = None, size: int | None = None
) -> dict[str, dict[str, Any]]:
    """The front ends' generation settings as `decoder_options` for `NextGPT.generate`;
    None leaves the decoder's own default. `size` is the side of square images and videos."""
    common: dict[str, Any] = {}
    if steps is not None:
        common["steps"] = steps
    if guidance is not None:
        common["guidance"] = guidance
    options = {m: dict(common) for m in MODALITIES}
    if size is not None:
        for m in ("image", "video"):
            options[m].update(height=size, width=size)
    return options
