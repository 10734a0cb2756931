"""Every loader on checkpoints in the public on-disk layouts, then generation through them.

The checkpoints are tiny but laid out as the real ones are (see `public_layouts`): Vicuna v0's
sentencepiece + sharded .bin directory, Mistral / Qwen2 `save_pretrained` directories, diffusers
pipelines (an SD-2-like one whose conditioning is wider than SD-1.5's), ImageBind's official .pth,
and hub ids served from an offline Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import constants
from public_layouts import (
    SD2_LIKE,
    put_in_hub_cache,
    write_causal_lm,
    write_imagebind_pth,
    write_pipeline,
    write_vicuna_v0,
)

from nextgpt.config import (
    IMAGEBIND_ENV,
    DecoderConfig,
    LLMConfig,
    NextGPTConfig,
    SignalTokenConfig,
    tiny_config,
)
from nextgpt.decoders import build_decoder
from nextgpt.encoders.imagebind import ImageBindEncoder
from nextgpt.llm import LanguageModel
from nextgpt.model import NextGPT

EXAMPLE = Path(__file__).parents[1] / "nextgpt" / "assets" / "example.png"
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> dict[str, Path]:
    """One of each public layout, written once for the module."""
    root = tmp_path_factory.mktemp("public")
    return {
        "vicuna": write_vicuna_v0(root / "vicuna-7b-v0"),
        "imagebind": write_imagebind_pth(root / "imagebind_huge.pth", tiny_config().encoder),
        "sd15": write_pipeline(root / "sd15", "image"),
        "sd2": write_pipeline(root / "sd2", "image", SD2_LIKE),
        "audio": write_pipeline(root / "audioldm", "audio"),
        "video": write_pipeline(root / "zeroscope", "video"),
    }


def full_config(disk: dict[str, Path], image: str = "sd2") -> NextGPTConfig:
    """The tiny architecture with every component loaded from its public layout."""
    config = tiny_config()
    config.encoder.pretrained = str(disk["imagebind"])
    config.llm = LLMConfig(pretrained=str(disk["vicuna"]), dtype="float32", template="vicuna_v0")
    config.decoders = {
        "image": DecoderConfig("image", str(disk[image]), steps=2, guidance=2.0),
        "audio": DecoderConfig("audio", str(disk["audio"]), steps=2, audio_seconds=0.5),
        "video": DecoderConfig("video", str(disk["video"]), steps=2, num_frames=2),
    }
    return config


def test_vicuna_v0_layout_loads_with_signal_tokens(disk):
    llm = LanguageModel.from_config(
        LLMConfig(pretrained=str(disk["vicuna"]), dtype="bfloat16"), SignalTokenConfig()
    )
    assert len(llm.tokenizer) == 320 + 4 + 8 + 24 + 3  # sentencepiece vocab + ours
    assert llm.base_model.dtype == torch.bfloat16
    embed = llm.base_model.get_input_embeddings().weight.float()
    torch.testing.assert_close(embed[-1], embed[:320].mean(0), atol=1e-2, rtol=1e-2)
    # typed signal-token text stays text
    assert llm.signal.ids["image"][0] not in llm.tokenize("draw <image_00> now")


def test_generate_through_every_public_layout_and_round_trip(disk, tmp_path):
    model = NextGPT.from_config(full_config(disk)).eval()
    assert model.config.decoders["image"].cond_dim == 48  # SD-2-like, read from its unet config
    assert not any(d.is_loaded for d in model.decoders.values())
    content = [
        {"type": "image", "image": str(EXAMPLE)},
        {"type": "text", "text": "Draw it, then play it."},
    ]
    reply = model.generate(
        [{"role": "user", "content": content}], modalities=["image", "audio"], max_new_tokens=4
    )
    assert reply.images[0].size == (32, 32) and reply.audios[0][1] == 16000
    assert {m for m, d in model.decoders.items() if d.is_loaded} == {"image", "audio"}
    model.save_pretrained(tmp_path / "saved")
    saved = (tmp_path / "saved" / "config.yaml").read_text()
    assert (
        str(disk["vicuna"]) in saved and str(disk["imagebind"]) in saved
    )  # referenced, not copied
    assert not (tmp_path / "saved" / "llm").exists()
    again = NextGPT.from_pretrained(tmp_path / "saved").generate(
        "Draw it.", modalities=["image"], max_new_tokens=4
    )
    first = model.generate("Draw it.", modalities=["image"], max_new_tokens=4)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_causal_lms_by_name(family, tmp_path):
    config = tiny_config()
    path = write_causal_lm(tmp_path / family, family)
    config.llm = LLMConfig(pretrained=str(path), dtype="float32")
    model = NextGPT.from_config(config).eval()
    assert model.llm.base_model.config.model_type == family
    adapted = model.llm.adapted_state_dict()
    assert ("signal_lm_head" in adapted) == (family == "mistral")  # Qwen2 here ties its head
    reply = model.generate("Draw a ball.", modalities=["image"], max_new_tokens=4)
    assert len(reply.images) == 1


def test_sd2_width_just_works_and_a_recorded_width_is_checked(disk):
    shapes = {
        name: build_decoder(DecoderConfig("image", str(disk[name]))).conditioning_shape()
        for name in ("sd15", "sd2")
    }
    assert shapes == {"sd15": (48, 32), "sd2": (48, 48)}
    trained_for_sd15 = DecoderConfig("image", str(disk["sd2"]), cond_len=48, cond_dim=32)
    with pytest.raises(ValueError, match="cond_dim=32 but the decoder's own config gives 48"):
        build_decoder(trained_for_sd15).conditioning_shape()


def test_decoder_fp16_slicing_lazy_loading_and_release(disk):
    config = DecoderConfig(
        "image", str(disk["sd15"]), dtype="float16", steps=1, attention_slicing=True
    )
    decoder = build_decoder(config, device="cpu")
    assert decoder.conditioning_shape() == (48, 32) and not decoder.is_loaded
    image = decoder.generate(torch.randn(1, 48, 32))[0]
    assert image.size == (32, 32) and decoder.pipeline.unet.dtype == torch.float16
    decoder.release()
    assert not decoder.is_loaded


def test_hub_ids_resolve_from_the_offline_cache(disk, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    put_in_hub_cache(tmp_path / "hub", "lmsys/vicuna-7b-v0-test", disk["vicuna"])
    put_in_hub_cache(tmp_path / "hub", "stabilityai/stable-diffusion-2-1", disk["sd2"])
    config = full_config(disk)
    config.llm.pretrained = "lmsys/vicuna-7b-v0-test"
    config.decoders = {"image": DecoderConfig("image", "stabilityai/stable-diffusion-2-1", steps=2)}
    model = NextGPT.from_config(config).eval()
    assert model.config.decoders["image"].cond_dim == 48
    reply = model.generate("Draw it.", modalities=["image"], max_new_tokens=4)
    assert reply.images[0].size == (32, 32)


def test_imagebind_official_file_loads_for_the_trunks_nextgpt_uses(disk):
    full = ImageBindEncoder.from_config(
        dataclasses.replace(tiny_config().encoder, pretrained=str(disk["imagebind"]))
    )
    core = ImageBindEncoder.from_config(
        dataclasses.replace(
            tiny_config().encoder, pretrained=str(disk["imagebind"]), all_modalities=False
        )
    )
    assert "depth" not in core.modality_trunks
    image = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(
        core.encode("image", image).pooled, full.encode("image", image).pooled
    )


def test_the_7b_preset_finds_imagebind_where_documented(tmp_path, monkeypatch):
    monkeypatch.delenv(IMAGEBIND_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    preset = NextGPTConfig.from_name("nextgpt-7b")
    assert preset.encoder.pretrained == str(tmp_path / ".cache/nextgpt/imagebind_huge.pth")
    assert not preset.encoder.all_modalities
    monkeypatch.setenv(IMAGEBIND_ENV, "/data/imagebind_huge.pth")
    assert NextGPTConfig.from_name("nextgpt-7b").encoder.pretrained == "/data/imagebind_huge.pth"
    ids = {m: d.pretrained for m, d in preset.decoders.items()}
    assert ids == {
        "image": "stable-diffusion-v1-5/stable-diffusion-v1-5",
        "audio": "cvssp/audioldm-l-full",
        "video": "cerspense/zeroscope_v2_576w",
    }
    assert preset.llm.pretrained == "lmsys/vicuna-7b-v1.5" and preset.llm.dtype == "bfloat16"
    assert {d.dtype for d in preset.decoders.values()} == {"float16"}


def test_quantized_loading_says_it_needs_a_gpu(disk, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = LLMConfig(pretrained=str(disk["vicuna"]), quantization="4bit")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*set llm.quantization to null"):
        LanguageModel.from_config(config, SignalTokenConfig())
    with pytest.raises(ValueError, match="unknown quantization '3bit'"):
        LanguageModel.from_config(
            dataclasses.replace(config, quantization="3bit"), SignalTokenConfig()
        )


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_llm_on_gpu(disk, kind):
    config = LLMConfig(pretrained=str(disk["vicuna"]), dtype="bfloat16", quantization=kind)
    llm = LanguageModel.from_config(config, SignalTokenConfig())
    assert next(llm.base_model.parameters()).is_cuda
    ids = torch.tensor([[1, *llm.signal.ids["image"]]], device="cuda")
    logits, _, _ = llm(llm.embed(ids))
    assert torch.isfinite(logits.float()).all()


@pytest.mark.gpu
@GPU
def test_fp16_decoder_with_model_cpu_offload_on_gpu(disk):
    config = DecoderConfig("video", str(disk["video"]), dtype="float16", steps=2, num_frames=2)
    config.cpu_offload = True
    decoder = build_decoder(config)
    frames = decoder.generate(torch.randn(1, *decoder.conditioning_shape()))[0]
    assert frames.shape == (2, 32, 32, 3)
