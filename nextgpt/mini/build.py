"""`nextgpt mini build`: rebuild nextgpt-mini from scratch, part by part, resumably.

A build is an ordered list of named parts. Each part writes into its own folder under the build
directory and is marked finished by an atomically written `done.json` (its metrics, its config
hash and time), written only after the part returned. A rerun skips every part whose `done.json`
carries the current config hash; any other part's folder is cleared and the part runs again, so an
interrupted part never leaves half an output that looks finished. A part's hash covers its own
settings, the world seed and its prerequisites' hashes, so a change reruns what depends on it.
The training stack is imported only when a build runs, so registering the command stays cheap.

    nextgpt mini build --out build/mini [--scale smoke|full] [--only PART]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextgpt.cli import UsageError

if TYPE_CHECKING:
    from nextgpt.mini.dialogues import DatasetSizes
    from nextgpt.mini.judges import JudgeTraining
    from nextgpt.mini.pretrain_image import ImageDecoderTraining
    from nextgpt.mini.world import World

DONE = "done.json"


@dataclass(frozen=True)
class DataScale:
    """Records per split: train feeds the three stages, held-out feeds evaluation."""

    train: DatasetSizes
    heldout: DatasetSizes


@dataclass(frozen=True)
class JudgeScale:
    training: JudgeTraining
    eval_samples: int  # fresh real samples per modality and split for the recorded accuracy


@dataclass(frozen=True)
class Scale:
    """Every part's sizes and steps at one scale."""

    name: str
    data: DataScale
    judges: JudgeScale
    image_decoder: ImageDecoderTraining


SCALE_NAMES = ("smoke", "full")


def scales() -> dict[str, Scale]:
    """Every scale's settings (a function, so that the CLI need not import the training stack)."""
    from nextgpt.mini.dialogues import KINDS, DatasetSizes
    from nextgpt.mini.judges import JudgeTraining
    from nextgpt.mini.pretrain_image import ImageDecoderTraining

    return {
        # seconds: proves every part runs end to end and writes what the next part reads
        "smoke": Scale(
            name="smoke",
            data=DataScale(
                train=DatasetSizes(2, 2, dict.fromkeys(KINDS, 1)),
                heldout=DatasetSizes(2, 2, dict.fromkeys(KINDS, 1)),
            ),
            judges=JudgeScale(JudgeTraining(samples=128, epochs=1, batch_size=32), eval_samples=32),
            image_decoder=ImageDecoderTraining(
                ae_steps=2,
                ae_batch=4,
                text_steps=2,
                text_batch=8,
                unet_steps=2,
                unet_batch=4,
                warmup=1,
                eval_every=0,
                eval_per_combo=1,
                eval_steps=2,
            ),
        ),
        # the budgets of docs/mini-design.md section 6
        "full": Scale(
            name="full",
            data=DataScale(
                train=DatasetSizes(3000, 3000, dict.fromkeys(KINDS, 1500)),
                heldout=DatasetSizes(300, 300, dict.fromkeys(KINDS, 100)),
            ),
            judges=JudgeScale(JudgeTraining(), eval_samples=1000),
            image_decoder=ImageDecoderTraining(),
        ),
    }


@dataclass
class Context:
    """What a running part sees: its own folder, the build's root, the scale, and a metrics dict
    that ends up in its `done.json`."""

    root: Path
    folder: Path
    scale: Scale
    world: World
    progress: bool
    metrics: dict[str, Any] = field(default_factory=dict)

    def part(self, name: str) -> Path:
        """The folder of another (finished) part."""
        return self.root / name


@dataclass(frozen=True)
class Part:
    name: str
    run: Callable[[Context], None]
    settings: Callable[[Scale], Any]  # the part's slice of the scale (hashed)
    needs: tuple[str, ...] = ()


def build_data(ctx: Context) -> None:
    from nextgpt.mini.dialogues import write_dataset

    for split in ("train", "heldout"):
        sizes = getattr(ctx.scale.data, split)
        manifest = write_dataset(ctx.world, ctx.folder / split, split, sizes, ctx.progress)
        ctx.metrics[split] = manifest["files"]


