"""The chat-completions wire format: OpenAI's fields, plus image/video outputs as `media`.

Requests follow OpenAI's chat format. Content parts: `text`, `image_url` (a data: URL),
`input_audio` (base64 with its format), `video_url` (a data: URL) and `file` (an uploaded `file_id`
or inline `file_data`). Extensions, sent by the `openai` client through `extra_body`: `media_format`
("base64" or "url") and `decoder_options` per output modality. Unknown top-level fields are
ignored, as OpenAI clients send fields this server has no use for; unknown fields inside a part or
in `decoder_options` are errors, as they are likely typos.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; the encoder has one resolution


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str  # base64
    format: str  # wav, mp3, flac, ogg, ...


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Strict):
    url: str


class VideoPart(_Strict):
    type: Literal["video_url"]
    video_url: VideoURL


class FileRef(_Strict):
    file_id: str | None = None  # from POST /v1/files
    file_data: str | None = None  # a data: URL
    filename: str | None = None


class FilePart(_Strict):
    type: Literal["file"]
    file: FileRef


ContentPart = Annotated[
    TextPart | ImagePart | AudioPart | VideoPart | FilePart, Field(discriminator="type")
]


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ImageOptions(_Strict):
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    height: int | None = Field(None, ge=8, multiple_of=8)
    width: int | None = Field(None, ge=8, multiple_of=8)


class AudioOptions(_Strict):
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    seconds: float | None = Field(None, gt=0)


class VideoOptions(_Strict):
    steps: int | None = Field(None, ge=1)
    guidance: float | None = Field(None, ge=0)
    num_frames: int | None = Field(None, ge=1)
    height: int | None = Field(None, ge=8, multiple_of=8)
    width: int | None = Field(None, ge=8, multiple_of=8)


class DecoderOptions(_Strict):
    image: ImageOptions | None = None
    audio: AudioOptions | None = None
    video: VideoOptions | None = None


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    modalities: list[str] | None = None  # output modalities; "text" is always produced
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: greedy, the model's default
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = 1
    stream: bool = False
    media_format: Literal["base64", "url"] = "base64"
    decoder_options: DecoderOptions | None = None


class MediaItem(BaseModel):
    """One generated medium: inline base64 `data`, or a fetch-once `url` that expires."""

    type: Literal["image", "audio", "video"]
    mime_type: str
    format: str
    data: str | None = None
    url: str | None = None
    expires_at: int | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    fps: float | None = None
    sample_rate: int | None = None
    seconds: float | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    media: list[MediaItem] = Field(default_factory=list)
    audio: dict[str, Any] | None = None  # OpenAI's audio-output field, for the first audio


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]


class Delta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["assistant"] | None = None
    content: str | None = None
    media: list[MediaItem] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nextgpt"
    modalities: list[str]  # output modalities this model can produce


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["processed"] = "processed"
