"""`nextgpt eval`: how well a model understands, routes and generates in the miniature world.

Three measurements, each on train combinations and on held-out ones (attribute pairs the model
never saw together), each reported beside its chance level so that a figure is never read alone:

1. Captions: the model gets a world medium and a "describe this" question, answers in text only,
   and `World.parse_caption` reads the attributes back from its answer.
2. Routing: the first user turn of every dialogue kind; the model answers freely, and the set of
   modalities whose signal-token groups it emitted must equal the set of placeholders in the
   dialogue's first answer (the empty set for caption, question and text).
3. Generation: a text request for one medium; a judge names the generated medium's attributes.
   Beside it is the decoder ceiling: the same decoder conditioned on its own text encoder's
   embedding of the gold canonical caption, with the same noise seed. The ratio of the two
   separates what the LLM and output projector lose from what the decoder cannot draw anyway.
4. Generation in dialogue: the last answer with media of the dialogue kinds that make media
   from more than a plain request: transfer (a medium in, another out: "make a video of the shape
   in this image"), edit (a later "now make it blue", after the gold earlier turns with their
   media) and mixed (text and media in one answer: describe this then make that, or two media).
   The model answers freely; each gold output is judged against the medium of its modality in the
   same place among the reply's media (missing: wrong), beside the ceiling as in 3.

Beside 3, without decoding anything more: the conditioning that the output projector handed the
decoder in each generation, read back as the canonical caption whose own text-encoder embedding
lies nearest to it (L2, over every combination of both splits). Where this names the right
attribute and the judged medium does not, the decoder lost it; where this is wrong already, the
LLM and the output projector did.

Items are built from the world, not read from the build's data files, so any model directory can
be evaluated. They are drawn from streams named "eval" (training uses other streams), and
attribute combinations are cycled in a seeded order so that every combination of a split is
asked about equally often: the few held-out combinations must each count.

    nextgpt eval [--model M] [--judges DIR] [--quick] [--json OUT] [--seed N] [--world-seed N]
                 [--steps N] [--guidance G] [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from nextgpt.cli import DEFAULT_MODEL, UsageError
from nextgpt.mini.dialogues import DESCRIBE, KINDS, NOUNS, PLACEHOLDER, REQUEST, make_dialogue
from nextgpt.mini.world import MODALITIES, Sample, World, WorldConfig

if TYPE_CHECKING:
    from nextgpt.model import NextGPT, Reply

SPLITS = ("train", "heldout")
SPLIT_TITLES = {"train": "train", "heldout": "held-out"}
ROUTING_CHANCE = 1 / 2 ** len(MODALITIES)  # uniform over the 8 subsets of the output modalities
ALL = "all"  # the row of items with every attribute right


class MediaJudge(Protocol):
    """What evaluation needs from the judges (`nextgpt.mini.judges.Judges`)."""

    def judge(self, modality: str, media: Any) -> dict[str, str]: ...


@dataclass(frozen=True)
class EvalSettings:
    """How many items per cell, and how media are decoded.

    Counts are per split: `captions` and `generations` per modality, `routing` per dialogue kind,
    `dialogues` per kind of `DIALOGUE_KINDS`.
    `steps` / `guidance` None use each decoder's own config, so the model is judged as it is
    shipped. `seed` picks the items and the decoders' noise; `world_seed` the world's nuisances.
    """

    captions: int = 48
    routing: int = 48  # 12 (84 a split) could not tell 0.99 from 0.988: one miss in 84
    generations: int = 48  # 24 left about +-0.09 on a rate near 0.7
    dialogues: int = 12  # per dialogue kind of section 4
    caption_tokens: int = 48
    routing_tokens: int = 128
    generation_tokens: int = 64
    steps: int | None = None
    guidance: float | None = None
    ceiling: bool = True
    seed: int = 0
    world_seed: int = 0

    @classmethod
    def quick(cls, **overrides: Any) -> EvalSettings:
        """A few items per cell: proves every path runs (CI, smoke builds), measures little."""
        return replace(cls(captions=2, routing=1, generations=1, dialogues=1), **overrides)


# ---- items -------------------------------------------------------------------------------------
@dataclass
class CaptionItem:
    modality: str
    attributes: dict[str, str]
    prompt: str
    media: Any


@dataclass
class RoutingItem:
    kind: str
    text: str  # the first user turn, with a placeholder per input medium
    inputs: list[Sample]
    gold: frozenset[str]


@dataclass
class GenerationItem:
    modality: str
    attributes: dict[str, str]
    prompt: str


@dataclass
class DialogueItem:
    kind: str
    messages: list[dict[str, Any]]  # the gold dialogue up to the request, media in place
    outputs: list[Sample]  # the gold media of the last answer, in order


DIALOGUE_KINDS = ("transfer", "edit", "mixed")  # kinds whose last answer holds generated media


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def balanced_combinations(
    world: World, modality: str, split: str, count: int, rng: np.random.Generator
) -> list[dict[str, str]]:
    """`count` combinations of `split`, each one before any repeats, in seeded random orders: with
    few items per cell every held-out combination is still asked about."""
    combos = world.combinations(modality, split)
    out: list[dict[str, str]] = []
    while len(out) < count:
        out += [combos[int(i)] for i in rng.permutation(len(combos))]
    return out[:count]


def caption_items(
    world: World, split: str, modality: str, count: int, seed: int = 0
) -> list[CaptionItem]:
    """Fresh media with one of the caption kind's questions ("Describe this image.")."""
    rng = world.rng("eval", seed, "caption", split, modality)
    items = []
    for attributes in balanced_combinations(world, modality, split, count, rng):
        prompt = _pick(rng, DESCRIBE[modality])
        items.append(
            CaptionItem(modality, attributes, prompt, world.render(modality, attributes, rng))
        )
    return items


