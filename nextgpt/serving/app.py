"""The OpenAI-compatible HTTP API.

POST /v1/chat/completions (JSON, or server-sent events with `stream: true`), GET /v1/models,
POST /v1/files (uploads to reference from a `file` part), GET /v1/files/{id} (uploads, and
generated media that are fetch-once), GET /health. Every error is OpenAI's JSON shape
`{"error": {"message", "type", "param", "code"}}` with a 4xx status for bad input, so clients show
the message; no bad request can stop the server.
"""

from __future__ import annotations

import base64
import hmac
import logging
import mimetypes
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as ASGIMessage

from nextgpt.config import MODALITIES
from nextgpt.model import GeneratedMedia, NextGPT, Reply, TextDelta
from nextgpt.serving import codec
from nextgpt.serving.codec import Blob, EncodedMedia
from nextgpt.serving.files import FileStore, StoredFile
from nextgpt.serving.limits import LimitExceeded, Limits
from nextgpt.serving.schemas import (
    AssistantMessage,
    AudioPart,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    DecoderOptions,
    Delta,
    FileObject,
    FilePart,
    ImagePart,
    MediaItem,
    ModelCard,
    ModelList,
    TextPart,
    VideoPart,
)
from nextgpt.serving.worker import GenerationWorker, Job, QueueFull

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 128
ERROR_TYPES = {
    401: "authentication_error",
    404: "not_found_error",
    503: "overloaded_error",
    500: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {
        "message": message,
        "type": ERROR_TYPES.get(status, "invalid_request_error"),
        "param": param,
        "code": status,
    }
    return JSONResponse({"error": body}, status_code=status)


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: from Content-Length before reading, else while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"the request body exceeds this server's limit of {self.max_bytes} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await error_response(413, message)(scope, receive, send)
            return
        received = 0

        async def limited() -> ASGIMessage:
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, message)  # FastAPI passes it on to the handler
            return event

        await self.app(scope, limited, send)


