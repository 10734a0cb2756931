"""Judges: trained on real world samples, they name a medium's attributes; saved and reloaded.

The full judges (`python -m nextgpt.mini.judges`) score >= 95% per attribute on held-out real
samples; here a small, fast training must already beat chance by a wide margin.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nextgpt.mini.judges import (
    Judge,
    Judges,
    JudgeTraining,
    accuracy,
    train_judge,
    write_media,
)
from nextgpt.mini.world import MODALITIES, World, WorldConfig

FAST = JudgeTraining(samples=1000, epochs=5, batch_size=32, lr=3e-3)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0))


@pytest.fixture(scope="module")
def judges(world) -> dict[str, Judge]:
    # one thread: nets this small gain nothing from two, and on a busy machine two threads'
    # spin-waiting makes this training 10x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {m: train_judge(world, m, FAST) for m in MODALITIES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("split", ["train", "heldout"])
def test_small_judges_beat_chance_on_fresh_real_samples(world, judges, modality, split):
    samples = world.samples(modality, 150, split, "judge-test")
    for attribute, acc in accuracy(judges[modality], samples).items():
        chance = 1 / len(world.attribute(modality, attribute).values)
        assert acc >= chance + 0.5 * (1 - chance), (attribute, acc)


def test_judges_save_load_and_judge_files(world, judges, tmp_path):
    Judges(judges).save(tmp_path)
    config = json.loads((tmp_path / "video_judge.json").read_text())
    assert config["attributes"]["direction"] == ["left", "right", "up", "down"]
    loaded = Judges.load(tmp_path)
    rng = world.rng("files")
    for m in MODALITIES:
        sample = world.sample(m, rng, "all")
        (written,) = write_media([sample], tmp_path)
        assert loaded.judge(m, sample.media) == judges[m](sample.media)
        assert set(loaded.judge(m, written)) == {a.name for a in world.attributes(m)}
    with pytest.raises(FileNotFoundError, match="no audio judge"):
        Judge.load(tmp_path / "missing", "audio")


def test_judges_accept_other_sizes_and_rates(world, judges):
    """Generated media need not match the world's format: features are resized / resampled."""
    rng = world.rng("formats")
    image = world.sample("image", rng).media
    assert judges["image"].features(image.resize((64, 64))).shape == (3, 32, 32)
    assert judges["image"].features(np.asarray(image) / 255.0).shape == (3, 32, 32)
    wave, rate = world.sample("audio", rng).media
    assert judges["audio"].features((wave[::2].copy(), rate // 2)).shape == (40, 98)
    frames, fps = world.sample("video", rng).media
    big = np.stack([np.asarray(Image.fromarray(f).resize((48, 48))) for f in frames])
    assert judges["video"].features((np.repeat(big, 2, axis=0), 2 * fps)).shape == (24, 32, 32)
