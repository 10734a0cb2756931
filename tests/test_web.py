"""`nextgpt web`: the Gradio page, driven in headless Chromium (Debian's) through Playwright.

The page is served on 127.0.0.1 from this process; every request the page makes to any other host
is blocked and counted, and the test fails if there is one. A screenshot is kept under
out/test-artifacts/ (or $NEXTGPT_TEST_ARTIFACTS).
"""

from __future__ import annotations

import os
import re
import socket
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image

from nextgpt.serving.limits import Limits
from nextgpt.web import build_demo, launch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).parents[1]
EXAMPLE = ROOT / "nextgpt" / "assets" / "example.png"
CHROMIUM = os.environ.get("NEXTGPT_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("NEXTGPT_TEST_ARTIFACTS", ROOT / "out" / "test-artifacts"))
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
TOKENS = 24
IDLE = """n => document.querySelectorAll('#chat [data-testid=bot]').length >= n &&
    document.querySelector('#chat [data-testid=status-tracker]').classList.contains('hide')"""


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny ops on two threads crawl when other processes share the cores; one thread does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(
            f"headless Chromium not found at {CHROMIUM}: `make install` installs Debian's "
            "(apt-get install chromium); or point $NEXTGPT_CHROMIUM at another binary"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tiny_model, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    out = tmp_path_factory.mktemp("web")
    demo = build_demo(tiny_model, out, Limits(max_image_pixels=80 * 80))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch(demo, "127.0.0.1", port, out, block=False, max_file_mb=1)
    try:
        yield f"http://127.0.0.1:{port}", out
    finally:
        demo.close()


@pytest.fixture
def page(browser, site):
    """A fresh page on the demo; asserts afterwards that it reached nothing but the server."""
    url, _ = site
    context = browser.new_context(viewport={"width": 1000, "height": 1600})
    page = context.new_page()
    page.set_default_timeout(60_000)
    outbound: list[str] = []

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outbound.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(url)
    page.wait_for_selector("#message textarea")
    page.fill("#max-new-tokens input[type=number]", str(TOKENS))
    yield page
    context.close()
    assert outbound == [], f"the page tried to reach outside the server: {outbound}"


def send(page, text: str, files: tuple[Path, ...] = ()) -> None:
    if files:
        page.locator("#message input[type=file]").set_input_files([str(f) for f in files])
        page.wait_for_function(
            "n => document.querySelectorAll('#message .thumbnail-item').length === n",
            arg=len(files),
        )
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def replies(page) -> list[str]:
    bots = page.locator("#chat [data-testid=bot]")
    return [bots.nth(i).inner_text() for i in range(bots.count())]


def plain(text: str) -> str:
    """What a browser shows of a text: no control characters, whitespace collapsed."""
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) != "Cc")
    return re.sub(r"\s+", " ", text).strip()


def test_caption_an_upload_then_render_generated_image_audio_and_video(page, site, tiny_model):
    send(page, "What is in this picture?", (EXAMPLE,))
    page.wait_for_function(IDLE, arg=1)
    caption = tiny_model.generate(
        [{"role": "user", "content": [
            {"type": "image", "image": str(EXAMPLE)},
            {"type": "text", "text": "What is in this picture?"},
        ]}],
        max_new_tokens=TOKENS,
    ).text  # fmt: skip
    assert plain(replies(page)[-1]) == plain(caption) != ""
    assert page.locator("#chat [data-testid=user] img").count() == 1  # the upload is shown

    for label in ("image", "audio", "video"):
        page.locator("#wants label", has_text=label).click()
    page.fill("#size input[type=number]", "48")
    page.fill("#steps input[type=number]", "2")
    send(page, "Draw it, play it and film it.")
    page.wait_for_function(IDLE, arg=4)  # the text, then one message per medium
    image = page.locator("#chat [data-testid=bot] img").last
    image.wait_for()
    page.wait_for_function(
        "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
    )
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [48, 48]
    assert page.locator("#chat [data-testid=bot] audio").count() == 1
    assert page.locator("#chat [data-testid=bot] video").count() == 1

    _, out = site
    with Image.open(next(out.glob("*_image.png"))) as saved:
        assert saved.size == (48, 48)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.add_style_tag(  # unroll the chat's scroll box so the screenshot shows all of it
        content="#chat, #chat .bubble-wrap {height: auto !important; overflow: visible !important}"
    )
    shot = ARTIFACTS / "web-demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_bad_uploads_show_an_error_and_the_page_keeps_working(page, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not an image")
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (0, 128, 255)).save(big)
    expected = {
        broken: "broken.png: cannot read an image",
        big: "big.png: image of 100x100 = 10000 pixels exceeds the limit of 6400 pixels",
    }
    for path, message in expected.items():
        send(page, "What is this?", (path,))
        toast = page.locator("[data-testid=toast-body]", has_text=message)
        toast.wait_for()
        toast.locator("button").first.click()  # dismiss it
        # the message stays in the box for the user to fix: take the file out
        page.locator("#message .delete-button").click()
        page.wait_for_function("() => !document.querySelector('#message .thumbnail-item')")
    assert replies(page) == []
    send(page, "Hello?")
    page.wait_for_function(IDLE, arg=1)
    assert len(replies(page)) == 1