def routing_items(world: World, split: str, count: int, seed: int = 0) -> list[RoutingItem]:
    """The first user turn of `count` dialogues of every kind (the main modality cycles), with
    the output modalities of the first answer as the gold route."""
    items = []
    for kind in KINDS:
        for index in range(count):
            d = make_dialogue(world, kind, split, index, stream=f"eval-{seed}")
            (_, request), (_, answer) = d.turns[:2]
            inputs = d.media[: len(PLACEHOLDER.findall(request))]
            gold = frozenset(PLACEHOLDER.findall(answer))
            items.append(RoutingItem(kind, request, inputs, gold))
    return items


def generation_items(
    world: World, split: str, modality: str, count: int, seed: int = 0
) -> list[GenerationItem]:
    """Requests worded as the generate kind's ("Make a picture of a small red circle.")."""
    rng = world.rng("eval", seed, "generate", split, modality)
    items = []
    for attributes in balanced_combinations(world, modality, split, count, rng):
        caption = world.caption(modality, attributes, rng)
        prompt = _pick(rng, REQUEST).format(noun=_pick(rng, NOUNS[modality]), caption=caption)
        items.append(GenerationItem(modality, attributes, prompt))
    return items


def dialogue_items(world: World, split: str, count: int, seed: int = 0) -> list[DialogueItem]:
    """The last request answered with media in `count` dialogues of each of `DIALOGUE_KINDS`
    (the main modality cycles), after the gold turns before it: earlier answers come back with
    the media they carried, as a client sends back what it was given. The dialogues' media list
    follows their placeholders in order (inputs and outputs alike), which is how the turns take
    theirs."""
    items = []
    for kind in DIALOGUE_KINDS:
        for index in range(count):
            d = make_dialogue(world, kind, split, index, stream=f"eval-dialogue-{seed}")
            last = max(
                i
                for i, (speaker, text) in enumerate(d.turns)
                if speaker == "gpt" and PLACEHOLDER.search(text)
            )
            media = iter(d.media)
            messages = []
            for speaker, text in d.turns[:last]:
                taken = [next(media).media for _ in PLACEHOLDER.findall(text)]
                role = "user" if speaker == "human" else "assistant"
                messages.append(turn_message(role, text, taken))
            outputs = [next(media) for _ in PLACEHOLDER.findall(d.turns[last][1])]
            items.append(DialogueItem(kind, messages, outputs))
    return items


def turn_message(role: str, text: str, media: list[Any]) -> dict[str, Any]:
    """A dialogue turn (`<image>\\nDescribe ...`) as a `NextGPT.generate` message: media at
    their placeholders and text pieces stripped, the same layout the training data reader gives
    the same turn (nextgpt.data.formats), so the model sees what it was trained on. In a user
    turn the media are inputs; in an assistant turn, the outputs it answered with."""
    parts = iter(media)
    content: list[dict[str, Any]] = []
    for i, piece in enumerate(PLACEHOLDER.split(text)):
        if i % 2:
            content.append({"type": piece, piece: next(parts)})
        elif piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return {"role": role, "content": content}


