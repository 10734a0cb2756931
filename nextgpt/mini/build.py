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
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nextgpt.cli import UsageError

if TYPE_CHECKING:
    from nextgpt.mini.dialogues import DatasetSizes
    from nextgpt.mini.evaluate import EvalSettings
    from nextgpt.mini.judges import JudgeTraining
    from nextgpt.mini.pretrain_audio import AudioDecoderTraining
    from nextgpt.mini.pretrain_encoder import EncoderTraining
    from nextgpt.mini.pretrain_image import ImageDecoderTraining
    from nextgpt.mini.pretrain_llm import LLMTraining
    from nextgpt.mini.pretrain_video import VideoDecoderTraining
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
class StageScale:
    """`--key value` overrides applied over a stage's shipped YAML (none at full scale: the YAML
    is the recipe)."""

    overrides: tuple[str, ...] = ()


SMOKE_STAGE = StageScale(
    ("--max_steps", "2", "--batch_size", "2", "--log_every", "1", "--tensorboard", "false")
)


@dataclass(frozen=True)
class Scale:
    """Every part's sizes and steps at one scale."""

    name: str
    data: DataScale
    judges: JudgeScale
    image_decoder: ImageDecoderTraining
    video_decoder: VideoDecoderTraining
    audio_decoder: AudioDecoderTraining
    encoder: EncoderTraining
    llm: LLMTraining
    stage: StageScale
    eval: EvalSettings


SCALE_NAMES = ("smoke", "full")


def scales() -> dict[str, Scale]:
    """Every scale's settings (a function, so that the CLI need not import the training stack)."""
    from nextgpt.mini.dialogues import KINDS, DatasetSizes
    from nextgpt.mini.evaluate import EvalSettings
    from nextgpt.mini.judges import JudgeTraining
    from nextgpt.mini.pretrain_audio import AudioDecoderTraining
    from nextgpt.mini.pretrain_encoder import EncoderTraining
    from nextgpt.mini.pretrain_image import ImageDecoderTraining
    from nextgpt.mini.pretrain_llm import LLMTraining
    from nextgpt.mini.pretrain_video import VideoDecoderTraining

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
            video_decoder=VideoDecoderTraining.smoke(),
            audio_decoder=AudioDecoderTraining.smoke(),
            encoder=EncoderTraining.smoke(),
            llm=LLMTraining.smoke(),
            stage=SMOKE_STAGE,
            eval=EvalSettings.quick(steps=2),
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
            video_decoder=VideoDecoderTraining(),
            audio_decoder=AudioDecoderTraining(),
            encoder=EncoderTraining(),
            llm=LLMTraining(),
            stage=StageScale(),
            eval=EvalSettings(),
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


def decoder_front_part(modality: str) -> Callable[[Context], None]:
    """The run of the `<modality>-decoder-front` part: the decoder's phases before its UNet
    (`pretrain_<modality>_front`: autoencoder, vocoder for audio, text encoder), saved in
    diffusers' layout under `pipeline/` with its UNet still untrained, and the torch RNG state
    the UNet phase continues from. Stages 2 and 3 need only the text encoder, so they start
    from this part and train while the UNets do."""

    def run(ctx: Context) -> None:
        from safetensors.torch import save_file

        module = importlib.import_module(f"nextgpt.mini.pretrain_{modality}")
        front = getattr(module, f"pretrain_{modality}_front")
        settings = getattr(ctx.scale, f"{modality}_decoder")
        pipe, metrics, rng_state = front(ctx.world, _judge(ctx, modality), settings, ctx.progress)
        pipe.save_pretrained(str(ctx.folder / "pipeline"))
        save_file({"rng_state": rng_state}, str(ctx.folder / RNG_FILE))
        ctx.metrics.update(metrics)

    return run


