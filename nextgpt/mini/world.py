"""The miniature world: coloured shapes, tones and moving shapes, seeded and reproducible.

Everything nextgpt-mini learns comes from here. The world is deliberately small (a few values per
attribute, 32x32 pictures, 1 s of 16 kHz audio, 8-frame videos) because the whole model, its
diffusion decoders included, is trained from scratch on 2 CPU cores in about two hours, and the
measured calibration (docs/mini-design.md) says that tiny diffusion models bind shape and size
quickly but colour and position slowly. So the attributes are few and visually (or spectrally)
far apart, position is a nuisance rather than an attribute, and motion always crosses the frame.

A `World` has one attribute space per modality, a small caption grammar, and train / held-out
splits: some whole combinations (e.g. a large yellow circle) never occur in training, though
each of their pairs of values does, so that evaluation can measure generalisation to unseen
combinations. Media are plain in-memory values that the rest of
the package already accepts: a PIL image, `(waveform, sample_rate)` and `(uint8 frames, fps)`.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

MODALITIES = ("image", "audio", "video")
SPLITS = ("train", "heldout", "all")


@dataclass(frozen=True)
class Attribute:
    """One attribute of a modality: its values, and the phrase each value has in captions.

    Phrases are unique across the whole world, so a caption can be parsed back into attributes.
    """

    name: str
    values: tuple[str, ...]
    phrases: tuple[str, ...] = ()

    def phrase(self, value: str) -> str:
        return self.phrases[self.values.index(value)] if self.phrases else value


ATTRIBUTES: dict[str, tuple[Attribute, ...]] = {
    "image": (
        Attribute("shape", ("circle", "square", "triangle")),
        Attribute("colour", ("red", "green", "blue", "yellow")),
        Attribute("size", ("small", "large")),
    ),
    "audio": (
        Attribute("pitch", ("low", "medium", "high")),
        Attribute("timbre", ("pure", "hollow", "buzzy")),
        Attribute(
            "rhythm",
            ("steady", "double", "rapid"),
            ("held steady", "beeping twice", "pulsing fast"),
        ),
    ),
    "video": (
        Attribute("shape", ("circle", "square", "triangle")),
        Attribute("colour", ("red", "green", "blue", "yellow")),
        Attribute("direction", ("left", "right", "up", "down")),
    ),
}

# Caption grammar: every template is a noun phrase, so a caption fits "Here is ...", "a picture
# of ..." and "It shows ...". The first template of each modality is the canonical caption, which
# the diffusion decoders are conditioned on (one wording per medium keeps the stage-2 regression
# target unambiguous); the others vary the wording of what the LLM reads and writes.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "image": (
        "a {size} {colour} {shape}",
        "a {size} {shape} in {colour}",
        "a {colour} {shape} of {size} size",
    ),
    "audio": (
        "a {pitch} {timbre} tone {rhythm}",
        "a {timbre} sound of {pitch} pitch, {rhythm}",
        "a {timbre} tone at {pitch} pitch, {rhythm}",
    ),
    "video": (
        "a {colour} {shape} moving {direction}",
        "a {shape} in {colour} moving {direction}",
        "a {colour} {shape} that moves {direction}",
    ),
}

# Well-separated colours (RGB) on a fixed dark background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 210, 50),
}
BACKGROUND = (20, 20, 28)
# Pitches 2.4-2.5x apart (several mel bins), each a whole multiple of the decoders' 100 Hz mel
# frame rate: a frame-local vocoder fed the identical mel frames of a steady tone can only repeat
# itself every 10 ms hop, so its partials lie on the 100 Hz grid; off the grid (1250 Hz, or any
# pitch jitter) it draws a comb of 100 Hz partials instead of one sine (docs/mini-design.md).
PITCH_HZ = {"low": 200.0, "medium": 500.0, "high": 1200.0}
# Tone on-spans (s) per rhythm, before a common random shift.
RHYTHM_SPANS: dict[str, tuple[tuple[float, float], ...]] = {
    "steady": ((0.06, 0.90),),
    "double": ((0.08, 0.38), (0.56, 0.86)),
    "rapid": tuple((0.06 + 0.18 * k, 0.15 + 0.18 * k) for k in range(5)),
}
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


@dataclass(frozen=True)
class WorldConfig:
    """Sizes of the media and the held-out attribute combinations.

    Sizes match the miniature's decoders and encoder (nextgpt.config tiny_config): 32x32 images,
    8-frame 32x32 videos, 1 s of 16 kHz audio. A combination is held out when it contains every
    (attribute, value) of one `held_out` rule. The shipped rules are whole combinations (triples)
    chosen so that every *pair* of values in each of them still occurs in training: what is new is
    the combination, as "a large yellow circle" is new to a model that has seen small yellow
    circles and large yellow squares. (Until session 14 the rules held out pairs, "yellow circle"
    in every size; at this scale no part of the model composed a pair it had never seen, in any
    variant measured over 13 sessions: docs/mini-design.md section 8.) Images hold out one size of
    6 of the 12 shape-colour pairs; videos one direction of each shape-colour pair and audio one
    rhythm of each pitch-timbre pair (Latin squares). Every spectrum (pitch x timbre) then still
    occurs in training, so the frame-local vocoder and mel autoencoder need not extrapolate to new
    spectra (a calibration showed a tiny vocoder failing on held-out spectra).
    """

    seed: int = 0
    image_size: int = 32
    supersample: int = 4  # shapes are drawn this much larger, then box-filtered (anti-aliasing)
    video_frames: int = 8
    video_fps: float = 8.0
    sample_rate: int = 16000
    audio_seconds: float = 1.0
    held_out: tuple[tuple[tuple[str, str], ...], ...] = (
        # images: 6 of 12 shape-colour pairs lose one size (no shape-size or colour-size pair
        # loses more than one of its partners)
        (("shape", "circle"), ("colour", "yellow"), ("size", "large")),
        (("shape", "circle"), ("colour", "red"), ("size", "small")),
        (("shape", "square"), ("colour", "blue"), ("size", "large")),
        (("shape", "square"), ("colour", "green"), ("size", "small")),
        (("shape", "triangle"), ("colour", "red"), ("size", "large")),
        (("shape", "triangle"), ("colour", "yellow"), ("size", "small")),
        # videos: direction = (shape + colour) mod 4, one per shape-colour pair
        (("shape", "circle"), ("colour", "red"), ("direction", "left")),
        (("shape", "circle"), ("colour", "green"), ("direction", "right")),
        (("shape", "circle"), ("colour", "blue"), ("direction", "up")),
        (("shape", "circle"), ("colour", "yellow"), ("direction", "down")),
        (("shape", "square"), ("colour", "red"), ("direction", "right")),
        (("shape", "square"), ("colour", "green"), ("direction", "up")),
        (("shape", "square"), ("colour", "blue"), ("direction", "down")),
        (("shape", "square"), ("colour", "yellow"), ("direction", "left")),
        (("shape", "triangle"), ("colour", "red"), ("direction", "up")),
        (("shape", "triangle"), ("colour", "green"), ("direction", "down")),
        (("shape", "triangle"), ("colour", "blue"), ("direction", "left")),
        (("shape", "triangle"), ("colour", "yellow"), ("direction", "right")),
        # audio: rhythm = (pitch + timbre) mod 3, one per pitch-timbre pair
        (("pitch", "low"), ("timbre", "pure"), ("rhythm", "steady")),
        (("pitch", "low"), ("timbre", "hollow"), ("rhythm", "double")),
        (("pitch", "low"), ("timbre", "buzzy"), ("rhythm", "rapid")),
        (("pitch", "medium"), ("timbre", "pure"), ("rhythm", "double")),
        (("pitch", "medium"), ("timbre", "hollow"), ("rhythm", "rapid")),
        (("pitch", "medium"), ("timbre", "buzzy"), ("rhythm", "steady")),
        (("pitch", "high"), ("timbre", "pure"), ("rhythm", "rapid")),
        (("pitch", "high"), ("timbre", "hollow"), ("rhythm", "steady")),
        (("pitch", "high"), ("timbre", "buzzy"), ("rhythm", "double")),
    )


@dataclass
class Sample:
    """One medium of the world with the attributes that made it and a caption that names them.

    `media` is a PIL image (image), `(float32 waveform, sample_rate)` (audio) or
    `(uint8 frames (T, H, W, 3), fps)` (video).
    """

    modality: str
    attributes: dict[str, str]
    caption: str
    media: Any = field(repr=False)


def combination_key(attributes: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """A combination as a hashable key, the same whatever order its attributes were listed in
    (to index per-combination tables: caption encodings, class ids)."""
    return tuple(sorted(attributes.items()))


def stable_key(key: str | int) -> int:
    """An integer for a seed sequence; Python's `hash` of a str changes between processes."""
    return key if isinstance(key, int) else zlib.crc32(key.encode())


