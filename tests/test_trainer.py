"""The trainer's checkpoints: exact resume, atomic writes, loading for inference, LoRA merging."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nextgpt.config import LoraSettings
from nextgpt.data.toy import write_toy_dataset
from nextgpt.model import NextGPT
from nextgpt.training import checkpoint as ckpt
from nextgpt.training.config import DataConfig, DataSource, TrainConfig
from nextgpt.training.trainer import train


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), copies=2)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def stage3_config(toy: dict[str, Path], out: Path, **kw) -> TrainConfig:
    fields = dict(
        stage=3,
        model="tiny",
        out_dir=str(out),
        data=DataConfig(train=(DataSource(str(toy["stage3"])),), max_length=256),
        lr=5e-3,
        batch_size=2,
        grad_accum=2,
        max_steps=6,
        save_every=3,
        keep_checkpoints=5,
        log_every=1,
        tensorboard=False,
        progress=False,
    )
    fields.update(kw)
    config = TrainConfig(**fields)
    config.lora.r, config.lora.alpha, config.lora.dropout = 4, 8, 0.1  # dropout draws from the RNG
    return config


def test_resume_continues_to_the_same_weights(toy, tmp_path):
    full = train(stage3_config(toy, tmp_path / "full"))
    assert full.checkpoint.name == "checkpoint-00000006"
    # an interrupted run: what it left after step 3
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full", cut)
    shutil.rmtree(cut / "checkpoint-00000006")
    (cut / "latest").write_text("checkpoint-00000003\n")
    resumed = train(stage3_config(toy, cut, resume=True))
    assert resumed.checkpoint.name == "checkpoint-00000006"
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        a, b = load_file(full.checkpoint / name), load_file(resumed.checkpoint / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    # and training changed the weights it trains
    start = load_file(tmp_path / "full" / "base" / "trainable.safetensors")
    end = load_file(full.checkpoint / "trainable.safetensors")
    assert not torch.equal(start["llm.signal_embed"], end["llm.signal_embed"])


def test_a_crash_mid_checkpoint_keeps_the_previous_one(toy, tmp_path, monkeypatch):
    real = ckpt._write_optimizer
    calls = []

    def crash_on_second(state, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError("disk full")
        real(state, directory)

    monkeypatch.setattr(ckpt, "_write_optimizer", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        train(stage3_config(toy, tmp_path / "run"))
    run = tmp_path / "run"
    assert ckpt.latest_checkpoint(run) == run / "checkpoint-00000003"
    assert not (run / "checkpoint-00000006").exists()
    monkeypatch.setattr(ckpt, "_write_optimizer", real)
    model = NextGPT.from_pretrained(run)  # the run directory loads its latest checkpoint
    assert model.llm.has_lora
    result = train(stage3_config(toy, run, resume=True))
    assert ckpt.latest_checkpoint(run) == result.checkpoint == run / "checkpoint-00000006"


def test_checkpoint_loads_for_generation_and_merges_lora(toy, tmp_path):
    result = train(stage3_config(toy, tmp_path / "run", max_steps=2, save_every=0))
    model = NextGPT.from_pretrained(result.checkpoint)
    saved = load_file(result.checkpoint / "trainable.safetensors")
    for key, value in model.trainable_state_dict().items():
        assert torch.equal(value, saved[key]), key
    # checkpoints hold only trainable weights; frozen parts live once in base/
    assert not list(result.checkpoint.glob("*/"))
    assert (tmp_path / "run" / "base" / "encoder.safetensors").is_file()
    prompt = "Draw a red square."
    reply = model.generate(prompt, modalities=["image"], max_new_tokens=6)
    assert reply.media and reply.media[0].modality == "image"

    merged = NextGPT.from_pretrained(ckpt.merge_lora(result.checkpoint, tmp_path / "merged"))
    assert not merged.llm.has_lora and merged.config.llm.lora is None
    ids = torch.tensor([[1, 40, 41, 42]])
    with torch.no_grad():
        a, _, _ = model.llm(model.llm.embed(ids))
        b, _, _ = merged.llm(merged.llm.embed(ids))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_trainable_state_from_a_full_state_dict(tiny_model):
    """What a checkpoint reads from accelerate's gathered state dict (ZeRO-3, FSDP)."""
    model = copy.deepcopy(tiny_model)
    model.llm.apply_lora(LoraSettings(r=2, alpha=4, dropout=0.0))
    gathered = ckpt.trainable_state(model, model.state_dict())
    own = model.trainable_state_dict()
    assert any(k.startswith("llm.lora.") for k in own)
    assert gathered.keys() == own.keys()
    for key in own:
        assert torch.equal(gathered[key], own[key]), key