def user_message(text: str, inputs: list[Any]) -> dict[str, Any]:
    """A user turn with its input media (`turn_message`)."""
    return turn_message("user", text, inputs)


# ---- scoring -----------------------------------------------------------------------------------
def caption_scores(world: World, modality: str, text: str, gold: dict[str, str]) -> dict[str, bool]:
    """Per attribute: does the text name exactly the gold value? Plus `all`."""
    found = world.parse_caption(modality, text)
    scores = {name: found[name] == value for name, value in gold.items()}
    return {**scores, ALL: all(scores.values())}


def judged_scores(
    judges: MediaJudge, modality: str, media: Any, gold: dict[str, str]
) -> dict[str, bool]:
    """Per attribute: does the judge see the gold value in the medium? Plus `all`."""
    seen = judges.judge(modality, media)
    scores = {name: seen.get(name) == value for name, value in gold.items()}
    return {**scores, ALL: all(scores.values())}


def judge_input(modality: str, data: Any, fps: float) -> Any:
    """A decoder's output as the judges read it: video decoders return bare frames, which carry
    no frame rate, so they are paired with the world's."""
    if modality == "video" and isinstance(data, np.ndarray):
        return (data, fps)
    return data


def matched_outputs(gold: list[Sample], reply: Reply) -> list[Any]:
    """For each gold output, the reply's medium of the same modality in the same place among
    that modality's media (the second video asked for against the second video made), or None
    where the reply made fewer."""
    produced: dict[str, list[Any]] = {}
    for item in reply.media:
        produced.setdefault(item.modality, []).append(item.data)
    seen: Counter[str] = Counter()
    out = []
    for sample in gold:
        k = seen[sample.modality]
        seen[sample.modality] += 1
        made = produced.get(sample.modality, [])
        out.append(made[k] if k < len(made) else None)
    return out


def produced_modalities(reply: Reply) -> frozenset[str]:
    """The modalities whose signal-token groups the model emitted: each group becomes one medium
    of the reply (decoded or not), in the order emitted."""
    return frozenset(item.modality for item in reply.media)


def routing_correct(gold: frozenset[str] | set[str], produced: frozenset[str] | set[str]) -> bool:
    """Exact set match: a missing output and an unasked-for one are both routing errors."""
    return set(gold) == set(produced)


def attribute_chance(world: World, modality: str) -> dict[str, float]:
    """Uniform guessing per attribute, and for all attributes at once."""
    sizes = {a.name: len(a.values) for a in world.attributes(modality)}
    return {**{k: 1 / n for k, n in sizes.items()}, ALL: 1 / float(np.prod(list(sizes.values())))}


def majority_baseline(items: list[RoutingItem]) -> float:
    """Accuracy of the best constant route (always text only, say): a model that ignores the
    request scores at least this much, so it is the bar routing must clear besides chance."""
    if not items:
        return 0.0
    golds = [item.gold for item in items]
    return max(golds.count(g) for g in set(golds)) / len(golds)


def _message_text(message: dict[str, Any]) -> str:
    """A message back as dialogue text, media as placeholders (for the item records)."""
    pieces = [
        part["text"] if part["type"] == "text" else f"<{part['type']}>"
        for part in message["content"]
    ]
    return f"{message['role']}: " + " ".join(pieces)


# ---- running the model -------------------------------------------------------------------------
class _NoDecoder:
    """Stands in for a decoder while routing is measured: only which signal groups were emitted
    counts, so running diffusion there would cost most of the time and measure nothing."""

    def generate(self, cond: Any, **options: Any) -> list[None]:
        return [None] * len(cond)


class _Recording:
    """A decoder that keeps the last conditioning it was asked to decode (the rest passes
    through)."""

    def __init__(self, decoder: Any) -> None:
        self.decoder = decoder
        self.last: Any = None

    def generate(self, cond: Any, **options: Any) -> list[Any]:
        self.last = cond.detach().float().cpu()
        return self.decoder.generate(cond, **options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.decoder, name)


