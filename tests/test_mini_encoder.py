"""The miniature's encoder: pretrained on world media, it reads attributes; it saves and reloads.

The full pretraining reaches >= 0.95 per image attribute on held-out combinations; here a short
training must already put colour, pitch and timbre into the mean patch token well above chance.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from nextgpt.encoders.imagebind import ImageBindEncoder
from nextgpt.mini.pretrain_encoder import (
    TEXT_EOS,
    EncoderTraining,
    caption_ids,
    media_inputs,
    mini_encoder_config,
    pretrain_encoder,
    supervised_contrastive,
)
from nextgpt.mini.world import MODALITIES, TEMPLATES, World


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def trained(world) -> tuple[ImageBindEncoder, dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain_encoder(world, EncoderTraining.smoke())
    finally:
        torch.set_num_threads(threads)


def test_config_reads_world_media_and_whole_captions(world):
    config = mini_encoder_config()
    encoder = ImageBindEncoder(config)
    for m in MODALITIES:
        samples = world.samples(m, 2, "train", "shapes")
        out = encoder.encode(m, media_inputs(samples, config))
        assert out.tokens.shape == (2, encoder.num_tokens(m), config.embed_dim)
    captions = [
        template.format(**{a.name: a.phrase(c[a.name]) for a in world.attributes(m)})
        for m in MODALITIES
        for template in TEMPLATES[m]
        for c in world.combinations(m)
    ]
    longest = max(captions, key=len)
    ids = caption_ids([longest, "a"], config)
    # the end-of-text id is the largest, so ImageBind's argmax finds it after the whole caption
    assert ids[0].argmax().item() == len(longest.encode())
    assert ids[1].argmax().item() == 1 and ids.max().item() == TEXT_EOS < config.text_vocab


def test_supervised_contrastive_rewards_aligned_pairs():
    keys = ["a", "a", "b", "c"]
    base = torch.eye(4)[[0, 0, 1, 2]]
    aligned = supervised_contrastive(base, base, keys, torch.tensor(10.0))
    shuffled = supervised_contrastive(base, base[[2, 3, 0, 1]], keys, torch.tensor(10.0))
    # two captions of one combination share the probability: the optimum is log(2) / 2 here
    assert aligned < 0.4 and shuffled > 5


def test_short_pretraining_puts_attributes_in_patch_tokens(trained):
    _, metrics = trained
    probes = metrics["probes"]
    # chance is 1/4 (colour) and 1/3 (pitch, timbre); these bind within seconds
    for modality, attribute, chance in (
        ("image", "colour", 1 / 4),
        ("video", "colour", 1 / 4),
        ("audio", "pitch", 1 / 3),
        ("audio", "timbre", 1 / 3),
    ):
        for split in ("train", "heldout"):
            acc = probes[modality][split][attribute]
            assert acc >= chance + 0.5 * (1 - chance), (modality, split, attribute, acc)
    first, last = metrics["loss_first"], metrics["loss_last"]
    assert last["image_nce"] < first["image_nce"] - 0.5


def test_saved_encoder_loads_through_the_real_loader(world, trained, tmp_path):
    encoder, _ = trained
    path = tmp_path / "encoder.safetensors"
    encoder.save(path)
    loaded = ImageBindEncoder.from_config(replace(mini_encoder_config(), pretrained=str(path)))
    config = mini_encoder_config()
    for m in MODALITIES:
        x = media_inputs(world.samples(m, 3, "heldout", "reload"), config)
        with torch.no_grad():
            a, b = encoder.encode(m, x), loaded.encode(m, x)
        torch.testing.assert_close(a.tokens, b.tokens)
        torch.testing.assert_close(a.pooled, b.pooled)
    ids = caption_ids(["a red circle"], config)
    with torch.no_grad():
        torch.testing.assert_close(
            encoder.encode("text", ids).pooled, loaded.encode("text", ids).pooled
        )
