"""The miniature's video decoder: the smoke settings run every phase, the saved pipeline reloads
as NExT-GPT's video decoder, and the autoencoder phase learns."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import TextToVideoSDPipeline

from nextgpt.config import DecoderConfig
from nextgpt.decoders import build_decoder
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.mini.judges import Judge, JudgeConfig
from nextgpt.mini.pretrain_video import (
    VideoDecoderTraining,
    pretrain_video_decoder,
    train_autoencoder,
)
from nextgpt.mini.world import World

ATTRIBUTES = {"shape", "colour", "direction"}


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """One smoke run shared by the tests, judged by an untrained judge (only the plumbing is
    checked here), and its pipeline saved."""
    torch.set_num_threads(1)
    judge = Judge(JudgeConfig.for_world(world, "video"))
    pipe, metrics = pretrain_video_decoder(world, judge, VideoDecoderTraining.smoke())
    folder = tmp_path_factory.mktemp("video-decoder") / "pipeline"
    pipe.save_pretrained(folder)
    return pipe, metrics, folder


def test_full_settings_use_the_calibrated_architecture():
    arch = VideoDecoderTraining().arch
    assert arch.vae_channels == (32, 64, 64) and arch.norm_groups == 8
    assert arch.block_channels == (32, 64) and arch.sample_size == 32
    assert arch.zero_terminal_snr  # direction never bound under SD's leaky schedule


def test_metrics_have_the_documented_keys(trained):
    _, metrics, _ = trained
    assert set(metrics) == {"autoencoder", "text_encoder", "unet", "generations"}
    for split in ("train", "heldout"):
        assert set(metrics["autoencoder"][split]) == ATTRIBUTES | {"mse"}
        assert set(metrics["generations"][split]) == ATTRIBUTES
    assert set(metrics["text_encoder"]["heldout_probes"]) == ATTRIBUTES
    (last,) = metrics["unet"]["history"]  # smoke: one evaluation, at the end
    assert last["step"] == 2 and np.isfinite(last["loss"])
    assert metrics["generations"]["train"] == last["train"]


def test_saved_pipeline_reloads_and_generates_videos(trained):
    pipe, _, folder = trained
    again = TextToVideoSDPipeline.from_pretrained(folder)
    # the learned latent scale travels with the weights (SD's 0.18215 would mean it did not)
    assert again.vae.config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    assert again.vae.config.scaling_factor != pytest.approx(0.18215)
    # so does the schedule it was trained under
    assert again.scheduler.config.prediction_type == "v_prediction"
    assert again.scheduler.alphas_cumprod[-1] == 0
    decoder = build_decoder(
        DecoderConfig(modality="video", pretrained=str(folder), num_frames=8), device="cpu"
    )
    assert decoder.conditioning_shape() == (16, 32)  # word-level: one token per caption word
    assert len(again.tokenizer("a red circle moving up").input_ids) == 7
    cond = decoder.encode_text(["a red circle moving up", "a blue square moving left"])
    videos = decoder.generate(cond, steps=2, guidance=2.0)
    assert [(v.shape, v.dtype) for v in videos] == [((8, 32, 32, 3), np.uint8)] * 2


@pytest.fixture(scope="module")
def autoencoded(world):
    """A fresh full-size pipeline whose autoencoder trained 30 steps; its losses."""
    torch.set_num_threads(1)
    t = dataclasses.replace(VideoDecoderTraining(), ae_steps=30, ae_batch=8)
    pipe = build_tiny_pipeline("video", t.arch, t.seed)
    losses = train_autoencoder(pipe, world, t, progress=False)
    return pipe, losses


def test_autoencoder_reconstruction_loss_falls(autoencoded):
    pipe, losses = autoencoded
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    assert np.isfinite(pipe.vae.config.scaling_factor) and pipe.vae.config.scaling_factor > 0