def test_resume_without_a_checkpoint_is_an_error(toy, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(stage3_config(toy, tmp_path / "empty", resume=True))


def test_stage2_with_the_diffusion_loss(toy, tmp_path):
    records = json.loads(toy["stage2"].read_text())
    images = tmp_path / "images.json"  # image requests only: the image decoder is the fastest
    images.write_text(json.dumps([r for r in records if "output_image" in r]))
    config = stage3_config(toy, tmp_path / "run", stage=2, max_steps=2, save_every=0)
    config.data = DataConfig(train=(DataSource(str(images), str(toy["stage2"].parent)),))
    config.losses = ("text", "align", "diffusion")
    result = train(config)
    assert all(entry["diffusion/image"] > 0 for entry in result.history)
    # the worst conditioning row is logged beside the align term, and no row is below the mean
    assert all(e["align_row_max/image"] >= e["align/image"] > 0 for e in result.history)


def test_streaming_from_tar_shards(toy, tmp_path):
    from nextgpt.data.shards import pack_shards

    shards = pack_shards(toy["stage1"], tmp_path / "shards", per_shard=4)
    pattern = str(tmp_path / "shards" / f"shard-{{000000..{len(shards) - 1:06d}}}.tar")
    config = stage3_config(toy, tmp_path / "run", stage=1, max_steps=3, save_every=2)
    held_out = tmp_path / "eval.json"
    held_out.write_text(json.dumps(json.loads(toy["stage1"].read_text())[:4]))
    root = str(toy["stage1"].parent)
    config.data = DataConfig(
        train=(DataSource(pattern),), eval=(DataSource(str(held_out), root),), max_length=256
    )
    result = train(config)
    assert [h["step"] for h in result.history] == [1, 2, 3]
    assert [e["step"] for e in result.evals] == [0, 3]
    # saved every 2 steps, and always at the end
    assert result.checkpoint == ckpt.latest_checkpoint(tmp_path / "run")
    assert result.checkpoint.name == "checkpoint-00000003"
    assert (tmp_path / "run" / "checkpoint-00000002").is_dir()
    config.max_steps = 0
    with pytest.raises(ValueError, match="needs max_steps"):
        train(config)


def test_stage2_centres_projector_inputs_on_the_data_mean(toy, tmp_path):
    """A centring output projector's running mean is what it read in training: here every record
    in one batch, so the one step sets it to their mean; frozen projectors (stage 1) keep none."""
    import dataclasses

    from nextgpt.config import tiny_config
    from nextgpt.data.dataset import SampleEncoder, collate_encoded
    from nextgpt.data.formats import read_samples

    config = tiny_config()
    config.output_projector = dataclasses.replace(config.output_projector, centre_inputs=True)
    NextGPT.from_config(config).save_pretrained(tmp_path / "model")
    model = NextGPT.from_pretrained(tmp_path / "model")
    samples = read_samples(toy["stage2"]).samples
    encoder = SampleEncoder.for_model(model)
    batch = collate_encoded([encoder(s) for s in samples], model.llm.tokenizer.pad_token_id)
    seen: dict[str, torch.Tensor] = {}
    for m, proj in model.output_projectors.items():
        proj.register_forward_pre_hook(lambda mod, args, m=m: seen.setdefault(m, sum(args)))
    with torch.no_grad():
        model(batch)  # eval mode: reads, tracks nothing
    assert len(seen) >= 2

    kw = dict(model=str(tmp_path / "model"), batch_size=len(samples), grad_accum=1, save_every=0)
    run = stage3_config(toy, tmp_path / "run", stage=2, lr=1e-9, max_steps=1, **kw)
    run.data = DataConfig(train=(DataSource(str(toy["stage2"])),), max_length=256)
    trained = load_file(train(run).checkpoint / "trainable.safetensors")
    for m, states in seen.items():
        assert bool(trained[f"output_projectors.{m}.mean_ready"])
        mean = trained[f"output_projectors.{m}.input_mean"]
        assert mean.abs().mean() > 0.1  # the large per-position part, now removed
        torch.testing.assert_close(mean, states.mean(0), atol=1e-4, rtol=1e-4)
    stage1 = stage3_config(toy, tmp_path / "s1", stage=1, max_steps=1, **kw)
    stage1.data = DataConfig(train=(DataSource(str(toy["stage1"])),), max_length=256)
    frozen = load_file(train(stage1).checkpoint / "trainable.safetensors")
    assert not any(bool(v) for k, v in frozen.items() if k.endswith("mean_ready"))


def test_a_crash_while_resaving_a_step_recovers_the_old_copy(toy, tmp_path):
    """Re-saving the step `latest` names moves the old copy aside first; a crash before the new
    copy is in place must not lose the checkpoint."""
    full = train(stage3_config(toy, tmp_path / "run", max_steps=3, save_every=3))
    final = full.checkpoint
    before = load_file(final / "trainable.safetensors")
    aside = final.with_name(f".{final.name}.old")
    final.rename(aside)  # the state right after the first rename of the re-save
    assert ckpt.latest_checkpoint(tmp_path / "run") == final
    after = load_file(final / "trainable.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not aside.exists()


def test_gpu_rng_states_are_restored_in_device_order():
    states = {"cpu": torch.zeros(3)} | {f"cuda{i}": torch.full((2,), i) for i in range(12)}
    assert [int(s[0]) for s in ckpt.cuda_rng_states(states)] == list(range(12))
    del states["cuda7"]
    with pytest.raises(ValueError, match="cuda7"):
        ckpt.cuda_rng_states(states)
