"""The miniature world and its dialogues: reproducible, split-true, in the documented format."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from nextgpt.config import TinyDecoderArch, tiny_config
from nextgpt.encoders.preprocess import preprocess_audio, preprocess_image, preprocess_video
from nextgpt.media import load_audio, load_image, load_video
from nextgpt.mini.dialogues import (
    KINDS,
    PLACEHOLDER,
    DatasetSizes,
    make_dialogue,
    media_slots,
    write_dataset,
)
from nextgpt.mini.world import (
    MODALITIES,
    TEMPLATES,
    World,
    WorldConfig,
    caption_words,
    combination_key,
)

SMALL = DatasetSizes(comprehension=2, generation=2, instructions=dict.fromkeys(KINDS, 4))


def media_bytes(sample) -> bytes:
    if sample.modality == "image":
        return sample.media.tobytes()
    return sample.media[0].tobytes() + repr(sample.media[1]).encode()


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=7))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, world) -> Path:
    root = tmp_path_factory.mktemp("mini") / "train"
    write_dataset(world, root, "train", SMALL)
    return root


# ---- the world -------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", MODALITIES)
def test_same_seed_same_media_and_captions(modality):
    a = World(WorldConfig(seed=3)).samples(modality, 6, "all", "t")
    b = World(WorldConfig(seed=3)).samples(modality, 6, "all", "t")
    assert [media_bytes(s) for s in a] == [media_bytes(s) for s in b]
    assert [(s.caption, s.attributes) for s in a] == [(s.caption, s.attributes) for s in b]


@pytest.mark.parametrize("modality", MODALITIES)
def test_different_seeds_or_streams_differ(modality):
    a = World(WorldConfig(seed=3)).samples(modality, 6, "all", "t")
    b = World(WorldConfig(seed=4)).samples(modality, 6, "all", "t")
    c = World(WorldConfig(seed=3)).samples(modality, 6, "all", "u")
    assert all(media_bytes(x) != media_bytes(y) for x, y in zip(a, b))
    assert all(media_bytes(x) != media_bytes(y) for x, y in zip(a, c))


def test_media_have_the_decoders_sizes_and_the_encoder_reads_them(world):
    rng = world.rng("sizes")
    enc = tiny_config().encoder
    image = world.sample("image", rng).media
    assert image.size == (32, 32) and image.mode == "RGB"
    assert preprocess_image(image, enc).shape == (3, 32, 32)
    wave, rate = world.sample("audio", rng).media
    assert (wave.shape, wave.dtype, rate) == ((16000,), np.float32, 16000)
    assert np.abs(wave).max() <= 1.0
    assert preprocess_audio(wave, rate, enc).shape == (2, 1, 32, 64)
    frames, fps = world.sample("video", rng).media
    assert (frames.shape, frames.dtype, fps) == ((8, 32, 32, 3), np.uint8, 8.0)
    assert preprocess_video(frames, fps, enc).shape == (2, 3, 2, 32, 32)


def test_splits_partition_the_combinations(world):
    for modality in MODALITIES:
        train = world.combinations(modality, "train")
        heldout = world.combinations(modality, "heldout")
        assert train and heldout
        assert len(train) + len(heldout) == len(world.combinations(modality, "all"))
        assert not any(world.is_held_out(c) for c in train)
        assert all(world.is_held_out(c) for c in heldout)
        # every single value still occurs in training: only combinations are new
        for a in world.attributes(modality):
            assert {c[a.name] for c in train} == set(a.values)
        # ... and every pair of values in a held-out combination too: the combination is new,
        # its parts are not ("a large yellow circle" after small yellow circles, large yellow
        # squares and large circles of other colours)
        for held in heldout:
            for a, b in itertools.combinations(held, 2):
                assert any(c[a] == held[a] and c[b] == held[b] for c in train), (held, a, b)


def test_sampling_respects_the_split(world):
    rng = world.rng("split")
    for modality in MODALITIES:
        train = [world.sample(modality, rng, "train").attributes for _ in range(60)]
        heldout = [world.sample(modality, rng, "heldout").attributes for _ in range(60)]
        assert not any(world.is_held_out(a) for a in train)
        assert all(world.is_held_out(a) for a in heldout)


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_caption_names_every_attribute(world, modality):
    for combo in world.combinations(modality):
        for template in TEMPLATES[modality]:
            words = {a.name: a.phrase(combo[a.name]) for a in world.attributes(modality)}
            caption = template.format(**words)
            assert world.parse_caption(modality, caption) == combo, caption
            assert world.parse_caption(modality, caption.upper() + " !") == combo


def _recipe_arch(modality: str) -> TinyDecoderArch:
    """The decoder architecture the full build trains for `modality`."""
    from nextgpt.mini.build import scales

    return getattr(scales()["full"], f"{modality}_decoder").arch


@pytest.mark.parametrize("modality", MODALITIES)
def test_every_caption_fits_the_build_decoders_text_encoders(world, modality):
    """Every wording of every combination, tokenized by the decoder the build trains, keeps its
    end token: a longer caption would be truncated and lose its last words."""
    from nextgpt.decoders.tiny import tiny_tokenizer

    arch = _recipe_arch(modality)
    tokenizer = tiny_tokenizer(modality, arch)
    for combo in world.combinations(modality):
        for template in TEMPLATES[modality]:
            words = {a.name: a.phrase(combo[a.name]) for a in world.attributes(modality)}
            caption = template.format(**words)
            ids = tokenizer(caption, truncation=False).input_ids
            assert len(ids) <= arch.text_max_length, (caption, len(ids))


@pytest.mark.parametrize("modality", MODALITIES)
def test_caption_words_are_exactly_the_words_of_train_captions(world, modality):
    """A word-level decoder tokenizer built on them learns no word that train captions lack."""
    import re

    def words_of(split: str) -> set[str]:
        found: set[str] = set()
        for combo in world.combinations(modality, split):
            for template in TEMPLATES[modality]:
                phrases = {a.name: a.phrase(combo[a.name]) for a in world.attributes(modality)}
                found |= set(re.findall(r"[a-z]+", template.format(**phrases)))
        return found

    assert set(caption_words(modality)) == words_of("train")
    assert words_of("heldout") <= words_of("train")


def test_parse_caption_refuses_ambiguity(world):
    parsed = world.parse_caption("image", "a small red or blue circle")
    assert parsed == {"shape": "circle", "colour": None, "size": "small"}


def test_bad_requests_name_the_problem(world):
    with pytest.raises(ValueError, match="split"):
        world.combinations("image", "test")
    with pytest.raises(ValueError, match="purple"):
        world.render("image", {"shape": "circle", "colour": "purple", "size": "small"}, world.rng())
    with pytest.raises(ValueError, match="unknown attribute values"):
        World(WorldConfig(held_out=((("shape", "hexagon"),),)))


# ---- dialogues -------------------------------------------------------------------------------
def test_dialogues_are_reproducible_and_cover_every_kind(world):
    for kind in KINDS:
        for i in range(6):
            a, b = make_dialogue(world, kind, "train", i), make_dialogue(world, kind, "train", i)
            assert a.kind == kind and a.turns == b.turns
            assert [media_bytes(s) for s in a.media] == [media_bytes(s) for s in b.media]
            assert len(PLACEHOLDER.findall(" ".join(v for _, v in a.turns))) == len(a.media)


def test_routing_gold_per_kind(world):
    """Which assistant turns must emit signal tokens: the gold for routing accuracy."""
    for i in range(12):
        for kind in KINDS:
            d = make_dialogue(world, kind, "train", i)
            answers = [v for s, v in d.turns if s == "gpt"]
            outputs = [PLACEHOLDER.findall(v) for v in answers]
            inputs = [PLACEHOLDER.findall(v) for s, v in d.turns if s == "human"]
            if kind in ("caption", "question"):
                assert outputs == [[]] and len(inputs[0]) == 1
            elif kind == "text":
                assert not any(outputs) and not any(inputs)
            else:
                assert any(outputs)
            if kind == "generate":
                assert not any(inputs) and len(outputs[0]) == 1
            if kind == "mixed":  # text and media in one answer
                assert PLACEHOLDER.sub("", answers[0]).strip() and outputs[0]


def test_training_dialogues_hold_no_held_out_medium(world):
    for kind in KINDS:
        for i in range(15):
            for sample in make_dialogue(world, kind, "train", i).media:
                assert not world.is_held_out(sample.attributes), (kind, i, sample.attributes)


def test_held_out_dialogues_end_in_a_held_out_medium(world):
    """No two held-out combinations are one change apart, so an edit (or a transfer within a
    modality) reaches its held-out medium from a train one; the last medium is held out."""
    for kind in KINDS:
        for i in range(15):
            d = make_dialogue(world, kind, "heldout", i)
            if d.media:
                assert world.is_held_out(d.media[-1].attributes), (kind, i)
            if kind in ("caption", "generate"):
                assert all(world.is_held_out(s.attributes) for s in d.media)


def test_no_held_out_combination_is_even_mentioned_in_training(world):
    held_out_captions = [
        template.format(**{a.name: a.phrase(c[a.name]) for a in world.attributes(m)})
        for m in MODALITIES
        for c in world.combinations(m, "heldout")
        for template in TEMPLATES[m]
    ]
    for kind in KINDS:
        for i in range(30):
            text = " ".join(v for _, v in make_dialogue(world, kind, "train", i).turns)
            assert not any(c in text for c in held_out_captions), text


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_edits_change_exactly_one_attribute(world, split):
    for i in range(10):
        d = make_dialogue(world, "edit", split, i)
        for before, after in zip(d.media, d.media[1:]):
            changed = [k for k in before.attributes if before.attributes[k] != after.attributes[k]]
            assert len(changed) == 1


# ---- the written dataset ---------------------------------------------------------------------
def test_dataset_files_parse_in_the_documented_format(dataset):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["split"] == "train" and manifest["format_version"] == 1
    for m in MODALITIES:
        (comp,) = json.loads((dataset / f"{m}_comprehension.json").read_text())[:1]
        human, gpt = comp["conversations"]
        assert human["from"] == "human" and human["value"].startswith(f"<{m}>\n")
        assert gpt["from"] == "gpt" and not PLACEHOLDER.search(gpt["value"])
        assert (dataset / comp[f"input_{m}"]).is_file() and set(comp["attributes"])
        (gen,) = json.loads((dataset / f"{m}_generation.json").read_text())[:1]
        assert (dataset / gen[f"output_{m}"]).is_file()
        assert isinstance(gen[f"{m}_captions"], str)
        assert gen["conversations"][-1]["value"].endswith(f"<{m}>")
        assert not PLACEHOLDER.search(gen["conversations"][0]["value"])
    records = json.loads((dataset / "mosit.json").read_text())
    assert {r["kind"] for r in records} == set(KINDS)
    assert manifest["files"]["mosit.json"] == len(records) == 4 * len(KINDS)
    for r in records:
        speakers = [t["from"] for t in r["conversation"]]
        assert speakers == ["human", "gpt"] * (len(speakers) // 2)
        slots = media_slots(r)
        for m in MODALITIES:
            listed = sum(1 for _, mod, _ in slots if mod == m)
            outputs = sum(1 for who, mod, _ in slots if mod == m and who == "gpt")
            assert len(r.get(f"{m}_list", [])) == len(r.get(f"{m}_attributes", [])) == listed
            assert len(r.get(f"{m}_captions", [])) == outputs
            for path in r.get(f"{m}_list", []):
                assert (dataset / path).is_file()


def test_written_media_load_back(dataset):
    records = json.loads((dataset / "mosit.json").read_text())
    paths = {m: [p for r in records for p in r.get(f"{m}_list", [])][0] for m in MODALITIES}
    assert load_image(dataset / paths["image"]).size == (32, 32)
    wave, rate = load_audio(dataset / paths["audio"])
    assert rate == 16000 and wave.shape == (16000,)
    frames, fps = load_video(dataset / paths["video"])
    assert frames.shape == (8, 32, 32, 3) and fps == 8.0


def test_dataset_files_are_reproducible(dataset, world, tmp_path):
    """Byte for byte, except MP4: this libx264 build's SIMD code makes the same frames encode to
    slightly different bitstreams from run to run (asm=0 or lossless is exact), so videos are
    compared decoded, to within encoding noise."""
    again = tmp_path / "again"
    write_dataset(world, again, "train", SMALL)
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    other = [f for f in files if f.suffix != ".mp4"]
    assert [f for f in other if (dataset / f).read_bytes() != (again / f).read_bytes()] == []
    for f in files:
        if f.suffix == ".mp4":
            a, b = load_video(dataset / f)[0], load_video(again / f)[0]
            assert np.abs(a.astype(int) - b).mean() < 3


def test_combination_key_ignores_attribute_order_and_tells_combinations_apart():
    a = {"shape": "circle", "colour": "red", "size": "small"}
    reordered = {"size": "small", "colour": "red", "shape": "circle"}
    assert combination_key(a) == combination_key(reordered)
    assert combination_key(a) != combination_key({**a, "colour": "blue"})
    keys = {combination_key(c) for c in World(WorldConfig(seed=0)).combinations("image", "all")}
    assert len(keys) == 24  # 3 shapes x 4 colours x 2 sizes, no two alike


def test_an_empty_split_is_named_when_a_dialogue_draws_from_it():
    world = World(WorldConfig(held_out=()))
    with pytest.raises(ValueError, match="no image combination is in split 'heldout'"):
        world.sample("image", world.rng("empty"), "heldout")
    with pytest.raises(ValueError, match="no audio combination is in split 'heldout'"):
        make_dialogue(world, "edit", "heldout", 1)
