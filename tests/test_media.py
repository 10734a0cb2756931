"""Media files: PNG / WAV / MP4 round trips, other audio formats, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from nextgpt.media import (
    MediaError,
    load_audio,
    load_image,
    load_video,
    save_mp4,
    save_png,
    save_wav,
)


def gradient_image(h: int = 20, w: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1).astype(np.uint8)


def tone(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()])


def colour_frames(t: int, h: int, w: int) -> np.ndarray:
    """Frame i is one flat colour that changes with i (codec-friendly, easy to compare)."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i] = (20 + 20 * i, 200 - 15 * i, 60 + 10 * (i % 3))
    return frames


# ---- images ----------------------------------------------------------------------------------
def test_png_round_trip_is_lossless(tmp_path: Path) -> None:
    pixels = gradient_image()
    path = save_png(pixels, tmp_path / "sub" / "a.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (30, 20)
    assert np.array_equal(np.asarray(image), pixels)
    assert np.array_equal(np.asarray(load_image(str(path))), pixels)


def test_image_inputs_are_coerced_to_rgb() -> None:
    assert np.asarray(load_image(np.full((4, 5, 3), 0.5))).tolist()[0][0] == [128, 128, 128]
    grey = load_image(np.full((4, 5), 7, np.uint8))
    assert grey.size == (5, 4) and np.asarray(grey)[0, 0].tolist() == [7, 7, 7]
    rgba = Image.new("RGBA", (3, 2), (10, 20, 30, 0))
    assert np.asarray(load_image(rgba))[1, 2].tolist() == [10, 20, 30]
    clipped = load_image(np.array([[[-0.5, 0.25, 2.0]]]))
    assert np.asarray(clipped)[0, 0].tolist() == [0, 64, 255]


def test_image_errors_name_the_input(tmp_path: Path) -> None:
    with pytest.raises(MediaError, match=r"image array of shape \(5, 5, 7\): expected \(H, W, 3\)"):
        load_image(np.zeros((5, 5, 7), np.uint8))
    with pytest.raises(MediaError, match="dtype complex128"):
        load_image(np.zeros((5, 5, 3), complex))
    with pytest.raises(MediaError, match=r"missing\.png: file not found"):
        load_image(tmp_path / "missing.png")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(MediaError, match=r"bad\.png: cannot read an image") as err:
        load_image(bad)
    assert "\n" not in str(err.value)
    truncated = tmp_path / "truncated.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    save_png(noise, truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])  # of ~12 kB
    with pytest.raises(MediaError, match=r"truncated\.png: cannot read an image"):
        load_image(truncated)


# ---- audio -----------------------------------------------------------------------------------
def test_wav_round_trip(tmp_path: Path) -> None:
    wave = tone(440.0, 22050, 0.5)
    path = save_wav(wave, 22050, tmp_path / "a.wav")
    loaded, rate = load_audio(path)
    assert rate == 22050 and loaded.dtype == np.float32 and loaded.shape == wave.shape
    assert np.abs(loaded - wave).max() < 2 / 32768  # 16-bit PCM
    stereo = np.stack([wave, -0.5 * wave], axis=1)
    loaded, _ = load_audio(save_wav(stereo, 22050, tmp_path / "stereo.wav"))
    np.testing.assert_allclose(loaded, 0.25 * wave, atol=2 / 32768)  # channels averaged
    loud, _ = load_audio(save_wav(np.array([2.0, -3.0, 0.5]), 8000, tmp_path / "loud.wav"))
    np.testing.assert_allclose(loud, [32767 / 32768, -1.0, 0.5], atol=1e-4)  # clipped, not wrapped


def test_flac_and_pyav_fallback_formats(tmp_path: Path) -> None:
    wave = tone(440.0, 16000, 1.0)
    sf.write(tmp_path / "a.flac", wave, 16000)
    loaded, rate = load_audio(tmp_path / "a.flac")
    assert rate == 16000 and np.abs(loaded - wave).max() < 2 / 32768
    # AAC in M4A: libsndfile cannot read it, PyAV can
    path = tmp_path / "a.m4a"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(wave[None], format="fltp", layout="mono")
        frame.sample_rate = 16000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(sf.LibsndfileError):
        sf.read(path)
    loaded, rate = load_audio(path)
    assert rate == 16000 and abs(len(loaded) - 16000) <= 2048  # AAC adds priming samples
    assert peak_hz(loaded, rate) == pytest.approx(440.0, abs=2.0)
    assert np.sqrt(np.mean(loaded**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)


def test_audio_inputs_and_errors(tmp_path: Path) -> None:
    wave = tone(100.0, 8000, 0.1)
    for src in ((wave, 8000), {"waveform": wave, "sample_rate": 8000}, (wave[:, None], 8000)):
        loaded, rate = load_audio(src)
        assert rate == 8000 and np.array_equal(loaded, wave)
    pcm, _ = load_audio((np.array([16384, -32768], np.int16), 8000))
    assert pcm.tolist() == [0.5, -1.0]
    with pytest.raises(MediaError, match=r"shape \(2, 3, 4\)"):
        load_audio((np.zeros((2, 3, 4)), 8000))
    with pytest.raises(MediaError, match="sample rate 0"):
        load_audio((wave, 0))
    with pytest.raises(MediaError, match="expected waveform, sample_rate"):
        load_audio({"audio": wave})
    with pytest.raises(MediaError, match=r"nope\.wav: file not found"):
        load_audio(tmp_path / "nope.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF" + b"\x00garbage" * 20)
    with pytest.raises(MediaError, match=r"bad\.wav: cannot read audio") as err:
        load_audio(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(MediaError, match="NaN"):
        save_wav(np.array([0.0, np.nan]), 8000, tmp_path / "nan.wav")


# ---- video -----------------------------------------------------------------------------------
def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = colour_frames(10, 32, 48)
    path = save_mp4(frames, 8.0, tmp_path / "v" / "a.mp4")
    loaded, fps = load_video(path)
    assert fps == pytest.approx(8.0)
    assert loaded.shape == (10, 32, 48, 3) and loaded.dtype == np.uint8
    error = np.abs(loaded.astype(int) - frames.astype(int))
    assert error.mean() < 3 and error.max() < 16
    # each decoded frame is closest to the frame it came from (order and count preserved)
    means = loaded.reshape(10, -1, 3).mean(1)
    targets = frames.reshape(10, -1, 3).mean(1)
    nearest = np.abs(means[:, None] - targets[None]).sum(-1).argmin(1)
    assert nearest.tolist() == list(range(10))


def test_mp4_odd_size_is_padded_and_decoding_is_capped(tmp_path: Path) -> None:
    frames = colour_frames(9, 33, 47)
    frames[:, -1, :] = 255  # a white last row and column survive the edge padding
    frames[:, :, -1] = 255
    path = save_mp4(frames.astype(np.float32) / 255.0, 30000 / 1001, tmp_path / "odd.mp4")
    loaded, fps = load_video(path)
    assert loaded.shape == (9, 34, 48, 3)
    assert fps == pytest.approx(29.97, abs=0.01)
    assert np.abs(loaded[:, :33, :47].astype(int) - frames.astype(int)).mean() < 4
    assert loaded[:, 33, 10:40].mean() > 230 and loaded[:, 5:30, 47].mean() > 230
    capped, _ = load_video(path, max_seconds=0.1)
    assert len(capped) == 3  # ceil(0.1 s * 29.97 fps)


def test_video_inputs_and_errors(tmp_path: Path) -> None:
    frames = colour_frames(3, 8, 8)
    loaded, fps = load_video((frames, 4))
    assert fps == 4.0 and np.array_equal(loaded, frames)
    with pytest.raises(MediaError, match=r"shape \(3, 8, 8\); expected frames \(T, H, W, 3\)"):
        load_video((frames[..., 0], 4))
    with pytest.raises(MediaError, match="fps -1"):
        load_video((frames, -1))
    with pytest.raises(MediaError, match=r"out\.mp4: shape \(8, 8, 3\)"):
        save_mp4(frames[0], 4, tmp_path / "out.mp4")
    with pytest.raises(MediaError, match=r"gone\.mp4: file not found"):
        load_video(tmp_path / "gone.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    with pytest.raises(MediaError, match=r"bad\.mp4: cannot read video") as err:
        load_video(bad)
    assert "\n" not in str(err.value)
    wav = save_wav(tone(100.0, 8000, 0.1), 8000, tmp_path / "sound.wav")
    with pytest.raises(MediaError, match=r"sound\.wav: no video stream"):
        load_video(wav)