class World:
    """The seeded world: attribute spaces, splits, rendering and captions."""

    def __init__(self, config: WorldConfig | None = None) -> None:
        self.config = config or WorldConfig()
        known = {(a.name, v) for attrs in ATTRIBUTES.values() for a in attrs for v in a.values}
        for rule in self.config.held_out:
            unknown = [pair for pair in rule if pair not in known]
            if unknown:
                raise ValueError(f"held-out rule {rule}: unknown attribute values {unknown}")
        self._phrases = {m: _phrase_patterns(m) for m in MODALITIES}

    @property
    def seed(self) -> int:
        return self.config.seed

    # ---- attribute spaces and splits -----------------------------------------------------
    @staticmethod
    def attributes(modality: str) -> tuple[Attribute, ...]:
        if modality not in ATTRIBUTES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
        return ATTRIBUTES[modality]

    def attribute(self, modality: str, name: str) -> Attribute:
        for a in self.attributes(modality):
            if a.name == name:
                return a
        raise ValueError(f"{modality} has no attribute {name!r}")

    def is_held_out(self, attributes: dict[str, str]) -> bool:
        return any(
            all(attributes.get(name) == value for name, value in rule)
            for rule in self.config.held_out
        )

    def combinations(self, modality: str, split: str = "all") -> list[dict[str, str]]:
        """Every attribute combination of `modality` in `split`, in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        attrs = self.attributes(modality)
        combos = [
            dict(zip([a.name for a in attrs], values))
            for values in itertools.product(*(a.values for a in attrs))
        ]
        if split == "all":
            return combos
        return [c for c in combos if self.is_held_out(c) == (split == "heldout")]

    def in_split(self, attributes: dict[str, str], split: str) -> bool:
        return split == "all" or self.is_held_out(attributes) == (split == "heldout")

    # ---- randomness ----------------------------------------------------------------------
    def rng(self, *keys: str | int) -> np.random.Generator:
        """An independent generator for a named stream, e.g. `rng("judge", "image", 3)`: the same
        world seed and keys always give the same draws, in any process."""
        return np.random.default_rng([self.seed, *(stable_key(k) for k in keys)])

    # ---- sampling ------------------------------------------------------------------------
    def sample(self, modality: str, rng: np.random.Generator, split: str = "train") -> Sample:
        """A random combination of `split`, rendered with random nuisances, with a caption in a
        random template."""
        return self.make(modality, self.pick(modality, rng, split), rng)

    def pick(self, modality: str, rng: np.random.Generator, split: str = "train") -> dict[str, str]:
        """A random combination of `split`; a clear error where the held-out rules leave the
        split empty (e.g. `held_out=()` has no held-out combinations to draw)."""
        combos = self.combinations(modality, split)
        if not combos:
            rules = [dict(rule) for rule in self.config.held_out]
            raise ValueError(
                f"no {modality} combination is in split {split!r} under held_out={rules}"
            )
        return combos[int(rng.integers(len(combos)))]

    def make(self, modality: str, attributes: dict[str, str], rng: np.random.Generator) -> Sample:
        """A sample with the given attributes (nuisances and caption wording from `rng`)."""
        media = self.render(modality, attributes, rng)
        return Sample(modality, dict(attributes), self.caption(modality, attributes, rng), media)

    def samples(self, modality: str, count: int, split: str, *keys: str | int) -> list[Sample]:
        """`count` samples from the stream named by `keys` (reproducible from the world seed)."""
        rng = self.rng("samples", modality, split, *keys)
        return [self.sample(modality, rng, split) for _ in range(count)]

    def render(self, modality: str, attributes: dict[str, str], rng: np.random.Generator) -> Any:
        """The medium for `attributes`; position, size, colour shade, phase and timing jitter come
        from `rng` so that no two samples are the same picture or sound."""
        names = [a.name for a in self.attributes(modality)]
        if sorted(attributes) != sorted(names):
            raise ValueError(f"{modality} attributes {sorted(attributes)}: expected {names}")
        for a in self.attributes(modality):
            if attributes[a.name] not in a.values:
                raise ValueError(f"{a.name}={attributes[a.name]!r}: expected one of {a.values}")
        if modality == "image":
            return self._image(attributes, rng)
        if modality == "audio":
            return self._audio(attributes, rng)
        return self._video(attributes, rng)

    # ---- captions ------------------------------------------------------------------------
    def caption(
        self, modality: str, attributes: dict[str, str], rng: np.random.Generator | None = None
    ) -> str:
        """A caption naming every attribute: canonical without `rng`, else a random template."""
        templates = TEMPLATES[modality]
        template = templates[0] if rng is None else templates[int(rng.integers(len(templates)))]
        words = {a.name: a.phrase(attributes[a.name]) for a in self.attributes(modality)}
        return template.format(**words)

    def parse_caption(self, modality: str, text: str) -> dict[str, str | None]:
        """Attributes named in free text: a value when exactly one value of an attribute is
        mentioned (whole words, any case), else None. Used to score generated captions."""
        found: dict[str, str | None] = {}
        for name, patterns in self._phrases[modality].items():
            hits = {value for value, pattern in patterns if pattern.search(text)}
            found[name] = hits.pop() if len(hits) == 1 else None
        return found

    # ---- rendering -----------------------------------------------------------------------
    def _shade(self, colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
        jitter = rng.integers(-12, 13, size=3)
        return tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))

    def _draw(
        self,
        shape: str,
        fill: tuple[int, int, int],
        center: tuple[float, float],
        radius: float,
    ) -> Image.Image:
        """One frame: `shape` of half-extent `radius` at `center` (pixels of the final size)."""
        s, k = self.config.image_size, self.config.supersample
        canvas = Image.new("RGB", (s * k, s * k), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        cx, cy, r = center[0] * k, center[1] * k, radius * k
        if shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif shape == "square":
            h = 0.88 * r  # about the circle's area
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # an upright triangle filling the box
            draw.polygon(((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)), fill=fill)
        return canvas.resize((s, s), Image.Resampling.BOX)

    def _image(self, attributes: dict[str, str], rng: np.random.Generator) -> Image.Image:
        s = self.config.image_size
        radius = (0.19 if attributes["size"] == "small" else 0.34) * s * rng.uniform(0.92, 1.08)
        center = s / 2 + rng.uniform(-0.1 * s, 0.1 * s, size=2)
        fill = self._shade(attributes["colour"], rng)
        return self._draw(attributes["shape"], fill, (center[0], center[1]), radius)

    def _video(
        self, attributes: dict[str, str], rng: np.random.Generator
    ) -> tuple[np.ndarray, float]:
        """The shape crosses the frame (centre -22% to +22%) in its direction: motion is the
        largest change a 32x32 video can show, which makes direction easy to see and to learn."""
        s, t = self.config.image_size, self.config.video_frames
        radius = 0.22 * s * rng.uniform(0.92, 1.08)
        fill = self._shade(attributes["colour"], rng)
        dx, dy = DIRECTIONS[attributes["direction"]]
        along = np.linspace(-0.22 * s, 0.22 * s, t) + rng.uniform(-0.06 * s, 0.06 * s)
        across = rng.uniform(-0.12 * s, 0.12 * s)
        frames = []
        for a in along:
            x = s / 2 + a * dx + across * dy
            y = s / 2 + a * dy + across * dx
            frames.append(np.asarray(self._draw(attributes["shape"], fill, (x, y), radius)))
        return np.stack(frames), self.config.video_fps

    def _audio(
        self, attributes: dict[str, str], rng: np.random.Generator
    ) -> tuple[np.ndarray, int]:
        """Additive synthesis: pure = the fundamental, hollow = odd harmonics (a square wave),
        buzzy = every harmonic (a sawtooth), each at 1/n and below 7 kHz; rhythm gates the tone
        with 8 ms ramps. A faint noise floor keeps silent frames' log-mel finite and natural."""
        rate = self.config.sample_rate
        n = int(round(rate * self.config.audio_seconds))
        t = np.arange(n) / rate
        f0 = PITCH_HZ[attributes["pitch"]]
        top = int(7000 // f0)
        harmonics = {
            "pure": [1],
            "hollow": list(range(1, top + 1, 2)),
            "buzzy": list(range(1, top + 1)),
        }[attributes["timbre"]]
        phases = rng.uniform(0, 2 * np.pi, size=len(harmonics))
        tone = sum(np.sin(2 * np.pi * h * f0 * t + p) / h for h, p in zip(harmonics, phases))
        tone = tone / np.abs(tone).max()
        shift = rng.uniform(-0.04, 0.04)
        envelope = np.zeros(n)
        ramp = 0.008
        for start, end in RHYTHM_SPANS[attributes["rhythm"]]:
            a, b = start + shift, end + shift
            envelope = np.maximum(envelope, np.clip(np.minimum(t - a, b - t) / ramp, 0.0, 1.0))
        wave = rng.uniform(0.3, 0.6) * envelope * tone + rng.normal(0.0, 0.002, size=n)
        return wave.astype(np.float32), rate


def caption_words(modality: str) -> tuple[str, ...]:
    """Every word a caption of `modality` can hold, in any template, sorted. Each word of a
    held-out combination's caption also occurs in train captions (only combinations are held
    out), so a tokenizer built on these words learns nothing about the held-out split."""
    words: set[str] = set()
    attributes = ATTRIBUTES[modality]
    for template in TEMPLATES[modality]:
        filled = template.format(**{a.name: " ".join(map(a.phrase, a.values)) for a in attributes})
        words.update(re.findall(r"[a-z]+", filled.lower()))
    return tuple(sorted(words))


def _phrase_patterns(modality: str) -> dict[str, list[tuple[str, re.Pattern[str]]]]:
    return {
        a.name: [(v, re.compile(rf"\b{re.escape(a.phrase(v))}\b", re.IGNORECASE)) for v in a.values]
        for a in ATTRIBUTES[modality]
    }