def build_judges(ctx: Context) -> None:
    from nextgpt.mini.judges import accuracy, train_judge
    from nextgpt.mini.world import MODALITIES

    s = ctx.scale.judges
    for modality in MODALITIES:
        judge = train_judge(ctx.world, modality, s.training, ctx.progress)
        judge.save(ctx.folder)
        ctx.metrics[modality] = {
            split: accuracy(
                judge, ctx.world.samples(modality, s.eval_samples, split, "build-judge-eval")
            )
            for split in ("train", "heldout")
        }


def build_image_decoder(ctx: Context) -> None:
    from nextgpt.mini.judges import Judges
    from nextgpt.mini.pretrain_image import pretrain_image_decoder

    judge = Judges.load(ctx.part("judges"), ("image",)).judges["image"]
    pipe, metrics = pretrain_image_decoder(ctx.world, judge, ctx.scale.image_decoder, ctx.progress)
    pipe.save_pretrained(str(ctx.folder / "pipeline"))
    ctx.metrics.update(metrics)


PARTS: tuple[Part, ...] = (
    Part("data", build_data, lambda s: s.data),
    Part("judges", build_judges, lambda s: s.judges),
    Part("image-decoder", build_image_decoder, lambda s: s.image_decoder, needs=("judges",)),
)
PART_NAMES = tuple(p.name for p in PARTS)


def config_hash(part: Part, scale: Scale, seed: int, hashes: dict[str, str]) -> str:
    """Hash of the part's settings, the world seed and its prerequisites' hashes."""
    payload = {
        "part": part.name,
        "seed": seed,
        "settings": asdict(part.settings(scale)),
        "needs": {n: hashes[n] for n in part.needs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def read_done(folder: Path) -> dict[str, Any] | None:
    path = folder / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write then rename: a crash leaves the old file or none, never half of one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def build(
    out: str | Path,
    scale: str = "smoke",
    only: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every unfinished part in order (or only `only`); returns each part's done record."""
    from tqdm import tqdm

    from nextgpt.mini.world import World, WorldConfig

    if scale not in SCALE_NAMES:
        raise UsageError(f"unknown --scale {scale!r}; use {', '.join(SCALE_NAMES)}")
    if only is not None and only not in PART_NAMES:
        raise UsageError(f"unknown part {only!r} for --only; use {', '.join(PART_NAMES)}")
    root = Path(out)
    settings = scales()[scale]
    hashes: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for part in PARTS:  # what is finished already, before anything runs
        hashes[part.name] = config_hash(part, settings, seed, hashes)
        done = read_done(root / part.name)
        if done is not None and done["config_hash"] == hashes[part.name]:
            records[part.name] = done
    todo = [p for p in PARTS if p.name not in records and only in (None, p.name)]
    planned = {p.name for p in todo}
    for part in todo:
        missing = [n for n in part.needs if n not in records and n not in planned]
        if missing:
            raise UsageError(f"part {part.name!r} needs {', '.join(missing)} built first")
    world = World(WorldConfig(seed=seed))
    for part in tqdm(todo, desc="mini build", unit="part", disable=not progress):
        folder = root / part.name
        if folder.exists():  # a stale or interrupted run: start the part clean
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        ctx = Context(root, folder, settings, world, progress)
        start = time.perf_counter()
        part.run(ctx)
        records[part.name] = {
            "part": part.name,
            "scale": scale,
            "config_hash": hashes[part.name],
            "seconds": round(time.perf_counter() - start, 1),
            "metrics": ctx.metrics,
        }
        write_json_atomic(folder / DONE, records[part.name])
    return records


def register(sub: argparse._SubParsersAction) -> None:
    mini = sub.add_parser("mini", help="nextgpt-mini: the miniature trained from scratch")
    commands = mini.add_subparsers(dest="mini_command", required=True)
    b = commands.add_parser("build", help="build nextgpt-mini part by part (resumable)")
    b.add_argument("--out", required=True, type=Path, help="build directory")
    b.add_argument("--scale", default="full", help=f"one of {', '.join(SCALE_NAMES)}")
    b.add_argument("--only", default=None, help=f"build one part: {', '.join(PART_NAMES)}")
    b.add_argument("--seed", type=int, default=0, help="world seed")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    records = build(args.out, args.scale, args.only, args.seed)
    for name, record in records.items():
        print(f"{name}: done in {record['seconds']} s -> {args.out / name}")
    return 0