def decoder_part(modality: str) -> Callable[[Context], None]:
    """The run of the `<modality>-decoder` part: `pretrain_<modality>_unet` on the front part's
    pipeline, from its RNG state (the same weights as all phases in one process), judged by that
    modality's judge, saved in diffusers' layout under `pipeline/`. Its record carries the front
    part's metrics too, so one `done.json` describes the whole decoder."""

    def run(ctx: Context) -> None:
        from safetensors.torch import load_file

        from nextgpt.decoders import DECODERS

        module = importlib.import_module(f"nextgpt.mini.pretrain_{modality}")
        unet = getattr(module, f"pretrain_{modality}_unet")
        settings = getattr(ctx.scale, f"{modality}_decoder")
        front = ctx.part(front_part_name(modality))
        pipe = DECODERS[modality].pipeline_class.from_pretrained(str(front / "pipeline"))
        pipe.set_progress_bar_config(disable=True)
        rng_state = load_file(str(front / RNG_FILE))["rng_state"]
        metrics = unet(pipe, ctx.world, _judge(ctx, modality), settings, rng_state, ctx.progress)
        pipe.save_pretrained(str(ctx.folder / "pipeline"))
        front_record = read_done(front)
        if front_record is None:  # the builder starts this part only after its front
            raise FileNotFoundError(f"{front / DONE}: the {modality} decoder's front is not done")
        ctx.metrics.update(front_record["metrics"])
        ctx.metrics.update(metrics)

    return run


def _judge(ctx: Context, modality: str) -> Any:
    from nextgpt.mini.judges import Judges

    return Judges.load(ctx.part("judges"), (modality,)).judges[modality]


def front_part_name(modality: str) -> str:
    return f"{modality}-decoder-front"


def build_encoder(ctx: Context) -> None:
    from nextgpt.mini.pretrain_encoder import pretrain_encoder

    encoder, metrics = pretrain_encoder(ctx.world, ctx.scale.encoder, ctx.progress)
    encoder.save(ctx.folder / ENCODER_FILE)
    ctx.metrics.update(metrics)


def build_llm(ctx: Context) -> None:
    from nextgpt.mini.pretrain_llm import pretrain_llm

    model, tokenizer, metrics = pretrain_llm(
        ctx.world, ctx.part("data") / "train", ctx.scale.llm, ctx.progress
    )
    model.save_pretrained(str(ctx.folder / LLM_DIR))
    tokenizer.save_pretrained(str(ctx.folder / LLM_DIR))
    ctx.metrics.update(metrics)


def stage_yaml(number: int) -> Path:
    """The shipped training config of a stage: the recipe the build and `nextgpt train` share."""
    return Path(__file__).resolve().parent.parent / "configs" / "train" / f"mini-stage{number}.yaml"


def write_model_yaml(ctx: Context, projector: str) -> Path:
    """The miniature's model config, pointing at this build's pretrained parts (absolute paths:
    later stages and the packaging read it from other folders)."""
    from nextgpt.mini.assemble import mini_config
    from nextgpt.mini.pretrain_encoder import mini_encoder_config

    s = ctx.scale
    encoder = dataclasses.replace(
        mini_encoder_config(), pretrained=str((ctx.part("encoder") / ENCODER_FILE).resolve())
    )
    arches = {"image": s.image_decoder.arch, "audio": s.audio_decoder.arch}
    arches["video"] = s.video_decoder.arch
    # the fronts: the stages read only the text encoders, and the package swaps in the decoders
    decoders = {
        m: (str((ctx.part(front_part_name(m)) / "pipeline").resolve()), arch)
        for m, arch in arches.items()
    }
    llm = str((ctx.part("llm") / LLM_DIR).resolve())
    path = ctx.folder / "model.yaml"
    mini_config(encoder, llm, decoders, projector).to_yaml(path)
    return path


def train_stage(ctx: Context, number: int, model: Path) -> None:
    """Run `nextgpt train` on the stage's shipped YAML, with this build's paths and the scale's
    overrides; the run goes to `<part>/run`."""
    import yaml

    from nextgpt.training.config import TrainConfig
    from nextgpt.training.trainer import train

    recipe = stage_yaml(number)
    data = yaml.safe_load(recipe.read_text())["data"]
    for key in ("train", "eval"):  # the recipe's paths are relative to build/mini
        for source in data.get(key, ()):
            source["path"] = str(ctx.root / Path(source["path"]).relative_to("build/mini"))
    overrides = ["--model", str(model), "--out_dir", str(ctx.folder / "run")]
    overrides += ["--data", json.dumps(data), "--progress", str(ctx.progress).lower()]
    result = train(TrainConfig.load(recipe, overrides + list(ctx.scale.stage.overrides)))
    ctx.metrics["first_loss"] = result.history[0] if result.history else None
    ctx.metrics["last_loss"] = result.history[-1] if result.history else None
    ctx.metrics["evals"] = result.evals
    ctx.metrics["checkpoint"] = str(result.checkpoint)


