"""`nextgpt mini build`: the smoke build runs end to end, resumes part by part, and its image
decoder loads as a decoder."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from nextgpt.cli import UsageError, main
from nextgpt.config import DecoderConfig
from nextgpt.decoders import build_decoder
from nextgpt.mini import build as mini_build


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> Path:
    """One smoke build shared by the tests; tests that change it work on a copy."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("mini") / "build"
    mini_build.build(out, "smoke", progress=False)
    return out


def _replace_run(monkeypatch, name: str, run) -> None:
    parts = tuple(
        dataclasses.replace(p, run=run) if p.name == name else p for p in mini_build.PARTS
    )
    monkeypatch.setattr(mini_build, "PARTS", parts)


def test_smoke_build_writes_every_part(smoke):
    for name in mini_build.PART_NAMES:
        done = json.loads((smoke / name / mini_build.DONE).read_text())
        assert done["part"] == name and done["scale"] == "smoke"
    assert (smoke / "data" / "train" / "mosit.json").is_file()
    assert (smoke / "data" / "heldout" / "manifest.json").is_file()
    assert (smoke / "judges" / "image_judge.safetensors").is_file()
    metrics = json.loads((smoke / "image-decoder" / mini_build.DONE).read_text())["metrics"]
    for split in ("train", "heldout"):
        assert set(metrics["generations"][split]) == {"shape", "colour", "size"}
        assert set(metrics["autoencoder"][split]) == {"shape", "colour", "size", "mse"}


def test_rerun_skips_finished_parts(smoke, monkeypatch):
    before = {n: (smoke / n / mini_build.DONE).stat().st_mtime_ns for n in mini_build.PART_NAMES}
    records = {n: json.loads((smoke / n / mini_build.DONE).read_text()) for n in before}

    def fail(ctx):
        raise AssertionError(f"{ctx.folder.name} ran again")

    for name in mini_build.PART_NAMES:
        _replace_run(monkeypatch, name, fail)
    assert mini_build.build(smoke, "smoke", progress=False) == records
    after = {n: (smoke / n / mini_build.DONE).stat().st_mtime_ns for n in mini_build.PART_NAMES}
    assert after == before


def test_interrupted_part_leaves_no_marker_and_reruns(smoke, tmp_path, monkeypatch):
    out = tmp_path / "build"
    shutil.copytree(smoke, out)
    shutil.rmtree(out / "data")
    judges_done = (out / "judges" / mini_build.DONE).stat().st_mtime_ns

    def interrupted(ctx):
        (ctx.folder / "half-written.json").write_text("{")
        raise RuntimeError("killed mid-part")

    _replace_run(monkeypatch, "data", interrupted)
    with pytest.raises(RuntimeError, match="mid-part"):
        mini_build.build(out, "smoke", progress=False)
    assert not (out / "data" / mini_build.DONE).exists()
    monkeypatch.undo()
    records = mini_build.build(out, "smoke", progress=False)
    assert (out / "data" / mini_build.DONE).is_file()
    assert not (out / "data" / "half-written.json").exists()  # the part restarted clean
    assert records["data"]["metrics"]["train"]["mosit.json"] == 7
    assert (out / "judges" / mini_build.DONE).stat().st_mtime_ns == judges_done


