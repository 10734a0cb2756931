"""`nextgpt generate`: files that open, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nextgpt.cli import main

EXAMPLE = Path(__file__).parents[1] / "nextgpt" / "assets" / "example.png"


def test_generate_writes_png_wav_mp4(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "generate",
            "Draw, play and film it.",
            "--image",
            str(EXAMPLE),
            "--want",
            "image,audio,video",
            "--model",
            "tiny",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.split()
    names = sorted(Path(p).name for p in printed)
    assert names == ["audio_0.wav", "image_0.png", "reply.txt", "video_0.mp4"]
    with Image.open(out / "image_0.png") as im:
        assert im.size[0] > 0 and np.asarray(im).std() > 0
    wave, rate = sf.read(out / "audio_0.wav")
    assert rate == 16000 and len(wave) == rate  # the tiny preset asks for 1 s
    with av.open(str(out / "video_0.mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8
    assert (out / "reply.txt").read_text().endswith("\n")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "missing.png"], "missing.png"),
        (["--want", "image,smell"], "unknown modality 'smell'"),
        (["--model", "no-such-model"], "no-such-model"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
    code = main(["generate", "hi", "--out", str(tmp_path / "o"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unreadable_media_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF not really a wave file")
    code = main(["generate", "hi", "--audio", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "broken.wav" in err and err.count("\n") == 1


def test_console_script_entry_point(tmp_path):
    """The installed `nextgpt` command itself: exit code 2 and no traceback on bad input."""
    exe = Path(sys.executable).with_name("nextgpt")
    result = subprocess.run(
        [str(exe), "generate", "hi", "--video", str(tmp_path / "none.mp4"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "none.mp4" in result.stderr and "Traceback" not in result.stderr


def test_generate_from_a_training_run_directory(tiny_model, tmp_path, capsys):
    """`--model` takes a run directory too: its `latest` checkpoint is loaded."""
    run = tmp_path / "runs" / "stage3"
    tiny_model.save_pretrained(run / "checkpoint-00000007")
    (run / "latest").write_text("checkpoint-00000007\n")
    code = main(
        ["generate", "Draw.", "--model", str(run), "--want", "image", "--out", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "image_0.png").is_file()