class ChatService:
    """Request -> model inputs -> worker job -> OpenAI response objects."""

    def __init__(
        self,
        model: NextGPT,
        name: str,
        limits: Limits,
        files: FileStore,
        worker: GenerationWorker,
        allow_remote_urls: bool,
    ):
        self.model = model
        self.name = name
        self.limits = limits
        self.files = files
        self.worker = worker
        self.allow_remote_urls = allow_remote_urls

    # ---- checks that need no decoding ----------------------------------------------------------
    def generation_kwargs(self, req: ChatCompletionRequest) -> dict[str, Any]:
        if req.model is not None and req.model != self.name:
            raise APIError(
                404, f"model {req.model!r} is not served here; this server serves {self.name!r}"
            )
        if req.n != 1:
            raise APIError(400, f"n={req.n}: this server gives one reply per request", "n")
        if req.messages[-1].role != "user":
            raise APIError(400, "the last message must be the user's: nothing to reply to")
        max_new = req.max_completion_tokens or req.max_tokens
        if max_new is None:
            max_new = min(DEFAULT_MAX_TOKENS, self.limits.max_new_tokens)
        if max_new > self.limits.max_new_tokens:
            raise APIError(
                400,
                f"max_tokens={max_new} exceeds this server's limit of {self.limits.max_new_tokens}",
                "max_tokens",
            )
        return {
            "modalities": self.output_modalities(req.modalities),
            "max_new_tokens": max_new,
            "temperature": req.temperature or 0.0,
            "top_p": req.top_p,
            "seed": req.seed,
            "decoder_options": self.decoder_options(req.decoder_options),
        }

    def output_modalities(self, requested: list[str] | None) -> list[str] | None:
        """None lets the model decide; ["text"] alone means text only."""
        if requested is None:
            return None
        for m in requested:
            if m != "text" and m not in MODALITIES:
                raise APIError(
                    400,
                    f"unknown modality {m!r} in modalities; use text, {', '.join(MODALITIES)}",
                    "modalities",
                )
            if m != "text" and m not in self.model.decoders:
                raise APIError(400, f"model {self.name!r} cannot produce {m}", "modalities")
        return [m for m in requested if m != "text"]

    def decoder_options(self, options: DecoderOptions | None) -> dict[str, dict[str, Any]]:
        """Requested decoder settings, checked against the limits; defaults are capped too."""
        lim = self.limits
        out: dict[str, dict[str, Any]] = {}
        for m, config in self.model.config.decoders.items():
            given = getattr(options, m, None) if options else None
            values = given.model_dump(exclude_none=True) if given else {}
            param = f"decoder_options.{m}"
            steps = values.get("steps", config.steps)
            if "steps" not in values:
                values["steps"] = min(steps, lim.max_steps)
            elif steps > lim.max_steps:
                raise APIError(400, f"{param}.steps={steps} exceeds the limit of {lim.max_steps}")
            height, width = values.get("height", config.height), values.get("width", config.width)
            if height and width and height * width > lim.max_output_pixels:
                raise APIError(
                    400,
                    f"{param}: {width}x{height} exceeds the limit of {lim.max_output_pixels} "
                    "pixels",
                )
            if values.get("num_frames", 0) > lim.max_output_frames:
                raise APIError(
                    400, f"{param}.num_frames exceeds the limit of {lim.max_output_frames}"
                )
            if values.get("seconds", 0) > lim.max_output_seconds:
                raise APIError(
                    400, f"{param}.seconds exceeds the limit of {lim.max_output_seconds:g}"
                )
            out[m] = values
        return out

    # ---- decoding (runs in a thread pool) ------------------------------------------------------
    def prepare_messages(self, req: ChatCompletionRequest) -> list[dict[str, Any]]:
        """The request's messages in `NextGPT.generate`'s format, media decoded and checked."""
        messages: list[dict[str, Any]] = []
        n_media = 0
        for i, msg in enumerate(req.messages):
            role = "system" if msg.role == "developer" else msg.role
            content = msg.content if msg.content is not None else ""
            if isinstance(content, str):
                messages.append({"role": role, "content": content})
                continue
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                what = f"messages[{i}].content[{j}]"
                if isinstance(part, TextPart):
                    parts.append({"type": "text", "text": part.text})
                    continue
                if role != "user":
                    raise APIError(400, f"{what}: only user messages may carry media")
                n_media += 1
                if n_media > self.limits.max_media_items:
                    raise LimitExceeded(
                        f"more than {self.limits.max_media_items} media inputs in one request"
                    )
                modality, blob = self.resolve(part, what)
                value = codec.load_input(modality, blob, self.limits, what)
                parts.append({"type": modality, modality: value})
            if role == "system":
                messages.append({"role": role, "content": "\n".join(p["text"] for p in parts)})
            else:
                messages.append({"role": role, "content": parts})
        return messages

    def resolve(self, part: Any, what: str) -> tuple[str, Blob]:
        if isinstance(part, ImagePart):
            return "image", self.blob_from_url(part.image_url.url, what)
        if isinstance(part, VideoPart):
            return "video", self.blob_from_url(part.video_url.url, what)
        if isinstance(part, AudioPart):
            fmt = part.input_audio.format.lower().lstrip(".")
            if fmt not in codec.AUDIO_FORMATS:
                raise APIError(
                    400,
                    f"{what}: unknown audio format {fmt!r}; use {', '.join(codec.AUDIO_FORMATS)}",
                )
            data = codec.decode_base64(part.input_audio.data, what)
            return "audio", Blob(data, None, f"input.{fmt}")
        assert isinstance(part, FilePart)
        ref = part.file
        if ref.file_id:
            stored = self.files.get(ref.file_id)
            if stored is None:
                raise APIError(400, f"{what}: file {ref.file_id!r} not found or expired")
            blob = Blob(stored.data, stored.mime_type, ref.filename or stored.filename)
        elif ref.file_data:
            blob = codec.parse_data_url(ref.file_data, what)
            blob.filename = ref.filename
        else:
            raise APIError(400, f"{what}: a file part needs file_id or file_data")
        return codec.modality_of(blob, what), blob

    def blob_from_url(self, url: str, what: str) -> Blob:
        if url.startswith("data:"):
            return codec.parse_data_url(url, what)
        if url.startswith(("http://", "https://")):
            if not self.allow_remote_urls:
                raise APIError(
                    400,
                    f"{what}: remote URLs are disabled on this server; send a data: URL or "
                    "upload the file to /v1/files (or start it with --allow-remote-urls)",
                )
            return codec.fetch_url(url, self.limits.max_request_bytes, what)
        raise APIError(400, f"{what}: unsupported URL {url[:32]!r}; expected a data: URL")

    # ---- generation (runs on the worker thread) ------------------------------------------------
    def work(self, messages: list[dict[str, Any]], kwargs: dict[str, Any]) -> Iterator[Any]:
        for event in self.model.stream(messages, **kwargs):
            if isinstance(event, GeneratedMedia):
                yield codec.encode_output(event.modality, event.data)
            else:
                yield event

    async def submit(self, req: ChatCompletionRequest) -> tuple[Job, dict[str, Any]]:
        kwargs = self.generation_kwargs(req)
        if self.worker.full:  # refuse before spending time on decoding
            raise QueueFull(f"the server is busy: {self.worker.pending} requests are queued")
        messages = await run_in_threadpool(self.prepare_messages, req)
        return self.worker.submit(partial(self.work, messages, kwargs)), kwargs

    # ---- responses ------------------------------------------------------------------------------
    def media_item(self, media: EncodedMedia, media_format: str, base_url: str) -> MediaItem:
        item = MediaItem(
            type=media.modality, mime_type=media.mime_type, format=media.format, **media.info
        )
        if media_format == "base64":
            item.data = base64.b64encode(media.data).decode("ascii")
        else:
            stored = self.files.put(
                media.data, media.mime_type, f"{media.modality}.{media.format}", "output", True
            )
            item.url = f"{base_url}/v1/files/{stored.id}"
            item.expires_at = int(stored.expires_at)
        return item

    async def complete(
        self, job: Job, req: ChatCompletionRequest, max_new: int, base_url: str
    ) -> ChatCompletion:
        media: list[MediaItem] = []
        reply: Reply | None = None
        try:
            async for event in job:
                if isinstance(event, EncodedMedia):
                    media.append(self.media_item(event, req.media_format, base_url))
                elif isinstance(event, Reply):
                    reply = event
        finally:
            job.cancel()
        assert reply is not None
        return ChatCompletion(
            id=f"chatcmpl-{secrets.token_hex(12)}",
            created=int(time.time()),
            model=self.name,
            choices=[
                Choice(
                    message=AssistantMessage(content=reply.text, media=media),
                    finish_reason=_finish_reason(reply, max_new),
                )
            ],
        )

    async def events(
        self, job: Job, req: ChatCompletionRequest, max_new: int, base_url: str
    ) -> AsyncIterator[str]:
        """Server-sent events: role, text deltas, then one chunk per medium, then the finish."""
        completion_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(delta: Delta, finish: str | None = None) -> str:
            body = ChatCompletionChunk(
                id=completion_id,
                created=created,
                model=self.name,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)],
            )
            return f"data: {body.model_dump_json(exclude_none=True)}\n\n"

        trim = _Trim()
        try:
            yield chunk(Delta(role="assistant", content=""))
            async for event in job:
                if isinstance(event, TextDelta):
                    text = trim(event.text)
                    if text:
                        yield chunk(Delta(content=text))
                elif isinstance(event, EncodedMedia):
                    item = self.media_item(event, req.media_format, base_url)
                    yield chunk(Delta(media=[item]))
                elif isinstance(event, Reply):
                    yield chunk(Delta(), _finish_reason(event, max_new))
        except Exception as e:  # the 200 is sent: the error travels in the stream
            status = 400 if isinstance(e, ValueError) else 500
            if status == 500:
                log.exception("generation failed")
            yield f"data: {error_response(status, str(e)).body.decode()}\n\n"
        finally:
            job.cancel()
        yield "data: [DONE]\n\n"