def test_image_decoder_loads_and_generates(smoke):
    decoder = build_decoder(
        DecoderConfig(modality="image", pretrained=str(smoke / "image-decoder" / "pipeline")),
        device="cpu",
    )
    # word-level text encoder: one token per caption word between the two specials
    assert decoder.conditioning_shape() == (16, 32)
    assert len(decoder.pipeline.tokenizer("a small red circle").input_ids) == 6
    cond = decoder.encode_text(["a small red circle"])
    (image,) = decoder.generate(cond, steps=2, guidance=2.0)
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def _weights(pipeline: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{f.parent.name}.{k}": v
        for f in sorted(pipeline.glob("*/*.safetensors"))
        for k, v in load_file(str(f)).items()
    }


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_a_decoder_built_in_two_parts_is_the_decoder_built_in_one_process(smoke, modality):
    """The build trains a decoder's front (autoencoder, vocoder, text encoder) and its UNet in
    two processes, through a saved pipeline and RNG state, so the stages can start in between;
    that must give the weights and metrics that all phases in one process give."""
    import importlib

    from nextgpt.mini.judges import Judges
    from nextgpt.mini.world import World, WorldConfig

    module = importlib.import_module(f"nextgpt.mini.pretrain_{modality}")
    judge = Judges.load(smoke / "judges", (modality,)).judges[modality]
    settings = getattr(mini_build.scales()["smoke"], f"{modality}_decoder")
    pipe, metrics = getattr(module, f"pretrain_{modality}_decoder")(
        World(WorldConfig(seed=0)), judge, settings
    )
    pipe.save_pretrained(str(smoke.parent / f"{modality}-one-process"))
    one = _weights(smoke.parent / f"{modality}-one-process")
    two = _weights(smoke / f"{modality}-decoder" / "pipeline")
    front = _weights(smoke / mini_build.front_part_name(modality) / "pipeline")
    assert one.keys() == two.keys() and any(k.startswith("unet.") for k in one)
    assert [k for k in one if not one[k].equal(two[k])] == []
    # the UNet did train in the second part, and the text encoder did not change there
    assert any(not front[k].equal(two[k]) for k in two if k.startswith("unet."))
    assert all(front[k].equal(two[k]) for k in two if k.startswith("text_encoder."))
    recorded = json.loads((smoke / f"{modality}-decoder" / mini_build.DONE).read_text())["metrics"]
    for key in ("autoencoder", "text_encoder", "generations"):
        assert _untimed(recorded[key]) == _untimed(metrics[key]), key


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "seconds"}


def test_the_stages_read_the_fronts_and_the_package_holds_the_finished_decoders(smoke):
    model = yaml.safe_load((smoke / "stage1" / "model.yaml").read_text())
    for modality, decoder in model["decoders"].items():
        assert Path(decoder["pretrained"]).parent.name == mini_build.front_part_name(modality)
    packaged = _weights(smoke / "package" / "nextgpt-mini" / "decoders" / "image")
    finished = _weights(smoke / "image-decoder" / "pipeline")
    assert packaged.keys() == finished.keys()
    assert all(packaged[k].equal(finished[k].half()) for k in finished if k.startswith("unet."))


def test_the_package_refuses_a_decoder_whose_text_encoder_is_not_the_stages_one(smoke, tmp_path):
    from safetensors.torch import load_file, save_file

    front = smoke / mini_build.front_part_name("image") / "pipeline"
    finished = smoke / "image-decoder" / "pipeline"
    mini_build.same_text_encoder(front, finished)  # the build's own pair passes
    changed = tmp_path / "pipeline"
    shutil.copytree(finished, changed)
    (path,) = (changed / "text_encoder").glob("*.safetensors")
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"1 tensors differ, first {re.escape(name)}"):
        mini_build.same_text_encoder(front, changed)