@contextlib.contextmanager
def _decoders_swapped(model: NextGPT, stand_ins: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Swap the model's decoders for stand-ins (the model keeps them in a plain dict, and
    `generate` still runs the output projectors and lists one medium per emitted group)."""
    original = model.decoders
    model.decoders = stand_ins
    try:
        yield stand_ins
    finally:
        model.decoders = original


def decoders_skipped(model: NextGPT) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """No decoding at all: only which signal groups were emitted counts."""
    return _decoders_swapped(model, {m: _NoDecoder() for m in model.decoders})


def conditioning_recorded(
    model: NextGPT, decode: bool = True
) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """Keep per modality the conditioning each decoder was last given; decode as usual, or, with
    `decode=False`, not at all (the media come back None: what probes that only read the
    conditioning back need, without the cost of diffusion)."""
    return _decoders_swapped(
        model,
        {m: _Recording(d if decode else _NoDecoder()) for m, d in model.decoders.items()},
    )


def caption_bank(world: World, modality: str, decoder: Any) -> tuple[list[dict[str, str]], Any]:
    """Every combination of `modality` (both splits) and the decoder's own embedding of its
    canonical caption, (N, L, D): what a conditioning is read back against."""
    import torch

    combos = world.combinations(modality, "all")
    with torch.no_grad():
        bank = decoder.encode_text([world.caption(modality, c) for c in combos])
    return combos, bank.detach().float().cpu()


def nearest_caption_scores(
    combos: list[dict[str, str]], bank: Any, cond: Any, gold: dict[str, str]
) -> dict[str, bool]:
    """Which of `gold`'s attributes the combination nearest to `cond` (mean squared distance to
    its caption embedding) gets right, and `all`."""
    flat = bank.reshape(len(combos), -1)
    if cond.numel() != flat.shape[1]:
        raise ValueError(
            f"a conditioning of shape {tuple(cond.shape)} cannot be compared with caption "
            f"embeddings of shape {tuple(bank.shape[1:])}"
        )
    distance = ((flat - cond.reshape(1, -1).to(flat.dtype)) ** 2).mean(1)
    pick = combos[int(distance.argmin())]
    scores = {name: pick[name] == value for name, value in gold.items()}
    scores[ALL] = all(scores.values())
    return scores


class _Tally:
    """Booleans per (row key, split) -> accuracies."""

    def __init__(self) -> None:
        self.hits: dict[tuple[str, ...], list[bool]] = {}

    def add(self, key: tuple[str, ...], ok: bool) -> None:
        self.hits.setdefault(key, []).append(bool(ok))

    def mean(self, key: tuple[str, ...]) -> float | None:
        values = self.hits.get(key)
        return float(np.mean(values)) if values else None

    def count(self, key: tuple[str, ...]) -> int:
        return len(self.hits.get(key, []))


def _judged_rows(
    world: World, modality: str, model: _Tally, ceiling: _Tally, prefix: tuple[str, ...]
) -> dict[str, dict[str, Any]]:
    """Per attribute of `modality` (and `all`): chance, and per split the model's accuracy, the
    ceiling's and their ratio, from tallies keyed (*prefix, modality, attribute, split)."""
    rows: dict[str, dict[str, Any]] = {}
    for name, chance in attribute_chance(world, modality).items():
        row: dict[str, Any] = {"chance": chance}
        for sp in SPLITS:
            acc = model.mean((*prefix, modality, name, sp))
            top = ceiling.mean((*prefix, modality, name, sp))
            row[sp] = {"model": acc, "ceiling": top, "ratio": _ratio(acc, top)}
        rows[name] = row
    return rows


