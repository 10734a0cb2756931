"""`nextgpt serve`: the OpenAI-compatible API, driven by the `openai` client over real HTTP.

Servers run on 127.0.0.1 in a thread of this process (one per module, plus a gated one for the
queue tests) and are always shut down. Replies are checked against `NextGPT.generate` on the same
inputs, so the API provably feeds the model what the client sent.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
import uvicorn
from PIL import Image

from nextgpt import media as media_io
from nextgpt.serving.app import create_app
from nextgpt.serving.files import FileStore
from nextgpt.serving.limits import Limits

KEY = "test-key"
LIMITS = Limits(
    max_request_bytes=2**20,
    max_media_items=3,
    max_image_pixels=128 * 128,
    max_audio_seconds=2.0,
    max_video_frames=16,
    max_video_frame_pixels=64 * 64,
    max_new_tokens=64,
    max_steps=8,
    max_output_pixels=64 * 64,
    max_output_frames=8,
    max_output_seconds=2.0,
    queue_size=4,
)
TOKENS = 12


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Run `app` under uvicorn on a free 127.0.0.1 port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def base_url(tiny_model) -> Iterator[str]:
    with serve(create_app(tiny_model, "tiny", LIMITS, api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def api(base_url) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120
    ) as c:
        yield c


# ---- sample media ------------------------------------------------------------------------------
def png_bytes(width: int = 40, height: int = 30, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    sf.write(buf, 0.5 * np.sin(2 * np.pi * 440 * t), rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def mp4_bytes(tmp_path: Path, frames: int = 8, side: int = 32) -> bytes:
    rng = np.random.default_rng(2)
    path = media_io.save_mp4(
        rng.integers(0, 255, (frames, side, side, 3), np.uint8), 8.0, tmp_path / "v.mp4"
    )
    return path.read_bytes()


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url("image/png", data)}}


def user(*parts: dict, text: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def reference(model, content: list[dict], **kwargs) -> str:
    return model.generate(
        [{"role": "user", "content": content}], max_new_tokens=TOKENS, **kwargs
    ).text


# ---- the happy paths ---------------------------------------------------------------------------
def test_models_health_and_api_key(client, base_url, api):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].model_extra["modalities"] == ["text", "image", "audio", "video"]
    health = httpx.get(f"{base_url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["queue"] == {"pending": 0, "capacity": 4}

    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        wrong.models.list()
    bare = httpx.get(f"{base_url}/v1/models")
    assert bare.status_code == 401 and bare.json()["error"]["type"] == "authentication_error"


def test_image_to_text_matches_the_python_api(client, tiny_model):
    png = png_bytes()
    response = client.chat.completions.create(
        model="tiny", messages=user(image_part(png)), max_tokens=TOKENS
    )
    expected = reference(
        tiny_model,
        [
            {"type": "image", "image": Image.open(io.BytesIO(png))},
            {"type": "text", "text": "What is it?"},
        ],
    )
    choice = response.choices[0]
    assert response.object == "chat.completion" and response.model == "tiny"
    assert choice.message.content == expected and expected
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.model_extra["media"] == []  # the model chose no media


def test_text_to_image_returns_a_png_of_the_requested_size(client):
    response = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Draw a red ball."}],
        modalities=["text", "image"],
        max_tokens=TOKENS,
        extra_body={"decoder_options": {"image": {"height": 32, "width": 48, "steps": 2}}},
    )
    media = response.choices[0].message.model_extra["media"]
    assert [m["type"] for m in media] == ["image"]
    assert media[0]["mime_type"] == "image/png" and media[0]["width"] == 48
    with Image.open(io.BytesIO(base64.b64decode(media[0]["data"]))) as image:
        assert image.format == "PNG" and image.size == (48, 32)


def test_audio_and_video_in_media_out_as_fetch_once_urls(client, api, tiny_model, tmp_path):
    wav, mp4 = wav_bytes(), mp4_bytes(tmp_path)
    parts = [
        {
            "type": "input_audio",
            "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"},
        },
        {"type": "video_url", "video_url": {"url": data_url("video/mp4", mp4)}},
    ]
    options = {"audio": {"steps": 2}, "video": {"steps": 2, "num_frames": 4}}
    response = client.chat.completions.create(
        model="tiny",
        messages=user(*parts, text="Hear and watch, then answer in kind."),
        modalities=["audio", "video"],
        max_tokens=TOKENS,
        extra_body={"media_format": "url", "decoder_options": options},
    )
    (tmp_path / "a.wav").write_bytes(wav)
    expected = reference(
        tiny_model,
        [
            {"type": "audio", "audio": str(tmp_path / "a.wav")},
            {"type": "video", "video": str(tmp_path / "v.mp4")},
            {"type": "text", "text": "Hear and watch, then answer in kind."},
        ],
        modalities=["audio", "video"],
        decoder_options=options,
    )
    message = response.choices[0].message
    assert message.content == expected
    media = {m["type"]: m for m in message.model_extra["media"]}
    assert set(media) == {"audio", "video"} and all(m.get("data") is None for m in media.values())
    assert all(m["expires_at"] > time.time() for m in media.values())

    wave, rate = sf.read(io.BytesIO(api.get(media["audio"]["url"]).content))
    assert rate == 16000 and len(wave) == 16000  # the tiny audio decoder makes 1 s
    video = api.get(media["video"]["url"])
    assert video.headers["content-type"] == "video/mp4"
    with av.open(io.BytesIO(video.content)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 4

    again = api.get(media["audio"]["url"])  # fetch-once
    assert again.status_code == 404 and "fetched already" in again.json()["error"]["message"]


def test_stream_sends_text_deltas_then_media_then_the_finish(client):
    request = {
        "model": "tiny",
        "messages": user(image_part(png_bytes(seed=3)), text="Describe, then draw it."),
        "modalities": ["text", "image"],
        "max_tokens": TOKENS,
        "extra_body": {"decoder_options": {"image": {"steps": 2}}},
    }
    whole = client.chat.completions.create(**request).choices[0].message
    kinds, deltas, finish = [], [], None
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        if delta.content:
            kinds.append("text")
            deltas.append(delta.content)
        if (delta.model_extra or {}).get("media"):
            kinds.append("media")
            item = delta.model_extra["media"][0]
            with Image.open(io.BytesIO(base64.b64decode(item["data"]))) as image:
                assert image.format == "PNG"
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(deltas) == whole.content and len(deltas) > 1
    assert kinds[-1] == "media" and kinds.count("media") == 1  # media after every text delta
    assert finish in ("stop", "length")


def test_uploaded_file_is_referenced_by_id(client, api, tiny_model):
    png = png_bytes(seed=5)
    uploaded = client.files.create(file=("pic.png", png, "image/png"), purpose="user_data")
    assert uploaded.bytes == len(png) and uploaded.filename == "pic.png"
    response = client.chat.completions.create(
        model="tiny",
        messages=user({"type": "file", "file": {"file_id": uploaded.id}}),
        max_tokens=TOKENS,
    )
    expected = reference(
        tiny_model,
        [
            {"type": "image", "image": Image.open(io.BytesIO(png))},
            {"type": "text", "text": "What is it?"},
        ],
    )
    assert response.choices[0].message.content == expected
    for _ in range(2):  # an upload is not fetch-once
        assert api.get(f"/v1/files/{uploaded.id}").content == png


def test_concurrent_requests_get_their_own_replies(client):
    """Four requests at once, each with its own prompt, sampling seed and outputs, get exactly
    what the same request gets alone: no state leaks between requests."""
    requests = [
        {
            "messages": [{"role": "user", "content": f"Request number {i}."}],
            "temperature": 0.9,
            "seed": i,
            "modalities": ["text", want],
            "extra_body": {"decoder_options": {want: {"steps": 2}}},
        }
        for i, want in enumerate(["image", "audio", "image", "audio"])
    ]

    def ask(req: dict) -> tuple[str, list[str]]:
        message = (
            client.chat.completions.create(model="tiny", max_tokens=TOKENS, **req)
            .choices[0]
            .message
        )
        return message.content, [m["type"] for m in message.model_extra["media"]]

    alone = [ask(r) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(ask, requests))
    assert together == alone
    assert [kinds for _, kinds in alone] == [["image"], ["audio"], ["image"], ["audio"]]
    assert len({text for text, _ in alone}) > 1


# ---- bad input ---------------------------------------------------------------------------------
def chat_body(content, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def media_content(part: dict) -> list[dict]:
    return [part, {"type": "text", "text": "hi"}]


BAD_REQUESTS = [
    ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
    ("no messages", {"model": "tiny"}, 422, "messages: Field required"),
    ("unknown part type", chat_body([{"type": "smell"}]), 422, "'smell'"),
    ("unknown modality", chat_body("hi", modalities=["smell"]), 400, "unknown modality 'smell'"),
    (
        "unreadable image",
        chat_body(media_content(image_part(b"not an image at all"))),
        400,
        "messages[0].content[0]: cannot read an image",
    ),
    (
        "bad base64",
        chat_body(
            media_content({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}})
        ),
        400,
        "not valid base64",
    ),
    ("huge image", chat_body(media_content(image_part(png_bytes(200, 200)))), 413, "200x200"),
    (
        "long audio",
        chat_body(
            media_content(
                {
                    "type": "input_audio",
                    "input_audio": {
                        "data": base64.b64encode(wav_bytes(3.0)).decode(),
                        "format": "wav",
                    },
                }
            )
        ),
        413,
        "audio of 3.0 s exceeds the limit of 2 s",
    ),
    (
        "unknown audio format",
        chat_body(
            media_content({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "xyz"}})
        ),
        400,
        "unknown audio format 'xyz'",
    ),
    (
        "too many inputs",
        chat_body([image_part(png_bytes(8, 8))] * 4),
        413,
        "more than 3 media inputs",
    ),
    (
        "remote URL",
        chat_body(
            media_content({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}})
        ),
        400,
        "remote URLs are disabled",
    ),
    (
        "unknown file id",
        chat_body(media_content({"type": "file", "file": {"file_id": "file-nope"}})),
        400,
        "file 'file-nope' not found",
    ),
    ("too many steps", chat_body("hi", decoder_options={"image": {"steps": 50}}), 400, "steps=50"),
    (
        "output too large",
        chat_body("hi", decoder_options={"image": {"height": 512, "width": 512}}),
        400,
        "512x512 exceeds",
    ),
    ("typo in options", chat_body("hi", decoder_options={"image": {"stpes": 2}}), 422, "stpes"),
    ("odd size", chat_body("hi", decoder_options={"image": {"height": 33}}), 422, "multiple of 8"),
    ("too many tokens", chat_body("hi", max_tokens=1000), 400, "max_tokens=1000"),
    ("n > 1", chat_body("hi", n=2), 400, "n=2"),
    ("unknown model", {**chat_body("hi"), "model": "gpt-x"}, 404, "'gpt-x' is not served"),
    (
        "nothing to reply to",
        {"model": "tiny", "messages": [{"role": "assistant", "content": "hi"}]},
        400,
        "the last message must be the user's",
    ),
    ("body too large", b"x" * (2**20 + 1), 413, "limit of 1048576 bytes"),
]


@pytest.mark.parametrize(
    "body, status, message", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(api, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = api.post(
        "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status
    assert api.get("/health").json()["status"] == "ok"


def test_long_video_is_refused(api, tmp_path):
    part = {
        "type": "video_url",
        "video_url": {"url": data_url("video/mp4", mp4_bytes(tmp_path, 20))},
    }
    response = api.post("/v1/chat/completions", json=chat_body(media_content(part)))
    assert response.status_code == 413
    assert "video of 20 frames exceeds the limit of 16" in response.json()["error"]["message"]


# ---- the queue, remote URLs, the file store, the command ---------------------------------------
class GatedModel:
    """The tiny model, held at a gate before each generation, to fill the queue on purpose."""

    def __init__(self, model):
        self.model = model
        self.decoders = model.decoders
        self.config = model.config
        self.gate = threading.Event()
        self.events = 0  # how many events the model has produced

    def stream(self, *args, **kwargs):
        assert self.gate.wait(60), "the test never opened the gate"
        for event in self.model.stream(*args, **kwargs):
            self.events += 1
            yield event


def test_full_queue_gets_503_while_health_stays_fast(tiny_model):
    gated = GatedModel(tiny_model)
    app = create_app(gated, "tiny", Limits(queue_size=2))
    with (
        serve(app) as url,
        httpx.Client(base_url=url, timeout=120) as api,
        ThreadPoolExecutor(2) as pool,
    ):
        body = chat_body("hi", max_tokens=4)
        waiting = [pool.submit(api.post, "/v1/chat/completions", json=body) for _ in range(2)]
        deadline = time.monotonic() + 30
        while api.get("/health").json()["queue"]["pending"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        start = time.monotonic()
        assert api.get("/health").status_code == 200
        assert time.monotonic() - start < 1.0  # the event loop is free while the model works
        busy = api.post("/v1/chat/completions", json=body)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["error"]["message"]
        gated.gate.set()
        assert [f.result().status_code for f in waiting] == [200, 200]
        assert api.post("/v1/chat/completions", json=body).status_code == 200


def test_a_client_that_leaves_a_stream_frees_its_slot(tiny_model):
    gated = GatedModel(tiny_model)
    body = {**chat_body("Tell me a long story."), "max_tokens": 64, "stream": True}
    with (
        serve(create_app(gated, "tiny", Limits(queue_size=1))) as url,
        httpx.Client(base_url=url, timeout=60) as api,
    ):
        with api.stream("POST", "/v1/chat/completions", json=body) as response:
            first = next(response.iter_lines())
            assert (
                '"role":"assistant"' in first and api.get("/health").json()["queue"]["pending"] == 1
            )
        time.sleep(1.0)  # the server notices the disconnect
        gated.gate.set()
        deadline = time.monotonic() + 30
        while api.get("/health").json()["queue"]["pending"]:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert gated.events <= 2  # stopped at the first event instead of 64 tokens
        again = api.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
        assert again.status_code == 200


def test_remote_urls_are_fetched_only_when_enabled(tiny_model, tmp_path):
    png = png_bytes(seed=7)
    (tmp_path / "pic.png").write_bytes(png)
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    files = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    pic = f"http://127.0.0.1:{files.server_address[1]}/pic.png"
    body = chat_body(
        media_content({"type": "image_url", "image_url": {"url": pic}}), max_tokens=TOKENS
    )
    try:
        with serve(create_app(tiny_model, "tiny", allow_remote_urls=True)) as url:
            response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    finally:
        files.shutdown()
        files.server_close()
    assert response.status_code == 200, response.text
    expected = reference(
        tiny_model,
        [{"type": "image", "image": Image.open(io.BytesIO(png))}, {"type": "text", "text": "hi"}],
    )
    assert response.json()["choices"][0]["message"]["content"] == expected


def test_file_store_expires_serves_once_and_evicts_the_oldest():
    now = [1000.0]
    store = FileStore(ttl_s=60, max_bytes=10, clock=lambda: now[0])
    once = store.put(b"abc", "image/png", "a.png", "output", once=True)
    kept = store.put(b"def", "image/png", "b.png", "user_data", once=False)
    assert store.take(once.id).data == b"abc" and store.take(once.id) is None
    assert store.take(kept.id).data == b"def" and store.take(kept.id) is not None
    now[0] += 61
    assert store.get(kept.id) is None and len(store) == 0
    first = store.put(b"123456", "x", "1", "p", once=False)
    second = store.put(b"7890", "x", "2", "p", once=False)
    third = store.put(b"ab", "x", "3", "p", once=False)  # 6 + 4 + 2 > 10: the oldest goes
    assert store.get(first.id) is None and store.get(second.id) and store.get(third.id)
    with pytest.raises(ValueError, match="exceeds the store's limit"):
        store.put(b"x" * 11, "x", "4", "p", once=False)


def test_serve_command_starts_and_refuses_bad_arguments():
    exe = Path(sys.executable).with_name("nextgpt")
    bad = subprocess.run(
        [str(exe), "serve", "--model", "no-such-model"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "no-such-model" in bad.stderr and "Traceback" not in bad.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "NEXTGPT_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [str(exe), "serve", "--port", str(port), "--max-new-tokens", "16"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "nextgpt serve did not come up"
            time.sleep(0.2)
        # the default model, served under its name
        reply = client.chat.completions.create(
            model="nextgpt-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None
        with pytest.raises(openai.BadRequestError, match="max_tokens=17"):
            client.chat.completions.create(
                model="nextgpt-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=17
            )
    finally:
        proc.terminate()
        proc.wait(30)


def test_uploaded_file_with_a_non_ascii_name_downloads(tiny_model):
    """The stored name goes into Content-Disposition (latin-1): a unicode name used to fail the
    download with a 400 'latin-1 codec can't encode' after the upload had succeeded."""
    from fastapi.testclient import TestClient

    with TestClient(create_app(tiny_model, "tiny", LIMITS)) as client:
        uploaded = client.post("/v1/files", files={"file": ("日本 ü.png", b"\x89PNG", "image/png")})
        assert uploaded.status_code == 200
        assert uploaded.json()["filename"].isascii()
        got = client.get(f"/v1/files/{uploaded.json()['id']}")
        assert got.status_code == 200 and got.content == b"\x89PNG"
        assert got.headers["content-type"] == "image/png"