def test_only_builds_one_part(tmp_path):
    out = tmp_path / "build"
    assert main(["mini", "build", "--out", str(out), "--scale", "smoke", "--only", "data"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["data", "logs"]
    assert not list((out / "logs").iterdir())  # the part's lock is gone


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "nope"], "unknown part 'nope' for --only"),
        (["--scale", "huge"], "unknown --scale 'huge'"),
        (["--only", "image-decoder-front"], "needs judges built first"),
        (["--only", "image-decoder"], "needs image-decoder-front built first"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, message):
    code = main(["mini", "build", "--out", str(tmp_path / "b"), "--scale", "smoke", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err


def test_packaged_model_is_self_contained_and_generates(smoke, tmp_path):
    """The package holds every part (float16 on disk) and loads from anywhere as a model."""
    package = tmp_path / "moved"
    shutil.copytree(smoke / "package" / "nextgpt-mini", package)
    config = (package / "config.yaml").read_text()
    assert str(smoke) not in config  # relative paths only
    from safetensors import safe_open

    with safe_open(
        str(package / "decoders" / "image" / "unet" / "diffusion_pytorch_model.safetensors"), "pt"
    ) as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    from nextgpt.model import NextGPT

    model = NextGPT.from_pretrained(package)
    assert {p.dtype for p in model.encoder.parameters()} == {torch.float32}  # upcast on load
    reply = model.generate(
        "Please draw a small red circle.", modalities=["image"], max_new_tokens=8
    )
    assert reply.images and reply.images[0].size == (32, 32)
    assert sorted(p.name for p in (package / "judges").iterdir() if p.suffix == ".json") == [
        "audio_judge.json",
        "image_judge.json",
        "video_judge.json",
    ]


def test_eval_part_writes_tables_with_the_ablation(smoke):
    text = (smoke / "eval" / "eval.md").read_text()
    assert "## nextgpt-mini (packaged, float16)" in text
    assert "## ablation: input projector after stage 1, same budget" in text
    assert "| image | shape |" in text.split("## ablation")[1]  # a row per attribute
    linear = yaml.safe_load((smoke / "stage1" / "model.yaml").read_text())  # the shipped one
    grouping = yaml.safe_load((smoke / "stage1-grouping" / "model.yaml").read_text())
    assert (grouping["input_projector"]["kind"], linear["input_projector"]["kind"]) == (
        "grouping",
        "linear",
    )
    results = json.loads((smoke / "eval" / "results.json").read_text())
    assert set(results["caption"]) == {"image", "audio", "video"}
    prompts = [item["prompt"] for item in results["items"] if item["section"] == "generation"]
    assert prompts, "the per-item records are kept in results.json"
    done = json.loads((smoke / "eval" / mini_build.DONE).read_text())["metrics"]
    assert "items" not in done["results"]  # done.json keeps the tables' figures only
    stage1 = json.loads((smoke / "stage1" / mini_build.DONE).read_text())["metrics"]
    assert stage1["last_loss"]["step"] == 2  # the smoke overrides reached the shipped recipe


def test_parallel_build_skips_finished_parts_and_reruns_a_missing_one(smoke, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(smoke, out)
    before = json.loads((out / "eval" / mini_build.DONE).read_text())
    (out / "package" / mini_build.DONE).unlink()
    records = mini_build.build_parallel(out, "smoke", jobs=2)
    assert (out / "package" / mini_build.DONE).is_file()
    assert "package" in (out / "logs" / "package.log").read_text()  # its worker's progress
    assert records["eval"] == before  # same hash: not rerun
    assert not (out / "logs" / "eval.log").exists()


def test_a_part_being_built_elsewhere_is_not_touched(smoke, tmp_path):
    out = tmp_path / "build"
    shutil.copytree(smoke, out)
    shutil.rmtree(out / "data")
    (out / "logs").mkdir(exist_ok=True)
    (out / "logs" / "data.lock").write_text(str(os.getpid()))  # a live process holds it
    with pytest.raises(UsageError, match="is being built by process"):
        mini_build.build(out, "smoke", only="data", progress=False)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / "logs" / "data.lock").write_text(str(dead.pid))  # stale: its process is gone
    mini_build.build(out, "smoke", only="data", progress=False)
    assert (out / "data" / mini_build.DONE).is_file() and not (out / "logs" / "data.lock").exists()


def test_config_hash_covers_the_world_config(monkeypatch):
    """A changed rendering default (here the video frame rate) must change every part's hash, or
    a resumed build would keep parts trained on the old world."""
    from nextgpt.mini import world as world_module

    scale = mini_build.scales()["smoke"]
    part = next(p for p in mini_build.PARTS if p.name == "judges")
    before = mini_build.config_hash(part, scale, 0, {})
    assert mini_build.config_hash(part, scale, 0, {}) == before
    changed = dataclasses.make_dataclass(
        "WorldConfig",
        [("video_fps", float, dataclasses.field(default=4.0))],
        bases=(world_module.WorldConfig,),
        frozen=True,
    )
    monkeypatch.setattr(world_module, "WorldConfig", changed)
    assert mini_build.config_hash(part, scale, 0, {}) != before


def test_stage_hash_follows_the_recipe_values_not_its_comments(monkeypatch, tmp_path):
    """Rewording a recipe's comment must not retrain the stage; changing a value must."""
    recipe = mini_build.stage_yaml(3).read_text()
    path = tmp_path / "mini-stage3.yaml"
    monkeypatch.setattr(mini_build, "stage_yaml", lambda number: path)
    scale = mini_build.scales()["smoke"]
    part = next(p for p in mini_build.PARTS if p.name == "stage3")
    needs = dict.fromkeys(part.needs, "x")

    path.write_text(recipe)
    before = mini_build.config_hash(part, scale, 0, needs)
    path.write_text("# a reworded note on the recipe\n" + recipe)
    assert mini_build.config_hash(part, scale, 0, needs) == before
    assert "max_steps: 5000" in recipe
    path.write_text(recipe.replace("max_steps: 5000", "max_steps: 5001"))
    assert mini_build.config_hash(part, scale, 0, needs) != before


def test_a_broken_recipe_is_named_when_the_build_hashes_it(monkeypatch, tmp_path):
    path = tmp_path / "mini-stage3.yaml"
    path.write_text("stage: 3\nlora: [unclosed\n")
    monkeypatch.setattr(mini_build, "stage_yaml", lambda number: path)
    part = next(p for p in mini_build.PARTS if p.name == "stage3")
    with pytest.raises(yaml.YAMLError, match=re.escape(str(path))):
        mini_build.config_hash(part, mini_build.scales()["smoke"], 0, dict.fromkeys(part.needs))


def test_stage1_hash_covers_the_input_projector_settings(monkeypatch):
    """A changed input projector (here the grouping assignment) must rerun stage 1, not only a
    changed projector name."""
    from nextgpt.mini import assemble

    scale = mini_build.scales()["smoke"]
    part = next(p for p in mini_build.PARTS if p.name == mini_build.ABLATION_PART)
    needs = dict.fromkeys(part.needs, "x")
    before = mini_build.config_hash(part, scale, 0, needs)
    assert assemble.mini_input_projector("grouping").assignment == "soft"
    original = assemble.mini_input_projector

    def hard(kind: str):
        return dataclasses.replace(original(kind), assignment="hard")

    monkeypatch.setattr(assemble, "mini_input_projector", hard)
    assert mini_build.config_hash(part, scale, 0, needs) != before


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="POSIX signals only")
def test_a_worker_takes_more_threads_when_the_builder_signals(tmp_path):
    """A part started beside another keeps one thread unless the builder widens it; the worker
    side is this process here (the handler runs in the main thread, where torch's count lives)."""
    import os
    import signal
    import time

    import torch

    logs = tmp_path / "logs"
    logs.mkdir()
    previous = signal.getsignal(signal.SIGUSR1)
    torch.set_num_threads(1)
    try:
        # no handler yet: the builder must not signal (SIGUSR1 would kill the worker)
        assert not mini_build.widen_worker(logs, "stage2", os.getpid(), 2)
        mini_build.accept_more_threads(logs, "stage2")
        assert not mini_build.widen_worker(logs, "stage2", os.getpid() + 1, 2)  # stale marker
        assert mini_build.widen_worker(logs, "stage2", os.getpid(), 2)
        for _ in range(100):  # the handler runs at the next bytecode boundary
            if torch.get_num_threads() == 2:
                break
            time.sleep(0.01)
        assert torch.get_num_threads() == 2
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_part_counts_as_alone_only_when_nothing_else_can_start():
    parts = {p.name: p for p in mini_build.PARTS}
    running = {"stage2": None}
    done = {n: {} for n in ("data", "judges", "encoder", "llm", "stage1")}
    # the ablation could still start beside stage 2
    assert mini_build._lone_part(running, [parts["stage1-grouping"]], done) is None
    done["stage1-grouping"] = {}
    assert mini_build._lone_part(running, [parts["stage3"]], done) == "stage2"
    assert mini_build._lone_part({**running, "eval": None}, [], done) is None


def test_the_unet_phase_continues_from_the_rng_state_it_is_given():
    """The UNet part must draw what the UNet phase drew when it followed the front in one
    process: from the front's RNG state, not a fresh seed, and without moving the caller's."""
    from nextgpt.mini.denoiser import unet_phase

    torch.manual_seed(123)
    state = torch.get_rng_state()
    expected = torch.rand(3)
    torch.manual_seed(7)
    caller = torch.get_rng_state()
    drawn = []

    def train():
        drawn.append(torch.rand(3))
        return [{"train": {"a": 1.0}, "heldout": {"a": 0.5}}]

    metrics = unet_phase(train, state)
    assert torch.equal(drawn[0], expected)
    assert torch.equal(torch.get_rng_state(), caller)
    assert metrics["generations"] == {"train": {"a": 1.0}, "heldout": {"a": 0.5}}