class _Trim:
    """Holds back leading and trailing whitespace so that the streamed deltas concatenate to
    exactly the reply's (stripped) text."""

    def __init__(self) -> None:
        self.started = False
        self.held = ""

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip()
        self.held = text[len(body) :]
        return body


def _finish_reason(reply: Reply, max_new: int) -> str:
    return "length" if len(reply.token_ids) >= max_new else "stop"


def _file_object(item: StoredFile) -> FileObject:
    return FileObject(
        id=item.id,
        bytes=len(item.data),
        created_at=item.created_at,
        expires_at=int(item.expires_at),
        filename=item.filename,
        purpose=item.purpose,
    )


def _validation_error(errors: list[dict[str, Any]]) -> JSONResponse:
    """One readable line naming the field(s), most specific first; bad JSON is a plain 400."""
    for e in errors:
        if e["type"] == "json_invalid":
            reason = e.get("ctx", {}).get("error", "decode error")
            return error_response(400, f"the request body is not valid JSON ({reason})")
    lines: list[str] = []
    for e in sorted(errors, key=lambda e: -len(e["loc"])):
        # without "body" and pydantic's union-branch markers such as "list[...]" or "str"
        loc = [str(x) for x in e["loc"][1:] if not _branch_marker(x)]
        line = f"{'.'.join(loc) or 'body'}: {e['msg']}"
        if line not in lines:
            lines.append(line)
    more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
    return error_response(422, "; ".join(lines[:3]) + more, lines[0].split(":")[0])


