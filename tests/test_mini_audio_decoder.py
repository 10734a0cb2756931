"""The miniature's audio decoder: the smoke settings run every phase end to end, the saved
pipeline loads as NExT-GPT's audio decoder and speaks one second of 16 kHz audio, and training
actually learns (the vocoder's loss falls); the vocoder's floored loss ignores what lies below its
floor and nothing above it; the world's pitches lie on the vocoder's frame-rate grid."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import AudioLDMPipeline

from nextgpt.config import DecoderConfig
from nextgpt.decoders import build_decoder
from nextgpt.mini.judges import JudgeTraining, train_judge
from nextgpt.mini.pretrain_audio import (
    AudioDecoderTraining,
    _mel_view,
    build_pipeline,
    floored_log_l1,
    pretrain_audio_decoder,
    train_vocoder,
)
from nextgpt.mini.world import PITCH_HZ, World


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def smoke(world, tmp_path_factory):
    """One smoke run shared by the tests: (saved pipeline folder, metrics)."""
    torch.set_num_threads(1)
    # an untrained-quality judge is enough here: only the metrics' shape is checked
    judge = train_judge(world, "audio", JudgeTraining(samples=32, epochs=1, batch_size=32))
    pipe, metrics = pretrain_audio_decoder(world, judge, AudioDecoderTraining.smoke())
    out = tmp_path_factory.mktemp("audio-decoder") / "pipeline"
    pipe.save_pretrained(str(out))
    return out, metrics


def test_smoke_metrics_have_every_phase(smoke):
    _, metrics = smoke
    assert set(metrics) == {"autoencoder", "vocoder", "text_encoder", "unet", "generations"}
    attributes = {"pitch", "timbre", "rhythm"}
    for split in ("train", "heldout"):
        assert set(metrics["generations"][split]) == attributes
        assert set(metrics["vocoder"][split]) == attributes
        assert attributes <= set(metrics["autoencoder"][split])
    assert set(metrics["text_encoder"]["heldout_probes"]) == attributes
    assert metrics["unet"]["history"][-1]["step"] == AudioDecoderTraining.smoke().unet_steps


def test_saved_pipeline_reloads_and_generates(smoke):
    folder, _ = smoke
    pipe = AudioLDMPipeline.from_pretrained(str(folder))
    assert pipe.vocoder.config.upsample_initial_channel == 16  # the smoke vocoder, not the tiny one
    # trained under zero terminal SNR, and the saved scheduler says so (it samples the same way)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.alphas_cumprod[-1] == 0
    decoder = build_decoder(
        DecoderConfig(modality="audio", pretrained=str(folder), audio_seconds=1.0), device="cpu"
    )
    assert decoder.conditioning_shape() == (1, 24)
    cond = decoder.encode_text(["a low pure tone held steady"])
    (clip,) = decoder.generate(cond, steps=2, guidance=2.0)
    wave, rate = clip
    assert rate == 16000 and wave.shape == (16000,) and np.isfinite(wave).all()


def test_vocoder_loss_falls(world):
    """Forty steps on crops must lower the vocoder's loss clearly: a broken target alignment or
    a mel mismatch leaves it flat."""
    torch.set_num_threads(1)
    t = dataclasses.replace(
        AudioDecoderTraining.smoke(), vocoder_channels=32, vocoder_steps=40, vocoder_batch=8
    )
    torch.manual_seed(0)
    pipe = build_pipeline(t)
    losses = train_vocoder(pipe, _mel_view(pipe, t.arch), world, t, progress=False)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_floored_loss_ignores_only_what_lies_below_the_floor():
    """40 dB below a target whose peak is 1 the floor is 0.01: output detail under it costs
    nothing, the same error above it costs its full log ratio, and the floor follows each item's
    own peak."""
    target = torch.tensor([[1.0, 1e-4, 0.5], [100.0, 1e-2, 50.0]])
    quiet = target.clone()
    quiet[:, 1] *= 5  # 5e-4 and 5e-2: under the first item's floor (0.01), not the second's (1)
    assert floored_log_l1(quiet, target, 40.0).item() == pytest.approx(0.0, abs=1e-7)
    loud = target.clone()
    loud[0, 2] *= np.e  # one of six values off by a factor e, above the floor
    assert floored_log_l1(loud, target, 40.0).item() == pytest.approx(1 / 6, rel=1e-5)
    # unfloored (AudioLDM's absolute floor only), the quiet detail costs log 5 on each item
    assert floored_log_l1(quiet, target, 0.0).item() == pytest.approx(2 * np.log(5) / 6, rel=1e-5)


def test_world_pitches_lie_on_the_vocoders_frame_rate_grid(world):
    """A frame-local vocoder fed a steady tone's identical mel frames repeats itself every hop, so
    it can only draw partials at whole multiples of the frame rate: each pitch must be one, and a
    rendered pure tone's spectral peak must sit at its pitch (no jitter moves it off the grid)."""
    arch = AudioDecoderTraining().arch
    frame_rate = arch.sample_rate / int(np.prod(arch.vocoder_upsample_rates))
    assert frame_rate == 100.0
    for pitch, hz in PITCH_HZ.items():
        assert hz % frame_rate == 0, pitch
        attributes = {"pitch": pitch, "timbre": "pure", "rhythm": "steady"}
        wave, rate = world.render("audio", attributes, np.random.default_rng(3))
        spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
        peak = np.fft.rfftfreq(len(wave), 1 / rate)[spectrum.argmax()]
        assert abs(peak - hz) <= 1.0, (pitch, peak)
