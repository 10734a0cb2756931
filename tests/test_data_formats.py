"""Training records: each format read into Samples, and bad records named by file and index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nextgpt import media as media_io
from nextgpt.batch import OutputTarget
from nextgpt.data.formats import DataError, read_samples


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "out.png"):
        media_io.save_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8), tmp_path / name)
    media_io.save_wav(np.zeros(1600, np.float32), 16000, tmp_path / "tone.wav")
    return tmp_path


def write(root: Path, records: list, name: str = "data.json") -> Path:
    path = root / name
    path.write_text(json.dumps(records))
    return path


def kinds(turn) -> list[str]:
    return [p.kind for p in turn.parts]


def test_comprehension_record_puts_media_at_its_placeholder(root):
    path = write(
        root,
        [
            {
                "image_name": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image>\n Describe the image."},
                    {"from": "gpt", "value": "a cat"},
                ],
            },
            {  # no placeholder: the media go first in the first human turn (LLaVA)
                "input_audio": "tone.wav",
                "conversations": [
                    {"from": "human", "value": "What is it?"},
                    {"from": "gpt", "value": "a tone"},
                ],
            },
        ],
    )
    first, second = read_samples(path).samples
    user, gpt = first.turns
    assert (user.role, kinds(user)) == ("user", ["image", "text"])
    assert user.parts[0].value == root / "a.png" and user.parts[1].value == "Describe the image."
    assert (gpt.role, gpt.parts[0].value) == ("assistant", "a cat")
    assert kinds(second.turns[0]) == ["audio", "text"]
    assert first.source == f"{path}: record 0"


def test_generation_record_targets_each_signal_group(root):
    path = write(
        root,
        [
            {
                "output_image": ["out.png", "a.png"],
                "image_captions": ["a red ball", "a blue box"],
                "conversations": [
                    {"from": "human", "value": "Draw a red ball, then a blue box."},
                    {"from": "gpt", "value": "Sure! <image> And: <image>"},
                ],
            },
            {  # generic `caption`, and no placeholder: the group ends the last gpt turn
                "output_audio": "tone.wav",
                "caption": "a beep",
                "conversations": [
                    {"from": "human", "value": "Play a beep."},
                    {"from": "gpt", "value": "Here it is."},
                ],
            },
        ],
    )
    images, audio = read_samples(path).samples
    gpt = images.turns[1]
    assert kinds(gpt) == ["text", "image", "text", "image"]
    assert gpt.parts[1].value == OutputTarget("a red ball", None, root / "out.png")
    assert gpt.parts[3].value == OutputTarget("a blue box", None, root / "a.png")
    assert kinds(audio.turns[1]) == ["text", "audio"]
    assert audio.turns[1].parts[1].value.caption == "a beep"


def test_mosit_record_uses_lists_in_order_and_turn_fields(root):
    path = write(
        root,
        [
            {
                "image_list": ["a.png", "out.png"],
                "image_captions": ["a drawn picture"],
                "conversation": [
                    {"from": "human", "value": "Look: <image> What is it?"},
                    {"from": "gpt", "value": "A picture. Here is another: <image>"},
                    {"from": "human", "value": "Now a sound."},
                    {
                        "from": "gpt",
                        "value": "Listen.",
                        "audio_list": ["tone.wav"],
                        "caption": "a soft tone",
                    },
                ],
            }
        ],
    )
    (sample,) = read_samples(path).samples
    t0, t1, t2, t3 = sample.turns
    assert kinds(t0) == ["text", "image", "text"] and t0.parts[1].value == root / "a.png"
    assert t1.parts[-1].value == OutputTarget("a drawn picture", None, root / "out.png")
    assert kinds(t2) == ["text"]
    assert kinds(t3) == ["text", "audio"]
    assert t3.parts[1].value == OutputTarget("a soft tone", None, root / "tone.wav")


def test_text_only_and_jsonl(root):
    path = root / "data.jsonl"
    lines = [
        json.dumps(
            {"conversations": [{"from": "user", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
        ),
        "{not json",
    ]
    path.write_text("\n".join(lines))
    with pytest.raises(DataError, match=r"data\.jsonl: record 1: line 2 is not valid JSON"):
        read_samples(path)
    result = read_samples(path, skip_bad=True)
    assert len(result.samples) == 1 and len(result.skipped) == 1
    assert [t.role for t in result.samples[0].turns] == ["user", "assistant"]


def test_jsonl_keeps_unicode_line_separators_inside_strings(root):
    """U+2028 / U+0085 are legal unescaped in a JSON string; they used to split the record."""
    record = {
        "conversations": [
            {"from": "human", "value": "one\u2028two\x85three"},
            {"from": "gpt", "value": "ok\r"},
        ]
    }
    path = root / "data.jsonl"
    line = json.dumps(record, ensure_ascii=False)
    path.write_text(f"{line}\r\n\n{line}\n", encoding="utf-8")
    result = read_samples(path)
    assert len(result.samples) == 2
    assert result.samples[0].turns[0].parts[0].value == "one\u2028two\x85three"


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"conversations": "hello"}, "'conversations' must be a non-empty list"),
        (
            {"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]},
            "turn 1: unknown 'from' 'bot'",
        ),
        (  # an unhashable role was a TypeError that skip_bad could not skip
            {"conversations": [{"from": ["human"], "value": "x"}, {"from": "gpt", "value": "y"}]},
            "turn 0: unknown 'from' \\['human'\\]",
        ),
        ({"conversations": [{"from": "human", "value": 3}]}, "turn 0: 'value' must be a string"),
        ({"conversations": [{"from": "human", "value": "hi"}]}, "no gpt turn"),
        (
            {
                "image_name": "a.png",
                "conversations": [
                    {"from": "human", "value": "<image> <image>"},
                    {"from": "gpt", "value": "two"},
                ],
            },
            "human turns have 2 <image> placeholder\\(s\\) but the record has 1",
        ),
        ({"messages": []}, "no 'conversations'"),
        (
            {
                "image_list": ["a.png"],
                "conversation": [
                    {"from": "human", "value": "hi"},
                    {"from": "gpt", "value": "ok"},
                ],
            },
            "1 unused entr",
        ),
    ],
)
def test_malformed_record_names_file_index_and_problem(root, record, message):
    good = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}
    path = write(root, [good, good, record])
    with pytest.raises(DataError, match=rf"data\.json: record 2: {message}"):
        read_samples(path)
    result = read_samples(path, skip_bad=True)
    assert len(result.samples) == 2
    assert len(result.skipped) == 1 and "record 2" in result.skipped[0]


def test_missing_media_file_is_named(root):
    record = {
        "input_image": "images/missing.png",
        "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}],
    }
    path = write(root, [record])
    missing = root / "images" / "missing.png"
    with pytest.raises(DataError, match=rf"record 0: 'input_image' file not found: {missing}"):
        read_samples(path)
    # media paths are relative to the data root when one is given
    (root / "media").mkdir()
    media_io.save_png(np.zeros((8, 8, 3), np.uint8), root / "media" / "images" / "missing.png")
    assert len(read_samples(path, root=root / "media").samples) == 1


def test_not_a_list_names_the_file(root):
    path = root / "bad.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(DataError, match=r"bad\.json: expected a JSON list of records"):
        read_samples(path)
    with pytest.raises(DataError, match="data file not found"):
        read_samples(root / "nope.json")
    latin1 = root / "latin1.jsonl"  # was a UnicodeDecodeError naming no file
    latin1.write_bytes('{"conversations": [{"value": "caf\xe9"}]}'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl: not UTF-8 text \(byte 33"):
        read_samples(latin1)
