"""`nextgpt chat`: streamed replies, attachments, generated media fed back, transcript, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from nextgpt.chat import ChatSession, ChatSettings, run_chat
from nextgpt.cli import main

EXAMPLE = Path(__file__).parents[1] / "nextgpt" / "assets" / "example.png"
SETTINGS = ChatSettings(max_new_tokens=12, decoder_options={"image": {"steps": 2}})


def session(model, tmp_path: Path) -> tuple[ChatSession, io.StringIO]:
    out = io.StringIO()
    return ChatSession(model, tmp_path / "media", SETTINGS, stdout=out), out


def test_a_conversation_with_attachments_generated_media_and_a_transcript(
    tiny_model, tmp_path, monkeypatch
):
    encoded: list[tuple[str, object]] = []
    prepare = tiny_model.prepare_media
    monkeypatch.setattr(
        tiny_model, "prepare_media", lambda m, v: encoded.append((m, v)) or prepare(m, v)
    )
    chat, out = session(tiny_model, tmp_path)
    run_chat(chat, [f"/image {EXAMPLE}", "What is in this picture?"])
    first = tiny_model.generate(
        [{"role": "user", "content": [
            {"type": "image", "image": str(EXAMPLE)},
            {"type": "text", "text": "What is in this picture?"},
        ]}],
        max_new_tokens=12,
    ).text  # fmt: skip
    assert f"attached image {EXAMPLE}" in out.getvalue()
    assert f"nextgpt> {first}\n" in out.getvalue()  # the streamed text is the reply

    run_chat(chat, ["/want image", "Draw it."])
    generated = tmp_path / "media" / "001_image.png"
    assert f"[image] {generated}" in out.getvalue()
    with Image.open(generated) as image:
        assert image.format == "PNG" and image.size == (32, 32)

    encoded.clear()
    run_chat(chat, ["/image", "Describe your drawing.", f"/save {tmp_path / 't.json'}", "/quit"])
    assert ("image", str(generated)) in encoded  # the drawing went back through the encoder

    saved = json.loads((tmp_path / "t.json").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] * 3
    assert saved[3]["content"][1] == {"type": "image", "image": str(generated)}
    assert saved[4]["content"][0] == {"type": "image", "image": str(generated)}
    # the transcript is the model's own message format: replaying it gives the same last reply
    replay = tiny_model.generate(saved[:5], max_new_tokens=12, decoder_options={})
    assert replay.text == saved[5]["content"][0]["text"]


def test_bad_input_prints_an_error_and_the_chat_goes_on(tiny_model, tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    chat, out = session(tiny_model, tmp_path)
    run_chat(
        chat,
        [
            f"/image {tmp_path / 'missing.png'}",
            f"/audio {broken}",
            "/video",
            "/want image,smell",
            "/frobnicate",
            "/save",
        ],
    )
    errors = [line for line in out.getvalue().splitlines() if line.startswith("error: ")]
    assert len(errors) == 6
    for expected, line in zip(
        [
            "missing.png",
            "broken.wav",
            "no video has been generated",
            "'smell'",
            "/frobnicate",
            "/save",
        ],
        errors,
    ):
        assert expected in line
    assert chat.pending == [] and chat.messages == []

    run_chat(chat, ["hello", "/reset", "hello again"])
    assert "new conversation" in out.getvalue()
    assert len(chat.messages) == 2  # only the turn after /reset


def test_chat_command_reads_stdin_and_refuses_a_bad_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        "sys.stdin", io.StringIO(f"/image {EXAMPLE}\nWhat is this?\n/want audio\nPlay it.\n")
    )
    code = main(["chat", "--out", str(tmp_path), "--max-new-tokens", "8", "--steps", "2"])
    printed = capsys.readouterr().out
    assert code == 0 and printed.count("nextgpt> ") == 2
    assert f"[audio] {tmp_path / '001_audio.wav'}" in printed

    assert main(["chat", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
    assert main(["chat", "--size", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err