def build_stage1(ctx: Context) -> None:
    """Stage 1 of the shipped model, with its input projector (`MINI_PROJECTOR`)."""
    train_stage(ctx, 1, write_model_yaml(ctx, MINI_PROJECTOR))


def build_stage1_ablation(ctx: Context) -> None:
    """The ablation: stage 1 with the other input projector at the same budget."""
    train_stage(ctx, 1, write_model_yaml(ctx, ABLATION_PROJECTOR))


def build_stage2(ctx: Context) -> None:
    train_stage(ctx, 2, ctx.part("stage1") / "run")


def build_stage3(ctx: Context) -> None:
    train_stage(ctx, 3, ctx.part("stage2") / "run")


def build_package(ctx: Context) -> None:
    from nextgpt.mini.assemble import MINI_NAME, package_model

    decoders = {m: ctx.part(f"{m}-decoder") / "pipeline" for m in FRONT_ORDER}
    for m, pipeline in decoders.items():  # what the stages aligned to is what the decoder reads
        same_text_encoder(ctx.part(front_part_name(m)) / "pipeline", pipeline)
    sizes = package_model(
        ctx.part("stage3") / "run", ctx.part("judges"), ctx.folder / MINI_NAME, decoders=decoders
    )
    ctx.metrics["megabytes"] = sizes
    ctx.metrics["total_megabytes"] = round(sum(sizes.values()), 2)


