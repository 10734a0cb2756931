"""`nextgpt doctor` and the memory estimate: what is on disk, what is missing, what fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from public_layouts import put_in_hub_cache, write_imagebind_pth, write_pipeline, write_vicuna_v0

from nextgpt import memory
from nextgpt.cli import main
from nextgpt.config import IMAGEBIND_ENV, DecoderConfig, LLMConfig, NextGPTConfig, tiny_config
from nextgpt.doctor import run_doctor
from nextgpt.llm import LanguageModel
from nextgpt.model import NextGPT


@pytest.fixture()
def empty_cache(tmp_path, monkeypatch) -> Path:
    """No HF cache and no ImageBind file: nothing of the full-size model is on disk."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv(IMAGEBIND_ENV, str(tmp_path / "imagebind_huge.pth"))
    return tmp_path / "hub"


def test_memory_table_of_the_7b_preset(empty_cache):
    config = NextGPTConfig.from_name("nextgpt-7b")
    sizes = memory.estimate(config)
    assert sizes["llm"].params == 6_738_415_616  # LLaMA-7B, as published
    assert sizes["image"].params == 859_520_964 + 83_653_863 + 123_060_480 + 303_981_588
    assert 1.0e9 < sizes["encoder"].params < 1.1e9  # ImageBind-huge without depth/thermal/IMU
    llm = [sizes["llm"].weight_bytes(p) / memory.GIB for p in memory.PRECISIONS]
    assert llm == pytest.approx([25.10, 12.55, 6.52, 3.88], abs=0.01)
    assert sizes["video"].weight_bytes("4bit") is None  # only the LLM is quantized
    table = memory.format_table(sizes)
    assert "llm          6,738,415,616      25.10      12.55       6.52       3.88" in table
    plans = memory.plans(config, sizes)
    needs = [p.need_bytes for p in plans]
    assert needs == sorted(needs, reverse=True)  # each plan needs less than the one before
    verdict = memory.format_plans(plans, 16)
    assert "on a 16 GiB GPU: as above, without the video decoder" in verdict
    assert "fits" in memory.format_plans(plans, 80).splitlines()[0]


def test_sizes_from_local_configs_match_the_loaded_models(tmp_path):
    vicuna = write_vicuna_v0(tmp_path / "vicuna")
    config = tiny_config()
    config.llm = LLMConfig(pretrained=str(vicuna))
    config.decoders = {
        "image": DecoderConfig("image", str(write_pipeline(tmp_path / "sd", "image")))
    }
    sizes = memory.estimate(config)
    loaded = LanguageModel.from_config(LLMConfig(pretrained=str(vicuna)), config.signal_tokens)
    added_rows = 2 * 39 * 64  # signal tokens and placeholders: embedding and lm_head rows
    assert sizes["llm"].params == memory.count(loaded.base_model) - added_rows
    assert sizes["llm"].basis == str(vicuna / "config.json")
    pipe = NextGPT.from_config(config).decoders["image"].pipeline
    parts = {p.name: p.params for p in sizes["image"].parts}
    assert parts == {n: memory.count(pipe.components[n]) for n in ("unet", "vae", "text_encoder")}


def test_doctor_on_the_7b_preset_says_how_to_fetch_everything(empty_cache, capsys):
    assert main(["doctor", "--model", "nextgpt-7b", "--gpu-memory", "16"]) == 1
    out = capsys.readouterr().out
    assert out.count("[MISSING]") == 5
    assert f"looked in: {empty_cache / 'models--lmsys--vicuna-7b-v1.5'}" in out
    assert "fetch: hf download lmsys/vicuna-7b-v1.5" in out
    assert "DiffusionPipeline.download('cerspense/zeroscope_v2_576w')" in out
    assert "curl -L -o" in out and "imagebind_huge.pth" in out
    assert "on a 16 GiB GPU:" in out


def test_doctor_finds_a_complete_model_and_names_what_goes_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    vicuna = put_in_hub_cache(
        tmp_path / "hub", "lmsys/vicuna-7b-v1.5", write_vicuna_v0(tmp_path / "v")
    )
    put_in_hub_cache(
        tmp_path / "hub", "cvssp/audioldm-l-full", write_pipeline(tmp_path / "a", "audio")
    )
    config = tiny_config()
    config.encoder.pretrained = str(write_imagebind_pth(tmp_path / "ib.pth", config.encoder))
    config.llm = LLMConfig(pretrained="lmsys/vicuna-7b-v1.5")
    config.decoders = {"audio": DecoderConfig("audio", "cvssp/audioldm-l-full", steps=2)}
    model_dir = tmp_path / "model"
    NextGPT.from_config(config).save_pretrained(model_dir)

    ok, report = run_doctor(str(model_dir))
    assert ok, report
    assert "found: ib.pth:" in report and "loads strictly" in report
    assert "found: tokenizer: tokenizer.model" in report
    assert "found: conditions on 1x24" in report
    assert "[ok] trained: trainable.safetensors" in report

    next((vicuna / "snapshots").glob("*/pytorch_model-00002-of-00002.bin")).unlink()
    torch.save({"something": torch.zeros(1)}, config.encoder.pretrained)
    ok, report = run_doctor(str(model_dir))
    assert not ok
    assert "missing: weights: pytorch_model-00002-of-00002.bin" in report
    assert "missing: weights that fit the configured encoder" in report


def test_doctor_rejects_an_unknown_model(capsys, tmp_path):
    assert main(["doctor", "--model", str(tmp_path / "nothing")]) == 2
    assert "not a preset" in capsys.readouterr().err