def _branch_marker(x: Any) -> bool:
    return isinstance(x, str) and ("[" in x or x == "str")


def create_app(
    model: NextGPT,
    name: str,
    limits: Limits | None = None,
    api_key: str | None = None,
    allow_remote_urls: bool = False,
) -> FastAPI:
    """The API for `model`, served under the model id `name`. With `api_key`, /v1 routes need
    `Authorization: Bearer <api_key>`; /health never does."""
    limits = limits or Limits()
    worker = GenerationWorker(limits.queue_size)
    files = FileStore(limits.file_ttl_s, limits.max_stored_bytes)
    service = ChatService(model, name, limits, files, worker, allow_remote_urls)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    async def check_key(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer <key>'")

    app = FastAPI(title="NExT-GPT", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_request_bytes)
    app.state.service = service
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "model": name,
            "queue": {"pending": worker.pending, "capacity": worker.capacity},
        }

    @v1.get("/models")
    async def models() -> ModelList:
        outputs = ["text", *[m for m in MODALITIES if m in model.decoders]]
        return ModelList(data=[ModelCard(id=name, created=0, modalities=outputs)])

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(
        req: ChatCompletionRequest, request: Request
    ) -> JSONResponse | StreamingResponse:
        job, kwargs = await service.submit(req)
        base_url = str(request.base_url).rstrip("/")
        max_new = kwargs["max_new_tokens"]
        if req.stream:
            return StreamingResponse(
                service.events(job, req, max_new, base_url),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        completion = await service.complete(job, req, max_new, base_url)
        return JSONResponse(completion.model_dump(mode="json", exclude_none=True))

    @v1.post("/files")
    async def upload(
        file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()] = "user_data"
    ) -> FileObject:
        data = await file.read()
        if not data:
            raise APIError(400, "the uploaded file is empty", "file")
        # ASCII only: the name goes into a Content-Disposition header, which must be latin-1
        filename = re.sub(r"[^\w.\-]", "_", file.filename or "upload", flags=re.ASCII)
        mime_type = file.content_type
        if not mime_type or mime_type == "application/octet-stream":
            mime_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        return _file_object(files.put(data, mime_type, filename, purpose, once=False))

    @v1.get("/files/{file_id}")
    async def download(file_id: str) -> Response:
        item = files.take(file_id)
        if item is None:
            raise APIError(
                404, f"file {file_id!r} not found: it expired, was fetched already, or never was"
            )
        return Response(
            item.data,
            media_type=item.mime_type,
            headers={
                "Cache-Control": "no-store",
                "Content-Disposition": f'inline; filename="{item.filename}"',
            },
        )

    app.include_router(v1)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, str(e), e.param)

    @app.exception_handler(LimitExceeded)
    async def _limit(request: Request, e: LimitExceeded) -> JSONResponse:
        return error_response(e.status, str(e), e.param)

    @app.exception_handler(ValueError)  # MediaError, BadInput and the model's own input checks
    async def _bad_input(request: Request, e: ValueError) -> JSONResponse:
        return error_response(400, str(e))

    @app.exception_handler(QueueFull)
    async def _busy(request: Request, e: QueueFull) -> JSONResponse:
        response = error_response(503, f"{e}; retry shortly")
        response.headers["Retry-After"] = "1"
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _validation_error(list(e.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("internal error")
        return error_response(500, f"internal error: {type(e).__name__}: {e}")

    return app
