"""`nextgpt eval`: the items, the scoring rules and the whole run on the tiny model.

A random tiny model scores near chance, so these tests do not ask it to score well. What they do
check against real behaviour: the judge-scoring path gives real world media about 1.0 and noise
about chance; the decoder ceiling, run end to end through `evaluate` with a decoder that renders
real media from the gold caption, reaches the same, while the model's own path (a random LLM
driving the same decoder) does not; and the routing and caption rules on hand-made answers.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image

from nextgpt.cli import UsageError
from nextgpt.mini import evaluate as ev
from nextgpt.mini.dialogues import KINDS, PLACEHOLDER
from nextgpt.mini.judges import Judge, JudgeConfig, Judges, JudgeTraining, train_judge
from nextgpt.mini.world import MODALITIES, Sample, World, WorldConfig
from nextgpt.model import GeneratedMedia, Reply

FAST = JudgeTraining(samples=500, epochs=5, batch_size=32, lr=3e-3)


@pytest.fixture(scope="module")
def world() -> World:
    return World(WorldConfig(seed=0))


@pytest.fixture(scope="module")
def image_judges(world) -> Judges:
    """A small trained image judge (1.00 on real images at this size, see test_mini_judges)."""
    torch.set_num_threads(1)
    return Judges({"image": train_judge(world, "image", FAST)})


# ---- items ---------------------------------------------------------------------------------------
def test_items_are_deterministic_balanced_and_in_their_split(world):
    items = ev.generation_items(world, "heldout", "image", 6)
    assert [i.prompt for i in items] == [
        i.prompt for i in ev.generation_items(world, "heldout", "image", 6)
    ]
    held_out = world.combinations("image", "heldout")
    assert sorted(map(str, (i.attributes for i in items))) == sorted(map(str, held_out))
    for item in ev.caption_items(world, "train", "video", 5):
        assert not world.is_held_out(item.attributes)
        frames, fps = item.media
        assert frames.shape == (8, 32, 32, 3) and fps == world.config.video_fps
    assert ev.generation_items(world, "train", "image", 3, seed=1) != ev.generation_items(
        world, "train", "image", 3, seed=0
    )


def test_routing_items_carry_inputs_and_the_gold_route(world):
    items = ev.routing_items(world, "train", 3)
    assert [i.kind for i in items] == [k for k in KINDS for _ in range(3)]
    for item in items:
        assert [s.modality for s in item.inputs] == PLACEHOLDER.findall(item.text)
        if item.kind in ("caption", "question", "text"):
            assert item.gold == frozenset()
        else:
            assert item.gold and item.gold <= set(MODALITIES)
        if item.kind in ("caption", "question", "transfer"):
            assert len(item.inputs) == 1
    message = ev.user_message(items[0].text, [s.media for s in items[0].inputs])
    assert message["role"] == "user"
    kinds = [part["type"] for part in message["content"]]
    assert kinds == [items[0].inputs[0].modality, "text"]
    assert message["content"][1]["text"] == message["content"][1]["text"].strip()


def test_dialogue_items_replay_the_gold_turns_before_the_last_request(world):
    items = ev.dialogue_items(world, "heldout", 3)
    assert [i.kind for i in items] == [k for k in ev.DIALOGUE_KINDS for _ in range(3)]
    again = ev.dialogue_items(world, "heldout", 3)
    assert [[ev._message_text(m) for m in i.messages] for i in items] == [
        [ev._message_text(m) for m in i.messages] for i in again
    ]
    assert [[o.attributes for o in i.outputs] for i in items] == [
        [o.attributes for o in i.outputs] for i in again
    ]
    for item in items:
        roles = [m["role"] for m in item.messages]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(o.modality in MODALITIES for o in item.outputs) and item.outputs
        assert all(world.is_held_out(o.attributes) for o in item.outputs)
        if item.kind == "transfer":  # one medium in, one out
            assert roles == ["user"] and len(item.outputs) == 1
            assert item.messages[0]["content"][0]["type"] in MODALITIES
        if item.kind == "edit":  # earlier answers come back with their media, then "now ..."
            assert roles[1::2] == ["assistant"] * (len(roles) // 2) and len(roles) in (3, 5)
            for answer in item.messages[1::2]:
                types = [p["type"] for p in answer["content"] if p["type"] != "text"]
                assert types == [item.outputs[0].modality]
            assert item.messages[-1]["content"][0]["text"].startswith("Now ")
    mixed = [i for i in items if i.kind == "mixed"]
    assert any(
        len(i.outputs) == 2 for i in ev.dialogue_items(world, "train", 12) if i.kind == "mixed"
    )
    assert all(len(i.messages) == 1 for i in mixed)


def test_matched_outputs_pair_each_gold_output_with_its_modality_in_order(world):
    def sample(modality: str) -> Sample:
        return Sample(modality, {}, "", None)

    media = [
        GeneratedMedia(m, name, torch.zeros(1))
        for m, name in [("video", "v1"), ("image", "i1"), ("video", "v2")]
    ]
    reply = Reply(text="", media=media)
    gold = [sample("image"), sample("video"), sample("video"), sample("audio"), sample("image")]
    assert ev.matched_outputs(gold, reply) == ["i1", "v1", "v2", None, None]


# ---- scoring rules -------------------------------------------------------------------------------
def test_caption_scores_read_attributes_from_free_text(world):
    gold = {"shape": "circle", "colour": "blue", "size": "large"}
    assert ev.caption_scores(world, "image", "A large circle in blue.", gold) == {
        "shape": True,
        "colour": True,
        "size": True,
        "all": True,
    }
    wrong = ev.caption_scores(world, "image", "A small red or blue circle.", gold)
    assert wrong == {"shape": True, "colour": False, "size": False, "all": False}
    gold_audio = {"pitch": "low", "timbre": "hollow", "rhythm": "double"}
    text = "a hollow tone at low pitch, beeping twice"
    assert ev.caption_scores(world, "audio", text, gold_audio)["all"]


def test_routing_scores_exact_sets_of_emitted_groups():
    image = GeneratedMedia("image", None, torch.zeros(1))
    audio = GeneratedMedia("audio", None, torch.zeros(1))
    assert ev.produced_modalities(Reply("x", [image])) == {"image"}
    assert ev.routing_correct(frozenset({"image"}), ev.produced_modalities(Reply("x", [image])))
    assert not ev.routing_correct(frozenset({"image"}), ev.produced_modalities(Reply("x")))
    assert not ev.routing_correct(frozenset(), {"image"})
    assert not ev.routing_correct({"image"}, ev.produced_modalities(Reply("x", [image, audio])))
    assert ev.routing_correct(frozenset(), ev.produced_modalities(Reply("just words")))


def test_chance_levels(world):
    assert ev.attribute_chance(world, "image") == pytest.approx(
        {"shape": 1 / 3, "colour": 1 / 4, "size": 1 / 2, "all": 1 / 24}
    )
    assert ev.attribute_chance(world, "video")["all"] == pytest.approx(1 / 48)
    assert ev.ROUTING_CHANCE == 1 / 8
    items = ev.routing_items(world, "train", 2)
    assert ev.majority_baseline(items) == pytest.approx(3 / 7)  # text only: caption, question, text


def test_judged_scores_give_real_media_full_marks_and_noise_chance(world, image_judges):
    combos = world.combinations("image", "all") * 2
    rng = world.rng("eval-test")
    real = [
        ev.judged_scores(image_judges, "image", world.render("image", c, rng), c) for c in combos
    ]
    noise = [
        ev.judged_scores(
            image_judges, "image", Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)), c
        )
        for c in combos
    ]
    for name, chance in ev.attribute_chance(world, "image").items():
        assert np.mean([r[name] for r in real]) >= 0.95, name
        assert np.mean([r[name] for r in noise]) <= chance + 0.25, name


def test_video_frames_from_a_decoder_get_a_frame_rate():
    frames = np.zeros((8, 32, 32, 3), np.uint8)
    wrapped = ev.judge_input("video", frames, 8.0)
    assert isinstance(wrapped, tuple) and wrapped[0] is frames and wrapped[1] == 8.0
    wave = (np.zeros(16000, np.float32), 16000)
    assert ev.judge_input("audio", wave, 8.0) is wave


# ---- whole runs ----------------------------------------------------------------------------------
class RenderingDecoder:
    """A stand-in decoder that draws real world media: `encode_text` one-hot encodes a caption's
    combination, and `generate` renders the combination its conditioning points at. With the
    gold caption it is a perfect decoder; behind a random LLM it draws whatever the projector
    points at."""

    def __init__(self, world: World, modality: str, shape: tuple[int, int] | None = None) -> None:
        self.world, self.modality = world, modality
        self.combos = world.combinations(modality, "all")
        self.captions = [world.caption(modality, c) for c in self.combos]
        self.shape = shape or (1, len(self.combos))  # the conditioning shape it is driven with

    def encode_text(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), self.shape[0] * self.shape[1])
        for i, caption in enumerate(captions):
            out[i, self.captions.index(caption)] = 1.0
        return out.reshape(len(captions), *self.shape)

    def generate(self, cond: torch.Tensor, seed: int | None = None, **options) -> list:
        picks = cond.reshape(len(cond), -1)[:, : len(self.combos)].argmax(-1).tolist()
        rng = self.world.rng("rendering-decoder", seed or 0)
        media = [self.world.render(self.modality, self.combos[i], rng) for i in picks]
        return [m[0] if self.modality == "video" else m for m in media]  # video: bare frames


def test_ceiling_path_judges_real_media_and_the_model_path_does_not(
    world, image_judges, tiny_model, monkeypatch
):
    recorded = tiny_model.config.decoders["image"]  # the shape the projector was built for
    decoder = RenderingDecoder(world, "image", (recorded.cond_len, recorded.cond_dim))
    monkeypatch.setattr(tiny_model, "decoders", {"image": decoder})
    settings = ev.EvalSettings(
        captions=0, routing=0, generations=12, dialogues=0, generation_tokens=8
    )
    results = ev.evaluate(tiny_model, image_judges, world, settings)
    rows = results["generation"]["image"]
    assert set(results["generation"]) == {"image"}
    assert results["skipped"]["generation"] == {"audio": "no decoder", "video": "no decoder"}
    for name in ("shape", "colour", "size", "all"):
        for split in ev.SPLITS:
            assert rows[name][split]["ceiling"] >= 0.95, (name, split)
    # the random model's conditioning points at one arbitrary combination, whatever was asked
    assert rows["all"]["train"]["model"] <= 0.5
    assert rows["all"]["train"]["ratio"] == pytest.approx(rows["all"]["train"]["model"])
    # read back from the conditioning, the same pick: this decoder draws exactly the combination
    # nearest to it, and the judge names real renders right, so the two verdicts agree per item
    generations = [r for r in results["items"] if r["section"] == "generation"]
    agree = [r["conditioning"] == r["correct"] for r in generations]
    assert len(agree) == 24 and np.mean(agree) >= 0.9
    read_back = results["conditioning"]["image"]
    assert read_back["all"]["train"] <= 0.5
    assert read_back["size"]["chance"] == 0.5


def test_nearest_caption_reads_the_combination_back_from_a_conditioning(world):
    decoder = RenderingDecoder(world, "image")
    combos, bank = ev.caption_bank(world, "image", decoder)
    assert len(combos) == 24 and bank.shape == (24, 1, 24)
    gold = {"shape": "circle", "colour": "yellow", "size": "large"}  # a held-out combination
    cond = bank[combos.index(gold)] + 0.2 * torch.randn(
        1, 24, generator=torch.Generator().manual_seed(0)
    )
    with pytest.raises(ValueError, match="cannot be compared"):
        ev.nearest_caption_scores(combos, bank, torch.zeros(2, 24), gold)
    assert ev.nearest_caption_scores(combos, bank, cond, gold) == {
        "shape": True,
        "colour": True,
        "size": True,
        "all": True,
    }
    other = {**gold, "colour": "red"}
    scores = ev.nearest_caption_scores(combos, bank, bank[combos.index(other)], gold)
    assert scores == {"shape": True, "colour": False, "size": True, "all": False}


def test_dialogue_outputs_are_judged_only_where_a_decoder_and_judge_exist(
    world, image_judges, tiny_model, monkeypatch
):
    """Edits after a first answer, transfers and two-media answers: the perfect decoder's
    ceiling on every image output, nothing recorded for modalities without a decoder."""
    monkeypatch.setattr(tiny_model, "decoders", {"image": RenderingDecoder(world, "image")})
    settings = ev.EvalSettings(captions=0, routing=0, generations=0, dialogues=6, routing_tokens=24)
    results = ev.evaluate(tiny_model, image_judges, world, settings)
    assert {m for kind in results["dialogue"].values() for m in kind} == {"image"}
    for kind, modalities in results["dialogue"].items():
        for split in ev.SPLITS:
            assert modalities["image"]["all"][split]["ceiling"] >= 0.95, (kind, split)
    records = [r for r in results["items"] if r["section"] == "dialogue"]
    assert len(records) == 2 * 6 * len(ev.DIALOGUE_KINDS)
    edits = [r for r in records if r["kind"] == "edit"]
    for edit in edits:  # the gold turns before the last request, replayed in order
        roles = [line.split(":")[0] for line in edit["prompt"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"], roles
    assert {len(e["prompt"]) for e in edits} >= {3}


def test_routing_without_decoding_sees_every_emitted_group(tiny_model):
    decoders = tiny_model.decoders
    with ev.decoders_skipped(tiny_model):
        reply = tiny_model.generate("Make a picture and a video.", modalities=["image", "video"])
    assert tiny_model.decoders is decoders
    assert ev.produced_modalities(reply) == {"image", "video"}
    assert all(item.data is None for item in reply.media)


def test_conditioning_can_be_recorded_without_decoding(tiny_model):
    decoders = tiny_model.decoders
    with ev.conditioning_recorded(tiny_model, decode=False) as recorders:
        reply = tiny_model.generate("Make a picture.", modalities=["image"])
    assert tiny_model.decoders is decoders
    assert [item.data for item in reply.media] == [None]
    cond = recorders["image"].last
    assert cond is not None and cond.dtype == torch.float32 and cond.abs().sum() > 0
    assert recorders["video"].last is None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextgpt")
    ev.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_eval_command_needs_judges_for_a_preset(tmp_path):
    args = _parser().parse_args(["eval", "--model", "tiny"])
    with pytest.raises(UsageError, match="--judges"):
        args.handler(args)
    args = _parser().parse_args(["eval", "--judges", str(tmp_path)])
    with pytest.raises(UsageError, match="judge"):
        args.handler(args)


def test_judges_default_to_the_model_folder(tmp_path):
    (tmp_path / "judges").mkdir()
    assert ev.judges_dir(str(tmp_path), None) == tmp_path / "judges"
    assert ev.judges_dir("tiny", str(tmp_path)) == tmp_path


def test_eval_command_quick_run_on_tiny(world, tiny_model, tmp_path, monkeypatch, capsys):
    """The whole command with the real tiny decoders and untrained judges: structure only."""
    model_dir = tmp_path / "model"
    Judges({m: Judge(JudgeConfig.for_world(world, m)) for m in MODALITIES}).save(
        model_dir / "judges"
    )
    monkeypatch.setattr("nextgpt.cli.load_model", lambda name: tiny_model)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir), "--quick", "--steps", "1", "--json", str(out)]
    args = _parser().parse_args(argv)
    assert args.handler(args) == 0
    table = capsys.readouterr().out
    for heading in ("### Captions", "### Routing", "### Generation", "### Conditioning"):
        assert heading in table
    results = json.loads(out.read_text())
    assert results["judges"] == str(model_dir / "judges")
    assert results["settings"]["steps"] == 1
    for m in MODALITIES:
        assert set(results["caption"][m]) == {a.name for a in world.attributes(m)} | {"all"}
        row = results["generation"][m]["all"]
        assert set(row) == {"train", "heldout", "chance"}
        assert set(row["train"]) == {"model", "ceiling", "ratio"}
        assert set(results["conditioning"][m]["all"]) == {"train", "heldout", "chance"}
        for split in ev.SPLITS:
            assert 0.0 <= row[split]["model"] <= 1.0 and 0.0 <= row[split]["ceiling"] <= 1.0
            assert results["counts"]["generation"][m][split] == 1
            assert results["counts"]["caption"][m][split] == 2
    assert set(results["routing"]["kinds"]) == {*KINDS, "all"}
    assert results["routing"]["kinds"]["all"]["chance"] == 0.125
    assert results["counts"]["routing"]["all"] == {"train": len(KINDS), "heldout": len(KINDS)}
    sections = {item["section"] for item in results["items"]}
    assert sections == {"caption", "routing", "generation", "dialogue"}
    assert "### Generation in dialogue" in table
    assert set(results["dialogue"]) <= set(ev.DIALOGUE_KINDS)
    # one dialogue per kind and split, every gold output of its answer judged
    judged = {
        sp: sum(c[sp] for kind in results["counts"]["dialogue"].values() for c in kind.values())
        for sp in ev.SPLITS
    }
    assert judged == {
        sp: sum(len(i.outputs) for i in ev.dialogue_items(world, sp, 1)) for sp in ev.SPLITS
    }
    assert f"{1 / 24:.2f}" in table  # chance of all image attributes, beside the figures
