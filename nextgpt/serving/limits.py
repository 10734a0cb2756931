"""What one request may ask of the server: sizes of inputs and outputs, and the queue's depth."""

from __future__ import annotations

from dataclasses import dataclass


class LimitExceeded(ValueError):
    """An input or a requested output is larger than this server allows (HTTP 413 / 400)."""

    def __init__(self, message: str, status: int = 413, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass(frozen=True)
class Limits:
    """Defaults fit a CPU box serving a small model; raise them for real checkpoints on a GPU."""

    max_request_bytes: int = 32 * 2**20  # whole HTTP body, base64 media included
    max_media_items: int = 8  # inputs per request, all messages together
    max_image_pixels: int = 4096 * 4096  # checked from the header, before decoding
    max_audio_seconds: float = 60.0
    max_video_frames: int = 256
    max_video_frame_pixels: int = 1280 * 720
    max_new_tokens: int = 512
    max_steps: int = 100  # diffusion steps per generated medium
    max_output_pixels: int = 1024 * 1024  # height * width of a generated image or video frame
    max_output_frames: int = 64
    max_output_seconds: float = 30.0
    queue_size: int = 8  # requests waiting or running; more get 503
    file_ttl_s: float = 600.0  # lifetime of generated-media URLs and uploads
    max_stored_bytes: int = 512 * 2**20  # the file store evicts its oldest entries past this
