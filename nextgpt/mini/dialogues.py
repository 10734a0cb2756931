"""Instruction dialogues of every kind NExT-GPT handles, about the miniature world.

Kinds (each a generator of one `Dialogue` from a random stream):
  caption   X -> text: "<image> Describe this image." -> a caption
  question  X -> text: "<audio> Is this tone pure, hollow or buzzy?" -> "It is buzzy."
  generate  text -> X: "Make a picture of a small red circle." -> "Sure! <image>"
  transfer  X -> Y: "<image> Make a video of the shape in this image moving left." -> a video
  edit      multi-turn: make X, then "Now make it blue." (and maybe a plain "Thanks!" turn)
  mixed     answers with text and media, or several media: "Make a picture of ... and a sound
            of ..." -> "Here is ... <image> Here is ... <audio>"
  text      plain text turns about the world, including requests that mention pictures or sounds
            but need no media (the routing cases: no signal tokens in the answer)

`write_dataset` renders a split to a directory in NExT-GPT's (LLaVA-style) JSON formats; the
formats are specified in docs/mini-design.md. Every record is reproducible from the world seed,
the split, the kind and its index, so a partly written dataset can be regenerated identically.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nextgpt.media import save_mp4, save_png, save_wav
from nextgpt.mini.world import MODALITIES, Sample, World

KINDS = ("caption", "question", "generate", "transfer", "edit", "mixed", "text")
FORMAT_VERSION = 1
EXTENSIONS = {"image": "png", "audio": "wav", "video": "mp4"}
FOLDERS = {"image": "images", "audio": "audios", "video": "videos"}
PLACEHOLDER = re.compile(r"<(image|audio|video)>")

NOUNS = {
    "image": ("an image", "a picture", "a drawing"),
    "audio": ("a sound", "an audio clip", "a recording"),
    "video": ("a video", "a clip", "an animation"),
}
DESCRIBE = {
    "image": ("Describe this image.", "What is in the picture?", "What do you see?"),
    "audio": ("Describe this sound.", "What do you hear?", "What is this audio?"),
    "video": ("Describe this video.", "What happens in the clip?", "What is in this video?"),
}
REQUEST = (
    "Make {noun} of {caption}.",
    "Please generate {noun} of {caption}.",
    "Can you show me {noun} of {caption}?",
    "I would like {noun} of {caption}.",
)
ACKNOWLEDGE = ("Sure!", "Here it is.", "Of course.", "Here you are.")
# Per attribute: questions about an input medium, and the answer ("{v}" is the value's phrase).
QUESTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "shape": (("What shape is this?", "Which shape do you see?"), "It is a {v}."),
    "colour": (("What colour is the shape?", "Which colour is it?"), "It is {v}."),
    "size": (("Is the shape small or large?", "How big is the shape?"), "It is {v}."),
    "direction": (("Which way does the shape move?", "Where is it going?"), "It moves {v}."),
    "pitch": (("Is this tone low, medium or high?", "How high is this tone?"), "It is {v}."),
    "timbre": (("Is this tone pure, hollow or buzzy?", "What is its timbre?"), "It is {v}."),
    "rhythm": (("What rhythm does this tone have?", "How does the tone pulse?"), "It is {v}."),
}
# How a user asks to change one attribute ("Now make it blue.").
CHANGE = {
    "shape": "make it a {v}",
    "colour": "make it {v}",
    "size": "make it {v}",
    "direction": "make it move {v}",
    "pitch": "make it {v} in pitch",
    "timbre": "make it {v}",
    "rhythm": "make it {v}",
}
AGAIN = {
    "image": "Draw this shape again, but {change}.",
    "audio": "Play this tone again, but {change}.",
    "video": "Make this video again, but {change}.",
}
TIMBRE_NATURE = {
    "pure": "only its fundamental, like a sine wave",
    "hollow": "only odd harmonics, like a square wave",
    "buzzy": "every harmonic, like a sawtooth wave",
}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
PLURALS = {"pitch": "pitches"}  # otherwise + "s"
WORLD_NOUNS = {"image": "picture", "audio": "sound", "video": "video"}
GREETINGS = ("Hello!", "Hi!", "Good morning!")
GREETING_REPLY = "Hello! I can describe and make pictures, sounds and videos."


@dataclass
class Dialogue:
    """Turns as (speaker, text); each `<image>`/`<audio>`/`<video>` in the text is the next medium
    of `media` (inputs in human turns, outputs in gpt turns)."""

    kind: str
    turns: list[tuple[str, str]] = field(default_factory=list)
    media: list[Sample] = field(default_factory=list)

    def human(self, text: str, *inputs: Sample) -> None:
        """A user turn; input media come first, each on its own line (LLaVA's layout)."""
        self.turns.append(("human", "".join(f"<{s.modality}>\n" for s in inputs) + text))
        self.media.extend(inputs)

    def gpt(self, *parts: str | Sample) -> None:
        """An assistant turn of text and output media, in order."""
        words = [p if isinstance(p, str) else f"<{p.modality}>" for p in parts]
        self.turns.append(("gpt", " ".join(words)))
        self.media.extend(p for p in parts if not isinstance(p, str))


def sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ("" if text.endswith((".", "?", "!")) else ".")


def _pick(rng: np.random.Generator, options: tuple | list) -> Any:
    return options[int(rng.integers(len(options)))]


def _listing(words: list[str], last: str = "and") -> str:
    return ", ".join(words[:-1]) + f" {last} {words[-1]}"


def _changes(
    world: World, modality: str, attributes: dict[str, str], split: str
) -> list[tuple[str, str]]:
    """Every single-attribute change of `attributes` whose result is in `split`."""
    return [
        (a.name, v)
        for a in world.attributes(modality)
        for v in a.values
        if v != attributes[a.name] and world.in_split({**attributes, a.name: v}, split)
    ]


def _chain(
    world: World, rng: np.random.Generator, split: str, modality: str, steps: int
) -> list[dict[str, str]]:
    """`steps + 1` combinations, each one attribute away from the one before, all in `split`.
    Where `split` has no such step (held-out rules that are whole combinations are never one
    change apart), the chain ends in `split` and comes to it from outside, so the last medium is
    still one of the split's."""
    start = world.pick(modality, rng, split)
    chain = [start]
    for _ in range(steps):
        options = _changes(world, modality, chain[-1], split)
        if not options:
            break
        name, value = _pick(rng, options)
        chain.append({**chain[-1], name: value})
    else:
        return chain
    chain = [start]
    for _ in range(steps):
        name, value = _pick(rng, _changes(world, modality, chain[0], "all"))
        chain.insert(0, {**chain[0], name: value})
    return chain


def _changed(before: dict[str, str], after: dict[str, str]) -> tuple[str, str]:
    """The one attribute that differs -> (name, new value)."""
    (name,) = [k for k in after if after[k] != before[k]]
    return name, after[name]


def _change_phrase(world: World, modality: str, name: str, value: str) -> str:
    return CHANGE[name].format(v=world.attribute(modality, name).phrase(value))


# ---- one generator per kind ----------------------------------------------------------------
def caption_dialogue(world: World, rng: np.random.Generator, split: str, modality: str) -> Dialogue:
    d = Dialogue("caption")
    medium = world.sample(modality, rng, split)
    d.human(_pick(rng, DESCRIBE[modality]), medium)
    d.gpt(sentence(world.caption(modality, medium.attributes, rng)))
    return d


def question_dialogue(
    world: World, rng: np.random.Generator, split: str, modality: str
) -> Dialogue:
    d = Dialogue("question")
    medium = world.sample(modality, rng, split)
    attribute = _pick(rng, world.attributes(modality))
    questions, answer = QUESTIONS[attribute.name]
    d.human(_pick(rng, questions), medium)
    d.gpt(answer.format(v=attribute.phrase(medium.attributes[attribute.name])))
    return d


def _request(world: World, rng: np.random.Generator, medium: Sample) -> str:
    caption = world.caption(medium.modality, medium.attributes, rng)
    return _pick(rng, REQUEST).format(noun=_pick(rng, NOUNS[medium.modality]), caption=caption)


def generate_dialogue(
    world: World, rng: np.random.Generator, split: str, modality: str
) -> Dialogue:
    d = Dialogue("generate")
    medium = world.sample(modality, rng, split)
    d.human(_request(world, rng, medium))
    d.gpt(_pick(rng, ACKNOWLEDGE), medium)
    return d


def transfer_dialogue(
    world: World, rng: np.random.Generator, split: str, modality: str
) -> Dialogue:
    """X -> Y: image <-> video keep shape and colour; within a modality one attribute changes.
    The answer names the output's attributes before its signal tokens, so they condition on it.
    The output stays in `split` too: held-out rules are whole combinations, so an image's shape
    and colour are not enough to keep a video of them in the image's split. Where no direction
    (or size) would, the request changes one attribute within the modality instead."""
    d = Dialogue("transfer")
    source = world.sample(modality, rng, split)
    targets = {"image": ("video", "image"), "video": ("image", "video"), "audio": ("audio",)}
    target = _pick(rng, targets[modality])
    shared = {k: source.attributes[k] for k in ("shape", "colour") if k in source.attributes}
    options = []
    if target != modality:  # the attribute the source does not fix, kept in `split`
        free = world.attribute(target, {"video": "direction", "image": "size"}[target])
        options = [v for v in free.values if world.in_split({**shared, free.name: v}, split)]
    if options and target == "video":
        direction = _pick(rng, options)
        result = world.make("video", {**shared, "direction": direction}, rng)
        request = _pick(
            rng,
            (
                "Make a video of the shape in this image moving {v}.",
                "Animate this shape so that it moves {v}.",
            ),
        ).format(v=direction)
    elif options and target == "image":
        size = _pick(rng, options)
        result = world.make("image", {**shared, "size": size}, rng)
        request = _pick(
            rng,
            (
                "Draw a {v} picture of the shape in this video.",
                "Make a {v} image of the moving shape.",
            ),
        ).format(v=size)
    else:
        before, after = _chain(world, rng, split, modality, 1)
        source, result = world.make(modality, before, rng), world.make(modality, after, rng)
        name, value = _changed(before, after)
        request = AGAIN[modality].format(change=_change_phrase(world, modality, name, value))
    d.human(request, source)
    d.gpt(f"Here is {world.caption(result.modality, result.attributes, rng)}.", result)
    return d


def edit_dialogue(world: World, rng: np.random.Generator, split: str, modality: str) -> Dialogue:
    """Make a medium, then change it one attribute at a time; sometimes end with thanks."""
    d = Dialogue("edit")
    chain = _chain(world, rng, split, modality, 1 + int(rng.integers(2)))
    current = world.make(modality, chain[0], rng)
    d.human(_request(world, rng, current))
    d.gpt(_pick(rng, ACKNOWLEDGE), current)
    for attributes in chain[1:]:
        name, value = _changed(current.attributes, attributes)
        current = world.make(modality, attributes, rng)
        d.human(f"Now {_change_phrase(world, modality, name, value)}.")
        d.gpt(f"Here is {world.caption(modality, current.attributes, rng)}.", current)
    if rng.random() < 0.3:
        d.human("Thanks!")
        d.gpt("You are welcome.")
    return d


def mixed_dialogue(world: World, rng: np.random.Generator, split: str, modality: str) -> Dialogue:
    """Answers that mix text and media: describe-then-make, make-and-explain, several media."""
    d = Dialogue("mixed")
    style = int(rng.integers(3))
    if style == 0:  # X -> text + Y
        source = world.sample(modality, rng, split)
        target = _pick(rng, [m for m in MODALITIES if m != modality])
        result = world.sample(target, rng, split)
        d.human(
            f"Describe this, then make {_pick(rng, NOUNS[target])} of "
            f"{world.caption(target, result.attributes, rng)}.",
            source,
        )
        d.gpt(
            sentence(f"this is {world.caption(modality, source.attributes, rng)}"),
            f"And here is {world.caption(target, result.attributes, rng)}.",
            result,
        )
    elif style == 1:  # text -> text + X
        result = world.sample(modality, rng, split)
        caption = world.caption(modality, result.attributes, rng)
        d.human(f"Make {_pick(rng, NOUNS[modality])} of {caption} and tell me what it shows.")
        d.gpt(f"It shows {world.caption(modality, result.attributes, rng)}.", result)
    else:  # text -> several media
        others = [m for m in MODALITIES if m != modality]
        chosen = [modality, *rng.permutation(others)[: 1 + int(rng.integers(2))]]
        results = [world.sample(str(m), rng, split) for m in chosen]
        asks = [
            f"{_pick(rng, NOUNS[r.modality])} of {world.caption(r.modality, r.attributes, rng)}"
            for r in results
        ]
        d.human(f"Please make {_listing(asks)}.")
        parts: list[str | Sample] = []
        for r in results:
            parts += [f"Here is {world.caption(r.modality, r.attributes, rng)}.", r]
        d.gpt(*parts)
    return d


def _text_qa(world: World, rng: np.random.Generator, split: str) -> tuple[str, str]:
    """One question about the world with a text-only answer (many mention media: routing)."""
    modality = _pick(rng, MODALITIES)
    attribute = _pick(rng, world.attributes(modality))
    values = [attribute.phrase(v) for v in attribute.values]
    noun = WORLD_NOUNS[modality]
    plural = PLURALS.get(attribute.name, attribute.name + "s")
    style = int(rng.integers(9))
    if style == 0:
        return _pick(rng, GREETINGS), GREETING_REPLY
    if style == 1:
        return "What can you do?", "I can describe pictures, sounds and videos, and make new ones."
    if style == 2:
        return (
            f"Which {plural} can a {noun} have?",
            f"The {attribute.name} can be {_listing(values, 'or')}.",
        )
    if style == 3:
        return (
            f"How many {plural} are there?",
            f"There are {NUMBERS[len(values)]} {plural}: {_listing(values)}.",
        )
    if style == 4:
        value = _pick(rng, values)
        kinds = [f"a {a.name}" for a in world.attributes(modality)]
        return f"Is {value} {_listing(kinds, 'or')}?", sentence(f"{value} is a {attribute.name}")
    if style == 5:
        direction = _pick(rng, tuple(OPPOSITE))
        return (
            f"What is the opposite of {direction}?",
            f"The opposite of {direction} is {OPPOSITE[direction]}.",
        )
    if style == 6:
        timbre = _pick(rng, tuple(TIMBRE_NATURE))
        return (
            f"What does a {timbre} tone sound like?",
            f"A {timbre} tone has {TIMBRE_NATURE[timbre]}.",
        )
    medium = world.sample(modality, rng, split)
    caption = world.caption(modality, medium.attributes, rng)
    if style == 7:
        return (
            f"Do not make {_pick(rng, NOUNS[modality])}, just tell me in words: what is {caption}?",
            f"In words: {caption}, one of the {noun}s of this world.",
        )
    names = [a.name for a in world.attributes(modality)]
    return (
        f"What are the parts of the description '{caption}'?",
        f"Its {_listing(names)}: "
        + _listing([a.phrase(medium.attributes[a.name]) for a in world.attributes(modality)])
        + ".",
    )


def text_dialogue(world: World, rng: np.random.Generator, split: str, modality: str) -> Dialogue:
    d = Dialogue("text")
    for _ in range(1 + int(rng.integers(3))):
        question, answer = _text_qa(world, rng, split)
        d.human(question)
        d.gpt(answer)
    return d


GENERATORS = {
    "caption": caption_dialogue,
    "question": question_dialogue,
    "generate": generate_dialogue,
    "transfer": transfer_dialogue,
    "edit": edit_dialogue,
    "mixed": mixed_dialogue,
    "text": text_dialogue,
}


def make_dialogue(
    world: World,
    kind: str,
    split: str,
    index: int,
    modality: str | None = None,
    stream: str = "",
) -> Dialogue:
    """Dialogue `index` of `kind` in `split` and `stream`: the same arguments always give the
    same dialogue. `modality` is the main (input or output) modality; by default it cycles with
    the index."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown dialogue kind {kind!r}; expected one of {KINDS}")
    modality = modality or MODALITIES[index % len(MODALITIES)]
    rng = world.rng("dialogue", stream, split, kind, modality, index)
    return GENERATORS[kind](world, rng, split, modality)


# ---- records (JSON) ------------------------------------------------------------------------
def media_slots(record: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(speaker, modality, index into `<modality>_list`) of every placeholder of a MosIT
    record, in order: the reading rule of the format (human turn = input, gpt turn = output)."""
    counters = dict.fromkeys(MODALITIES, 0)
    slots = []
    for turn in record["conversation"]:
        for match in PLACEHOLDER.finditer(turn["value"]):
            modality = match.group(1)
            slots.append((turn["from"], modality, counters[modality]))
            counters[modality] += 1
    return slots


def save_media(sample: Sample, root: Path, name: str) -> str:
    """Write one medium under `root`; returns its path relative to `root`."""
    rel = f"{FOLDERS[sample.modality]}/{name}.{EXTENSIONS[sample.modality]}"
    if sample.modality == "image":
        save_png(sample.media, root / rel)
    elif sample.modality == "audio":
        save_wav(sample.media[0], sample.media[1], root / rel)
    else:
        save_mp4(sample.media[0], sample.media[1], root / rel)
    return rel


def mosit_record(
    world: World, dialogue: Dialogue, record_id: str, root: Path, split: str
) -> dict[str, Any]:
    """NExT-GPT's MosIT raw form (stage 3): `conversation` plus, per modality present,
    `<m>_list` (every medium's path, in order of its placeholder), `<m>_captions` (the canonical
    captions of the outputs only, in order) and `<m>_attributes` (of every listed medium)."""
    record: dict[str, Any] = {"id": record_id, "kind": dialogue.kind, "split": split}
    record["conversation"] = [{"from": s, "value": v} for s, v in dialogue.turns]
    slots = [speaker for speaker, _, _ in media_slots(record)]
    for k, (sample, speaker) in enumerate(zip(dialogue.media, slots)):
        m = sample.modality
        record.setdefault(f"{m}_list", []).append(save_media(sample, root, f"{record_id}-{k}"))
        record.setdefault(f"{m}_attributes", []).append(sample.attributes)
        if speaker == "gpt":
            record.setdefault(f"{m}_captions", []).append(world.caption(m, sample.attributes))
    return record


def comprehension_record(
    dialogue: Dialogue, record_id: str, root: Path, split: str
) -> dict[str, Any]:
    """NExT-GPT's X-to-text pair form (stage 1): `input_<m>` and a two-turn conversation."""
    (sample,) = dialogue.media
    return {
        "id": record_id,
        "split": split,
        f"input_{sample.modality}": save_media(sample, root, record_id),
        "attributes": sample.attributes,
        "conversations": [{"from": s, "value": v} for s, v in dialogue.turns],
    }


def generation_record(
    world: World, dialogue: Dialogue, record_id: str, root: Path, split: str
) -> dict[str, Any]:
    """NExT-GPT's text-to-X pair form (stage 2): `output_<m>`, `<m>_captions` (the canonical
    caption the decoder is conditioned on) and a two-turn conversation ending in `<m>`."""
    (sample,) = dialogue.media
    m = sample.modality
    return {
        "id": record_id,
        "split": split,
        f"output_{m}": save_media(sample, root, record_id),
        f"{m}_captions": world.caption(m, sample.attributes),
        "attributes": sample.attributes,
        "conversations": [{"from": s, "value": v} for s, v in dialogue.turns],
    }


@dataclass
class DatasetSizes:
    """How many records to write: pairs per modality (stages 1 and 2) and dialogues per kind."""

    comprehension: int = 1000
    generation: int = 1000
    instructions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 300))


