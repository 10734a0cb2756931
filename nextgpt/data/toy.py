"""A toy data set for the three stages, written on the spot: what the tiny configs train on.

Solid-colour images and videos and pure tones, with captions that name them, in the real formats:
`stage1.json` (comprehension: media in, caption out), `stage2.json` (generation: caption in,
signal tokens and target media out), `stage3.json` (MosIT dialogues, T2M and text-only records).
Small enough to write in a second, regular enough that each stage's loss falls within a few dozen
steps on the tiny preset.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from nextgpt import media as media_io

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
TONES = {"low": 220.0, "high": 1760.0}
SIZE = 32
RATE = 16000


def write_toy_dataset(root: str | Path, copies: int = 4, seed: int = 0) -> dict[str, Path]:
    """Write media and the three stage files under `root`; returns {"stage1": path, ...}."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    images, audios, videos = [], [], []
    for name, rgb in COLOURS.items():
        for i in range(copies):
            noise = rng.integers(-20, 21, (SIZE, SIZE, 3))
            pixels = np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)
            path = f"images/{name}_{i}.png"
            media_io.save_png(pixels, root / path)
            images.append((path, f"a {name} square"))
        frames = np.broadcast_to(np.array(rgb, dtype=np.uint8), (8, SIZE, SIZE, 3))
        path = f"videos/{name}.mp4"
        media_io.save_mp4(np.ascontiguousarray(frames), 8.0, root / path)
        videos.append((path, f"a {name} flash"))
    t = np.arange(RATE) / RATE
    for name, freq in TONES.items():
        for i in range(copies):
            wave = 0.4 * np.sin(2 * np.pi * freq * t + rng.uniform(0, np.pi))
            path = f"audio/{name}_{i}.wav"
            media_io.save_wav(wave.astype(np.float32), RATE, root / path)
            audios.append((path, f"a {name} tone"))

    def turn(who: str, value: str, **extra) -> dict:
        return {"from": who, "value": value, **extra}

    stage1 = [
        {"image_name": p, "conversations": [turn("human", "<image>\nDescribe it."), turn("gpt", c)]}
        for p, c in images
    ]
    stage1 += [
        {"input_audio": p, "conversations": [turn("human", "<audio>\nWhat is it?"), turn("gpt", c)]}
        for p, c in audios
    ]
    stage1 += [
        {
            "input_video": p,
            "conversations": [turn("human", "What is this? <video>"), turn("gpt", c)],
        }
        for p, c in videos
    ]
    stage2 = [
        {
            "output_image": p,
            "image_captions": [c],
            "conversations": [turn("human", f"Draw {c}."), turn("gpt", "Sure! <image>")],
        }
        for p, c in images
    ]
    stage2 += [
        {
            "output_audio": p,
            "audio_captions": [c],
            "conversations": [turn("human", f"Play {c}."), turn("gpt", "Here it is. <audio>")],
        }
        for p, c in audios
    ]
    stage2 += [
        {
            "output_video": p,
            "caption": c,
            "conversations": [turn("human", f"Film {c}."), turn("gpt", "Okay. <video>")],
        }
        for p, c in videos
    ]
    stage3 = []
    for (image, caption), (audio, sound) in zip(images, audios * len(images)):
        stage3.append(
            {
                "image_list": [image],
                "conversation": [
                    turn("human", "<image> What colour is this?"),
                    turn("gpt", f"It is {caption}."),
                    turn("human", "Now play a sound for it."),
                    turn("gpt", "Here you are.", audio_list=[audio], caption=sound),
                ],
            }
        )
    stage3 += [
        {
            "output_image": p,
            "image_captions": [c],
            "conversations": [turn("human", f"Please show {c}."), turn("gpt", "Here: <image>")],
        }
        for p, c in images[::2]
    ]
    stage3 += [
        {"conversations": [turn("human", f"Say {word}."), turn("gpt", f"{word}!")]}
        for word in ("hello", "goodbye", "thanks", "yes")
    ]
    out = {}
    for name, records in (("stage1", stage1), ("stage2", stage2), ("stage3", stage3)):
        out[name] = root / f"{name}.json"
        out[name].write_text(json.dumps(records, indent=1))
    return out