def same_text_encoder(front: Path, final: Path) -> None:
    """Raise unless two pipeline folders hold the same text encoder weights, tensor for tensor."""
    from safetensors.torch import load_file

    def weights(pipeline: Path) -> dict[str, Any]:
        files = sorted((pipeline / "text_encoder").glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no text encoder weights in {pipeline / 'text_encoder'}")
        return {k: v for f in files for k, v in load_file(str(f)).items()}

    a, b = weights(front), weights(final)
    differ = sorted(
        k for k in a.keys() | b.keys() if k not in a or k not in b or not a[k].equal(b[k])
    )
    if differ:
        raise ValueError(
            f"the text encoder of {final} is not the one the stages aligned to ({front}): "
            f"{len(differ)} tensors differ, first {differ[0]}"
        )


def build_eval(ctx: Context) -> None:
    """`nextgpt eval` on the packaged model (what ships, in float16), and the ablation: stage 1
    with the grouping and with the linear input projector, on captions, at the same budget."""
    from nextgpt.mini.assemble import MINI_NAME
    from nextgpt.mini.evaluate import evaluate, format_table, load_judges
    from nextgpt.model import NextGPT

    package = ctx.part("package") / MINI_NAME
    judges = load_judges(package / "judges")
    settings = ctx.scale.eval
    results = evaluate(NextGPT.from_pretrained(package), judges, ctx.world, settings, ctx.progress)
    tables = ["## nextgpt-mini (packaged, float16)\n", format_table(results)]
    understanding = dataclasses.replace(settings, routing=0, generations=0, ceiling=False)
    ablation = {}
    for kind, name in ((MINI_PROJECTOR, "stage1"), (ABLATION_PROJECTOR, ABLATION_PART)):
        model = NextGPT.from_pretrained(ctx.part(name) / "run")
        ablation[kind] = evaluate(model, None, ctx.world, understanding, ctx.progress)
    tables += ["\n## ablation: input projector after stage 1, same budget\n\n"]
    tables += [ablation_table(ablation["grouping"], ablation["linear"])]
    (ctx.folder / "eval.md").write_text("".join(tables))
    # every item (prompt, answer, judged scores) goes to the JSON files, to diagnose a figure
    # without asking again; done.json keeps the tables' figures only
    (ctx.folder / "results.json").write_text(json.dumps(results, indent=1))
    (ctx.folder / "ablation.json").write_text(json.dumps(ablation, indent=1))
    for record in (results, *ablation.values()):
        record.pop("items", None)
    ctx.metrics.update(results=results, ablation=ablation)


def ablation_table(grouping: dict[str, Any], linear: dict[str, Any]) -> str:
    """Caption accuracy of the two stage-1 models side by side, chance beside every row."""
    lines = [
        "| modality | attribute | grouping train | linear train | grouping held-out "
        "| linear held-out | chance |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for modality, rows in grouping["caption"].items():
        for attribute, row in rows.items():
            other = linear["caption"][modality][attribute]
            cells = [row["train"], other["train"], row["heldout"], other["heldout"], row["chance"]]
            text = " | ".join("-" if c is None else f"{c:.2f}" for c in cells)
            lines.append(f"| {modality} | {attribute} | {text} |")
    return "\n".join(lines) + "\n"


def _stage_settings(number: int, projector: str = "") -> Callable[[Scale], Any]:
    """A stage's hashed settings: the scale's overrides, the recipe's parsed values (not its text,
    so a reworded comment does not retrain a stage), the decoder architectures and output
    projectors recorded in the model config and (stage 1) the input projector."""

    def settings(s: Scale) -> dict[str, Any]:
        import yaml

        from nextgpt.mini.assemble import mini_input_projector, mini_output_projector

        arches = [s.image_decoder.arch, s.audio_decoder.arch, s.video_decoder.arch]
        with stage_yaml(number).open() as stream:  # a YAML error then names the file
            recipe = yaml.safe_load(stream)
        return {
            "stage": s.stage,
            "recipe": recipe,
            "arches": arches,
            "projector": mini_input_projector(projector) if projector else None,
            "output_projector": mini_output_projector(),
        }

    return settings


def _decoder_settings(modality: str) -> Callable[[Scale], Any]:
    """A decoder's training settings, hashed by both of its parts."""
    return lambda s: getattr(s, f"{modality}_decoder")


ENCODER_FILE = "encoder.safetensors"
RNG_FILE = "rng_state.safetensors"
LLM_DIR = "model"
# The shipped model's input projector, and the one the ablation trains beside it. The paper's
# grouping projector with hard assignment did not learn in stage 1 here (the loss flat, captions at
# chance); with soft assignment it does (`assemble.mini_input_projector`, docs/mini-design.md
# section 8). The shipped model was built with the linear one.
MINI_PROJECTOR = "linear"
ABLATION_PROJECTOR = "grouping"
ABLATION_PART = f"stage1-{ABLATION_PROJECTOR}"
STAGE1_NEEDS = ("data", "encoder", "llm")
# The order the decoders' fronts start in (session 21's timed build): the short image and video
# fronts, then the audio one with its vocoder. The UNets below start longest first.
FRONT_ORDER = ("image", "video", "audio")
FRONTS = tuple(front_part_name(m) for m in FRONT_ORDER)
DECODER_PARTS = tuple(f"{m}-decoder" for m in FRONT_ORDER)

# Listed in the order `build_parallel` prefers among parts that are ready: first what leads to
# the chain of stages (the decoders' fronts, the encoder, the LLM, stage 1, then stages 2 and 3),
# then the UNets, longest first, beside that chain, and the ablation last, to fill a gap. The
# stages read only the decoders' text encoders, from the fronts; the package takes the finished
# decoders.
PARTS: tuple[Part, ...] = (
    Part("data", build_data, lambda s: s.data),
    Part("judges", build_judges, lambda s: s.judges),
    Part("encoder", build_encoder, lambda s: s.encoder),
    *(
        Part(front_part_name(m), decoder_front_part(m), _decoder_settings(m), needs=("judges",))
        for m in FRONT_ORDER
    ),
    Part("llm", build_llm, lambda s: s.llm, needs=("data",)),
    Part("stage1", build_stage1, _stage_settings(1, MINI_PROJECTOR), STAGE1_NEEDS),
    Part("stage2", build_stage2, _stage_settings(2), needs=("stage1", *FRONTS)),
    Part("stage3", build_stage3, _stage_settings(3), needs=("stage2",)),
    *(
        Part(f"{m}-decoder", decoder_part(m), _decoder_settings(m), needs=(front_part_name(m),))
        for m in ("audio", "video", "image")
    ),
    Part(
        ABLATION_PART, build_stage1_ablation, _stage_settings(1, ABLATION_PROJECTOR), STAGE1_NEEDS
    ),
    Part("package", build_package, lambda s: {}, needs=("stage3", "judges", *DECODER_PARTS)),
    Part("eval", build_eval, lambda s: s.eval, needs=("package", "stage1", ABLATION_PART)),
)
PART_NAMES = tuple(p.name for p in PARTS)


def config_hash(part: Part, scale: Scale, seed: int, hashes: dict[str, str]) -> str:
    """Hash of the part's settings, the world's whole config (a changed rendering default must
    rebuild what was trained on the old world) and its prerequisites' hashes."""
    from nextgpt.mini.world import WorldConfig

    payload = {
        "part": part.name,
        "seed": seed,
        "world": WorldConfig(seed=seed),
        "settings": part.settings(scale),
        "needs": {n: hashes[n] for n in part.needs},
    }
    text = json.dumps(payload, sort_keys=True, default=_plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _plain(value: Any) -> Any:
    """JSON form of the settings' dataclasses."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"cannot hash settings of type {type(value).__name__}")


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
        with part_lock(root, part.name):
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


@contextlib.contextmanager
def part_lock(root: Path, name: str) -> Iterator[None]:
    """Hold `<root>/logs/<part>.lock` while a part runs, so that a second build of the same
    directory (another `--only` process, say) cannot delete a part that is being built. A lock
    whose process is gone is stale and taken over."""
    lock = root / "logs" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                raise UsageError(
                    f"part {name!r} of {root} is being built by process {pid}; wait for it, or "
                    f"delete {lock} if that process is not a build"
                ) from None
            lock.unlink(missing_ok=True)
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def build_parallel(
    out: str | Path, scale: str = "full", seed: int = 0, jobs: int = 2
) -> dict[str, dict[str, Any]]:
    """Run the unfinished parts in up to `jobs` worker processes, each with one torch thread
    (or all `jobs` threads when a part can only run alone, like the chain of stages at the end).

    On 2 cores two 1-thread parts side by side do about 1.33x the work of one 2-thread part
    (docs/mini-design.md 5D). A part starts as soon as its prerequisites are done, in the order of
    `PARTS`. Each worker is `nextgpt mini build --only PART`, so resuming works as for a serial
    build; its output goes to `<out>/logs/<part>.log`. A failed part stops the build once the
    running parts end, with the tail of its log.
    """
    if scale not in SCALE_NAMES:
        raise UsageError(f"unknown --scale {scale!r}; use {', '.join(SCALE_NAMES)}")
    root = Path(out)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    settings = scales()[scale]
    hashes: dict[str, str] = {}
    records: dict[str, dict[str, Any]] = {}
    for part in PARTS:
        hashes[part.name] = config_hash(part, settings, seed, hashes)
        done = read_done(root / part.name)
        if done is not None and done["config_hash"] == hashes[part.name]:
            records[part.name] = done
    pending = [p for p in PARTS if p.name not in records]
    running: dict[str, subprocess.Popen] = {}
    failed: list[str] = []
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {text}", flush=True)

    threads_of: dict[str, int] = {}
    while (pending and not failed) or running:
        ready = [p for p in pending if all(n in records for n in p.needs)] if not failed else []
        for part in ready[: jobs - len(running)]:
            pending.remove(part)
            # a part that runs alone (the stages at the end form a chain) gets every thread
            threads = jobs if len(ready) == 1 and not running else 1
            threads_of[part.name] = threads
            for suffix in (THREADS_SUFFIX, WIDENABLE_SUFFIX):
                (logs / f"{part.name}{suffix}").unlink(missing_ok=True)
            command = [sys.executable, "-m", "nextgpt", "mini", "build", "--out", str(root)]
            command += ["--scale", scale, "--only", part.name, "--seed", str(seed)]
            command += ["--threads", str(threads), "--jobs", "1"]
            with open(logs / f"{part.name}.log", "w") as log:
                running[part.name] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=_thread_env(threads)
                )
            say(f"started {part.name} (log: {logs / (part.name + '.log')})")
        if not running:
            break
        time.sleep(1.0)
        for name, process in list(running.items()):
            if process.poll() is None:
                continue
            del running[name]
            done = read_done(root / name)
            if process.returncode == 0 and done is not None:
                records[name] = done
                say(f"finished {name} in {done['seconds'] / 60:.1f} min")
                lone = _lone_part(running, pending, records)
                if (
                    lone is not None
                    and threads_of[lone] < jobs
                    and widen_worker(logs, lone, running[lone].pid, jobs)
                ):
                    threads_of[lone] = jobs
                    say(f"{lone} now runs alone: {jobs} threads")
            else:
                failed.append(name)
                tail = (logs / f"{name}.log").read_text(errors="replace")[-2000:]
                say(f"FAILED {name} (exit {process.returncode}); end of its log:\n{tail}")
    if failed or pending:
        what = f"failed: {', '.join(failed)}" if failed else "could not start"
        left = ", ".join(p.name for p in pending)
        raise UsageError(f"mini build stopped, {what}; not built: {left}")
    return records


def _lone_part(
    running: dict[str, subprocess.Popen], pending: list[Part], records: dict[str, Any]
) -> str | None:
    """The one running part, when nothing else can start before it ends."""
    if len(running) != 1 or any(all(n in records for n in p.needs) for p in pending):
        return None
    return next(iter(running))


# A worker started beside another gets one thread, and torch cannot be given more from outside:
# the builder writes the count it wants to `<logs>/<part>.threads` and sends SIGUSR1, and the
# worker's handler (in its main thread, where torch's thread count lives) takes it. The worker
# writes `<part>.widenable` once the handler is in place: SIGUSR1 kills a process without one.
THREADS_SUFFIX, WIDENABLE_SUFFIX = ".threads", ".widenable"


def widen_worker(logs: Path, part: str, pid: int, threads: int) -> bool:
    """Ask a running worker to use `threads` torch threads; False if it cannot take the signal."""
    import signal

    marker = logs / f"{part}{WIDENABLE_SUFFIX}"
    if not hasattr(signal, "SIGUSR1") or not marker.is_file():
        return False
    if marker.read_text().strip() != str(pid):  # left by an earlier worker of this part
        return False
    (logs / f"{part}{THREADS_SUFFIX}").write_text(f"{threads}\n")
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        return False
    return True


def accept_more_threads(logs: Path, part: str) -> None:
    """In a worker: take the thread count the builder writes, when it signals."""
    import signal

    if not hasattr(signal, "SIGUSR1"):
        return

    def take(signum: int, frame: Any) -> None:
        import torch

        with contextlib.suppress(OSError, ValueError):
            torch.set_num_threads(int((logs / f"{part}{THREADS_SUFFIX}").read_text()))

    signal.signal(signal.SIGUSR1, take)
    (logs / f"{part}{WIDENABLE_SUFFIX}").write_text(f"{os.getpid()}\n")


def _thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(TOKENIZERS_PARALLELISM="false")
    return env


def register(sub: argparse._SubParsersAction) -> None:
    mini = sub.add_parser("mini", help="nextgpt-mini: the miniature trained from scratch")
    commands = mini.add_subparsers(dest="mini_command", required=True)
    b = commands.add_parser("build", help="build nextgpt-mini part by part (resumable)")
    b.add_argument("--out", required=True, type=Path, help="build directory")
    b.add_argument("--scale", default="full", help=f"one of {', '.join(SCALE_NAMES)}")
    b.add_argument("--only", default=None, help=f"build one part: {', '.join(PART_NAMES)}")
    b.add_argument("--seed", type=int, default=0, help="world seed")
    b.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    b.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="parts run side by side, one thread each (1: one after another in this process)",
    )
    b.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1, got {args.jobs}")
    if args.jobs > 1 and args.only is None:
        records = build_parallel(args.out, args.scale, args.seed, args.jobs)
    else:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        logs = args.out / "logs"
        if args.only is not None:  # maybe a worker of build_parallel, which may widen it
            logs.mkdir(parents=True, exist_ok=True)
            accept_more_threads(logs, args.only)
        try:
            records = build(args.out, args.scale, args.only, args.seed)
        finally:
            if args.only is not None:
                # the handler stays in place (a late signal must not kill a finished part), but
                # without the marker the builder sends none, and nothing is left in logs/
                for suffix in (THREADS_SUFFIX, WIDENABLE_SUFFIX):
                    (logs / f"{args.only}{suffix}").unlink(missing_ok=True)
    for name, record in records.items():
        print(f"{name}: done in {record['seconds']} s -> {args.out / name}")
    return 0