def _split_rows(
    world: World, modalities: Any, tally: _Tally
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per modality and attribute (and `all`): the accuracy per split from a tally keyed
    (modality, attribute, split), and chance."""
    return {
        m: {
            name: {**{sp: tally.mean((m, name, sp)) for sp in SPLITS}, "chance": c}
            for name, c in attribute_chance(world, m).items()
        }
        for m in modalities
    }


def _all_wrong(attributes: dict[str, str]) -> dict[str, bool]:
    """The scores of an output that was never made: every attribute and `all` wrong."""
    return {k: False for k in [*attributes, ALL]}


def _ratio(model: float | None, ceiling: float | None) -> float | None:
    if model is None or not ceiling:
        return None
    return model / ceiling


def evaluate(
    model: NextGPT,
    judges: MediaJudge | None,
    world: World,
    settings: EvalSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the three measurements on both splits; returns JSON-ready results (see module doc),
    with every item's prompt, answer and verdict under `items`."""
    import torch
    from tqdm import tqdm

    s = settings or EvalSettings()
    decoders = set(model.decoders)
    have_judges = set(getattr(judges, "judges", MODALITIES)) if judges is not None else set()
    gen_modalities = [m for m in MODALITIES if m in decoders and m in have_judges]
    skipped = {
        m: ("no decoder" if m not in decoders else "no judge")
        for m in MODALITIES
        if m not in gen_modalities
    }
    plan = {
        split: {
            "caption": [
                it for m in MODALITIES for it in caption_items(world, split, m, s.captions, s.seed)
            ],
            "routing": routing_items(world, split, s.routing, s.seed),
            "generation": [
                it
                for m in gen_modalities
                for it in generation_items(world, split, m, s.generations, s.seed)
            ],
            "dialogue": dialogue_items(world, split, s.dialogues, s.seed) if gen_modalities else [],
        }
        for split in SPLITS
    }
    total = sum(
        len(p["caption"])
        + len(p["routing"])
        + len(p["generation"]) * (1 + s.ceiling)
        + len(p["dialogue"])
        for p in plan.values()
    )
    options = {
        m: {k: v for k, v in (("steps", s.steps), ("guidance", s.guidance)) if v is not None}
        for m in decoders
    }
    fps = world.config.video_fps
    bar = tqdm(total=total, desc="eval", disable=not progress, unit="item")
    captions, routes, model_gen, ceiling_gen = _Tally(), _Tally(), _Tally(), _Tally()
    conditioning = _Tally()
    # only where generations are asked for: a bank loads the decoder's text encoder
    asked = {g.modality for p in plan.values() for g in p["generation"]}
    banks = {m: caption_bank(world, m, model.decoders[m]) for m in gen_modalities if m in asked}
    dialogue_gen, dialogue_ceiling = _Tally(), _Tally()
    records: list[dict[str, Any]] = []
    sections = ("caption", "routing", "generation", "dialogue")
    seconds: dict[str, float] = dict.fromkeys(sections, 0.0)

    def ceiling_scores(modality: str, attributes: dict[str, str], seed: int) -> dict[str, bool]:
        """The decoder on its own embedding of the gold caption, with the model's noise seed."""
        assert judges is not None
        decoder = model.decoders[modality]
        with torch.no_grad():
            cond = decoder.encode_text([world.caption(modality, attributes)])
            data = decoder.generate(cond, seed=seed, **options[modality])[0]
        return judged_scores(judges, modality, judge_input(modality, data, fps), attributes)

    for split in SPLITS:
        start = time.perf_counter()
        for item in plan[split]["caption"]:
            message = user_message(f"<{item.modality}>\n{item.prompt}", [item.media])
            reply = model.generate([message], modalities=[], max_new_tokens=s.caption_tokens)
            scores = caption_scores(world, item.modality, reply.text, item.attributes)
            for name, ok in scores.items():
                captions.add((item.modality, name, split), ok)
            records.append(
                {
                    "section": "caption",
                    "split": split,
                    "modality": item.modality,
                    "prompt": item.prompt,
                    "gold": item.attributes,
                    "answer": reply.text,
                    "correct": scores,
                }
            )
            bar.update()
        seconds["caption"] += time.perf_counter() - start

        start = time.perf_counter()
        with decoders_skipped(model):
            for r in plan[split]["routing"]:
                message = user_message(r.text, [x.media for x in r.inputs])
                reply = model.generate([message], max_new_tokens=s.routing_tokens)
                produced = produced_modalities(reply)
                ok = routing_correct(r.gold, produced)
                routes.add((r.kind, split), ok)
                routes.add((ALL, split), ok)
                records.append(
                    {
                        "section": "routing",
                        "split": split,
                        "kind": r.kind,
                        "prompt": r.text,
                        "gold": sorted(r.gold),
                        "produced": sorted(produced),
                        "answer": reply.text,
                        "correct": ok,
                    }
                )
                bar.update()
        seconds["routing"] += time.perf_counter() - start

        start = time.perf_counter()
        for i, g in enumerate(plan[split]["generation"]):
            assert judges is not None  # gen_modalities is empty without judges
            seed = s.seed + i
            with conditioning_recorded(model) as recorders:
                reply = model.generate(
                    g.prompt,
                    modalities=[g.modality],
                    max_new_tokens=s.generation_tokens,
                    seed=seed,
                    decoder_options=options,
                )
            cond = recorders[g.modality].last
            if cond is not None:
                read_back = nearest_caption_scores(*banks[g.modality], cond, g.attributes)
            else:  # no group emitted: nothing reached the decoder
                read_back = _all_wrong(g.attributes)
            for name, ok in read_back.items():
                conditioning.add((g.modality, name, split), ok)
            outputs = reply.of(g.modality)
            if outputs:
                media = judge_input(g.modality, outputs[0], fps)
                scores = judged_scores(judges, g.modality, media, g.attributes)
            else:  # cannot happen when the model honours `modalities`; scored wrong if it does
                scores = _all_wrong(g.attributes)
            for name, ok in scores.items():
                model_gen.add((g.modality, name, split), ok)
            record = {
                "section": "generation",
                "split": split,
                "modality": g.modality,
                "prompt": g.prompt,
                "gold": g.attributes,
                "answer": reply.text,
                "correct": scores,
                "conditioning": read_back,
            }
            bar.update()
            if s.ceiling:
                ceiling = ceiling_scores(g.modality, g.attributes, seed)
                for name, ok in ceiling.items():
                    ceiling_gen.add((g.modality, name, split), ok)
                record["ceiling"] = ceiling
                bar.update()
            records.append(record)
        seconds["generation"] += time.perf_counter() - start

        start = time.perf_counter()
        for i, d in enumerate(plan[split]["dialogue"]):
            assert judges is not None
            seed = s.seed + i
            reply = model.generate(
                d.messages,
                max_new_tokens=s.routing_tokens,
                seed=seed,
                decoder_options=options,
            )
            outputs = []
            for sample, data in zip(d.outputs, matched_outputs(d.outputs, reply)):
                m = sample.modality
                if m not in gen_modalities:
                    continue
                if data is None:
                    scores = _all_wrong(sample.attributes)
                else:
                    scores = judged_scores(judges, m, judge_input(m, data, fps), sample.attributes)
                for name, ok in scores.items():
                    dialogue_gen.add((d.kind, m, name, split), ok)
                out: dict[str, Any] = {"modality": m, "gold": sample.attributes, "correct": scores}
                if s.ceiling:
                    out["ceiling"] = ceiling_scores(m, sample.attributes, seed)
                    for name, ok in out["ceiling"].items():
                        dialogue_ceiling.add((d.kind, m, name, split), ok)
                outputs.append(out)
            records.append(
                {
                    "section": "dialogue",
                    "split": split,
                    "kind": d.kind,
                    "prompt": [_message_text(message) for message in d.messages],
                    "produced": [item.modality for item in reply.media],
                    "answer": reply.text,
                    "outputs": outputs,
                }
            )
            bar.update()
        seconds["dialogue"] += time.perf_counter() - start
    bar.close()

    caption_rows = _split_rows(world, MODALITIES, captions)
    routing_rows = {
        key: {**{sp: routes.mean((key, sp)) for sp in SPLITS}, "chance": ROUTING_CHANCE}
        for key in (*KINDS, ALL)
    }
    generation_rows = {
        m: _judged_rows(world, m, model_gen, ceiling_gen, ()) for m in gen_modalities
    }
    conditioning_rows = _split_rows(world, gen_modalities, conditioning)
    dialogue_rows: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    dialogue_counts: dict[str, dict[str, dict[str, int]]] = {}
    for kind in DIALOGUE_KINDS:
        for m in gen_modalities:
            if not any(dialogue_gen.count((kind, m, ALL, sp)) for sp in SPLITS):
                continue
            dialogue_counts.setdefault(kind, {})[m] = {
                sp: dialogue_gen.count((kind, m, ALL, sp)) for sp in SPLITS
            }
            dialogue_rows.setdefault(kind, {})[m] = _judged_rows(
                world, m, dialogue_gen, dialogue_ceiling, (kind,)
            )
    counts = {
        "caption": {m: {sp: captions.count((m, ALL, sp)) for sp in SPLITS} for m in MODALITIES},
        "routing": {k: {sp: routes.count((k, sp)) for sp in SPLITS} for k in (*KINDS, ALL)},
        "generation": {
            m: {sp: model_gen.count((m, ALL, sp)) for sp in SPLITS} for m in gen_modalities
        },
        "dialogue": dialogue_counts,
    }
    return {
        "settings": asdict(s),
        "world_seed": world.seed,
        "caption": caption_rows,
        "routing": {
            "kinds": routing_rows,
            "chance": ROUTING_CHANCE,
            "majority": {sp: majority_baseline(plan[sp]["routing"]) for sp in SPLITS},
        },
        "generation": generation_rows,
        "conditioning": conditioning_rows,
        "dialogue": dialogue_rows,
        "skipped": {"generation": skipped},
        "counts": counts,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "items": records,
    }


# ---- the table ---------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _judged_cells(row: dict[str, Any], fields: tuple[str, ...]) -> list[str]:
    """A `_judged_rows` row as table cells: `fields` per split, then chance."""
    return [*(_fmt(row[sp][f]) for sp in SPLITS for f in fields), _fmt(row["chance"])]


def _split_table(title: str, rows_of: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """A `_split_rows` result as a markdown table under `title`."""
    lines = [
        title,
        "",
        _row(["modality", "attribute", "train", "held-out", "chance"]),
        _row(["---"] * 5),
    ]
    for m, rows in rows_of.items():
        for name, r in rows.items():
            lines.append(_row([m, name, _fmt(r["train"]), _fmt(r["heldout"]), _fmt(r["chance"])]))
    return lines


def format_table(results: dict[str, Any]) -> str:
    """Markdown tables, one per measurement, chance beside every figure."""
    counts = results["counts"]
    lines = _split_table(
        "### Captions (medium -> text, attributes read back with parse_caption)",
        results["caption"],
    )
    n = counts["caption"]
    lines += [
        "",
        "Items per modality: "
        + ", ".join(f"{m} {c['train']} / {c['heldout']}" for m, c in n.items())
        + " (train / held-out). Chance: uniform over the attribute's values; "
        "`all`: every attribute right.",
        "",
        "### Routing (output modalities of a free answer = those of the first gold answer)",
        "",
        _row(["kind", "train", "held-out", "chance", "items"]),
        _row(["---"] * 5),
    ]
    routing = results["routing"]
    for kind, r in routing["kinds"].items():
        c = counts["routing"][kind]
        lines.append(
            _row(
                [
                    kind,
                    _fmt(r["train"]),
                    _fmt(r["heldout"]),
                    _fmt(r["chance"]),
                    f"{c['train']} / {c['heldout']}",
                ]
            )
        )
    majority = routing["majority"]
    lines += [
        "",
        f"Chance {routing['chance']:.3f}: uniform over the {2 ** len(MODALITIES)} subsets of "
        f"{{{', '.join(MODALITIES)}}}. Best constant answer: {_fmt(majority['train'])} train, "
        f"{_fmt(majority['heldout'])} held-out.",
        "",
        "### Generation (text -> medium, judged; ceiling: the decoder on the gold caption)",
        "",
        _row(
            [
                "modality",
                "attribute",
                "train",
                "ceiling",
                "ratio",
                "held-out",
                "ceiling",
                "ratio",
                "chance",
            ]
        ),
        _row(["---"] * 9),
    ]
    for m, rows in results["generation"].items():
        for name, r in rows.items():
            lines.append(_row([m, name, *_judged_cells(r, ("model", "ceiling", "ratio"))]))
    n = counts["generation"]
    lines += [
        "",
        "Items per modality: "
        + (", ".join(f"{m} {c['train']} / {c['heldout']}" for m, c in n.items()) or "none")
        + " (train / held-out). Ratio: model / ceiling (- where the ceiling is 0).",
    ]
    skipped = results["skipped"]["generation"]
    if skipped:
        lines.append(
            "Not generated: " + ", ".join(f"{m} ({why})" for m, why in skipped.items()) + "."
        )
    if results["conditioning"]:
        lines += [""]
        lines += _split_table(
            "### Conditioning (the same generations: the caption nearest to what the output "
            "projector gave the decoder)",
            results["conditioning"],
        )
        lines += [
            "",
            "Nearest by mean squared distance to the decoder's own embedding of each "
            "combination's canonical caption, over both splits' combinations. Right here but "
            "wrong in the judged medium: lost by the decoder; wrong here: lost before it.",
        ]
    if results["dialogue"]:
        lines += [
            "",
            "### Generation in dialogue (medium -> medium, later edits, text and media in one "
            "answer; judged)",
            "",
            _row(
                [
                    "kind",
                    "modality",
                    "attribute",
                    "train",
                    "ceiling",
                    "held-out",
                    "ceiling",
                    "chance",
                ]
            ),
            _row(["---"] * 8),
        ]
        for kind, modalities in results["dialogue"].items():
            for m, rows in modalities.items():
                for name, r in rows.items():
                    lines.append(_row([kind, m, name, *_judged_cells(r, ("model", "ceiling"))]))
        n = counts["dialogue"]
        lines += [
            "",
            "Judged outputs: "
            + "; ".join(
                f"{kind} " + ", ".join(f"{m} {c['train']} / {c['heldout']}" for m, c in ms.items())
                for kind, ms in n.items()
            )
            + " (train / held-out). A gold output the answer did not make counts as wrong.",
        ]
    return "\n".join(lines) + "\n"


# ---- the command -------------------------------------------------------------------------------
def model_directory(model: str) -> Path:
    """Where `--model` lives on disk: a shipped model's package folder (`nextgpt-mini`, whose
    judges ship beside it), else the path as given."""
    from nextgpt.shipped import shipped_model_dir

    try:
        return shipped_model_dir(model) or Path(model)
    except FileNotFoundError:  # not installed: loading the model reports it
        return Path(model)


def judges_dir(model: str, judges: str | None) -> Path:
    """`--judges`, else `<model dir>/judges`; a preset or a directory without judges needs
    `--judges`, because scoring generated media is impossible without them."""
    if judges is not None:
        return Path(judges)
    candidate = model_directory(model) / "judges"
    if candidate.is_dir():
        return candidate
    raise UsageError(
        f"--judges: no judges for model {model!r} (no {candidate}); pass --judges DIR, a folder "
        "with <modality>_judge.safetensors and .json (a mini build's judges/ folder)"
    )


def load_judges(directory: Path) -> Any:
    """Every judge saved in `directory`; a missing one only skips its modality's generation."""
    from nextgpt.mini.judges import Judges

    present = tuple(m for m in MODALITIES if (directory / f"{m}_judge.json").is_file())
    if not present:
        raise UsageError(f"--judges: {directory} holds no <modality>_judge.json")
    return Judges.load(directory, present)


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="evaluate a model on the nextgpt-mini world")
    e.add_argument("--model", default=DEFAULT_MODEL, help="preset name or model directory")
    e.add_argument("--judges", default=None, help="judges folder (default: <model>/judges)")
    e.add_argument("--quick", action="store_true", help="a few items per cell (smoke test)")
    e.add_argument("--json", type=Path, default=None, help="write the raw results here")
    e.add_argument("--seed", type=int, default=0, help="evaluation seed (items and noise)")
    e.add_argument("--world-seed", type=int, default=0, help="world seed")
    e.add_argument("--steps", type=int, default=None, help="diffusion steps (decoder default)")
    e.add_argument("--guidance", type=float, default=None, help="classifier-free guidance")
    e.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    e.set_defaults(handler=_eval)


def _eval(args: argparse.Namespace) -> int:
    from nextgpt.cli import load_model

    directory = judges_dir(args.model, args.judges)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    judges = load_judges(directory)
    model = load_model(args.model)
    base = EvalSettings.quick() if args.quick else EvalSettings()
    settings = replace(
        base,
        seed=args.seed,
        world_seed=args.world_seed,
        steps=args.steps,
        guidance=args.guidance,
    )
    world = World(WorldConfig(seed=settings.world_seed))
    results = evaluate(model, judges, world, settings, progress=True)
    results["model"] = str(args.model)
    results["judges"] = str(directory)
    print(format_table(results), end="")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    return 0


__all__ = [
    "EvalSettings",
    "caption_scores",
    "evaluate",
    "format_table",
    "judged_scores",
    "produced_modalities",
    "register",
    "routing_correct",
]