def write_dataset(
    world: World, out_dir: str | Path, split: str, sizes: DatasetSizes, progress: bool = False
) -> dict[str, Any]:
    """Render `split` into `out_dir`: media folders, `<m>_comprehension.json`,
    `<m>_generation.json`, `mosit.json` and `manifest.json` (what was written, and from what)."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    unknown = sorted(set(sizes.instructions) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown dialogue kinds {unknown}; expected some of {KINDS}")
    total = sum(sizes.instructions.values())
    total += len(MODALITIES) * (sizes.comprehension + sizes.generation)
    bar = tqdm(total=total, desc=f"mini dataset ({split})", disable=not progress, unit="rec")
    files: dict[str, int] = {}

    def dump(name: str, records: list[dict[str, Any]]) -> None:
        (root / name).write_text(json.dumps(records, indent=1))
        files[name] = len(records)

    for m in MODALITIES:
        records = []
        for i in range(sizes.comprehension):
            d = make_dialogue(world, "caption", split, i, m)
            records.append(comprehension_record(d, f"{m}-comp-{i:06d}", root, split))
            bar.update()
        dump(f"{m}_comprehension.json", records)
        records = []
        for i in range(sizes.generation):
            d = make_dialogue(world, "generate", split, i, m)
            records.append(generation_record(world, d, f"{m}-gen-{i:06d}", root, split))
            bar.update()
        dump(f"{m}_generation.json", records)
    records = []
    for kind, count in sizes.instructions.items():
        for i in range(count):
            # a stream of its own, so these are not the pair files' dialogues again
            d = make_dialogue(world, kind, split, i, stream="instructions")
            records.append(mosit_record(world, d, f"{kind}-{i:06d}", root, split))
            bar.update()
    dump("mosit.json", records)
    bar.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "world": {
            "seed": world.seed,
            "held_out": [dict(rule) for rule in world.config.held_out],
        },
        "files": files,
    }
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
