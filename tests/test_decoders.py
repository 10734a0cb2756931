"""Frozen diffusion decoders on tiny random pipelines: shapes from configs, conditioning,
generation, the denoising loss, lazy loading and the save/load round trip."""

from __future__ import annotations

import dataclasses
import gc
import math
import shutil
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

import nextgpt.decoders.base as decoders_base
from nextgpt.config import DecoderConfig, TinyDecoderArch, tiny_config
from nextgpt.decoders import (
    AudioDecoder,
    ImageDecoder,
    VideoDecoder,
    build_decoder,
    build_tiny_pipeline,
)

CAPTIONS = ["a red car on a wet road", "a small dog barking at the sea"]


def tiny(modality: str, **changes) -> DecoderConfig:
    return dataclasses.replace(tiny_config().decoders[modality], **changes)


@pytest.fixture(scope="module")
def decoders():
    return {m: build_decoder(tiny(m), seed=0) for m in ("image", "video", "audio")}


@pytest.fixture(scope="module")
def saved(decoders, tmp_path_factory):
    """Each tiny pipeline saved in diffusers' layout."""
    paths = {}
    for modality, decoder in decoders.items():
        paths[modality] = tmp_path_factory.mktemp(modality)
        decoder.save(paths[modality])
    return paths


def own_text_embedding(decoder, captions: list[str]) -> torch.Tensor:
    """The pipeline's text encoder run by hand, as each pipeline conditions on it."""
    pipe = decoder.pipeline
    ids = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        if decoder.modality == "audio":
            out = pipe.text_encoder(ids.input_ids, attention_mask=ids.attention_mask)
            return F.normalize(out.text_embeds, dim=-1)[:, None]
        return pipe.text_encoder(ids.input_ids).last_hidden_state


def as_array(item) -> np.ndarray:
    return np.asarray(item[0] if isinstance(item, tuple) else item, dtype=np.float32)


# ---- conditioning --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("modality", "shape"), [("image", (48, 32)), ("video", (48, 32)), ("audio", (1, 24))]
)
def test_conditioning_shape_is_what_the_text_encoder_produces(decoders, modality, shape):
    decoder = decoders[modality]
    assert decoder.conditioning_shape() == shape
    own = own_text_embedding(decoder, CAPTIONS)
    assert tuple(own.shape) == (2, *shape)
    encoded = decoder.encode_text(CAPTIONS)
    assert encoded.dtype == torch.float32
    torch.testing.assert_close(encoded, own, rtol=0, atol=1e-6)


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_encode_text_distinguishes_captions_deterministically(decoders, modality):
    decoder = decoders[modality]
    a = decoder.encode_text(CAPTIONS)
    assert torch.equal(a, decoder.encode_text(CAPTIONS))
    gap = (a[0] - a[1]).norm() / a[0].norm()
    assert gap > 0.01, gap
    # a caption differing only in its last word differs too: nothing is lost to unknown tokens
    b = decoder.encode_text(["a red car on a wet street"])
    assert (a[0] - b[0]).abs().max() > 1e-3
    if modality == "audio":
        torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 1))
    # the same seed builds the same text encoder; another seed a different one
    assert torch.equal(build_decoder(tiny(modality), seed=0).encode_text(CAPTIONS), a)
    assert not torch.allclose(build_decoder(tiny(modality), seed=1).encode_text(CAPTIONS), a)


@pytest.mark.parametrize(("modality", "size"), [("image", 514), ("video", 514), ("audio", 261)])
def test_tiny_tokenizers_cover_english(decoders, modality, size):
    pipe = decoders[modality].pipeline
    tokenizer = pipe.tokenizer
    assert len(tokenizer) == size
    assert pipe.text_encoder.config.vocab_size >= size
    text = "The quick brown fox, 3 jumps over Zoë's lazy dog!"
    ids = tokenizer(text).input_ids
    assert tokenizer.unk_token_id not in ids[1:-1]
    # one token per byte (CLIP drops the spaces, RoBERTa keeps them)
    counted = text if modality == "audio" else text.replace(" ", "")
    assert len(ids) == 2 + len(counted.encode())


def test_negative_embeddings_encode_the_empty_prompt(decoders):
    decoder = decoders["image"]
    negative = decoder.negative_embeddings(3)
    assert negative.shape == (3, 48, 32)
    torch.testing.assert_close(negative, decoder.encode_text([""]).expand(3, -1, -1))
    assert not torch.allclose(negative[0], decoder.encode_text(CAPTIONS[:1])[0])


# ---- generation ----------------------------------------------------------------------------
def test_generate_image(decoders):
    decoder = decoders["image"]
    cond = decoder.encode_text(CAPTIONS)
    images = decoder.generate(cond)
    assert [type(im) for im in images] == [Image.Image, Image.Image]
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    pixels = [np.asarray(im, dtype=np.float32) for im in images]
    assert pixels[0].std() > 20
    assert np.abs(pixels[0] - pixels[1]).mean() > 10  # different conditioning, different image
    again = decoder.generate(cond)
    assert all(np.array_equal(p, np.asarray(im)) for p, im in zip(pixels, again))
    other_seed = decoder.generate(cond[:1], seed=1)[0]
    assert np.abs(np.asarray(other_seed, dtype=np.float32) - pixels[0]).mean() > 10
    (wide,) = decoder.generate(cond[:1], height=24, width=40, steps=2, guidance=1.0)
    assert wide.size == (40, 24)


def test_generate_video(decoders):
    decoder = decoders["video"]
    cond = decoder.encode_text(CAPTIONS)
    videos = decoder.generate(cond, num_frames=4)
    assert [(v.shape, v.dtype) for v in videos] == [((4, 32, 32, 3), np.uint8)] * 2
    assert videos[0].std() > 20
    assert np.abs(videos[0].astype(float) - videos[1]).mean() > 10
    again = decoder.generate(cond, num_frames=4)
    assert all(np.array_equal(a, b) for a, b in zip(videos, again))
    (default,) = decoder.generate(cond[:1])
    assert default.shape == (8, 32, 32, 3)


def test_generate_audio(decoders):
    decoder = decoders["audio"]
    assert decoder.sample_rate == 16000
    cond = decoder.encode_text(CAPTIONS)
    clips = decoder.generate(cond)
    for wave, rate in clips:
        assert rate == 16000 and wave.dtype == np.float32 and wave.shape == (16000,)
        assert np.isfinite(wave).all() and wave.std() > 1e-3
    assert np.abs(clips[0][0] - clips[1][0]).mean() > 1e-3
    again = decoder.generate(cond)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(clips, again))
    ((half, _),) = decoder.generate(cond[:1], seconds=0.5)
    assert half.shape == (8000,)


def test_audio_conditioning_is_drawn_by_its_direction_not_its_length(decoders):
    # AudioLDM conditions on unit CLAP vectors: a projector's shrunken vector must be drawn as the
    # caption it points at, in sampling and in the denoising loss alike
    decoder = decoders["audio"]
    cond = decoder.encode_text(CAPTIONS[:2])
    assert torch.allclose(cond.norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    ((wave, _), (other, _)) = decoder.generate(cond, steps=3, seed=1)
    ((short, _), _) = decoder.generate(cond * 0.6, steps=3, seed=1)
    assert np.allclose(short, wave, atol=1e-5)
    assert np.abs(other - wave).mean() > 1e-3  # a different direction is drawn differently
    targets = targets_for("audio")
    with torch.no_grad():
        full = decoder.denoising_loss(cond, targets, torch.Generator().manual_seed(0))
        shrunk = decoder.denoising_loss(cond * 0.6, targets, torch.Generator().manual_seed(0))
    assert shrunk.item() == pytest.approx(full.item(), rel=1e-5)


def test_generate_rejects_bad_conditioning_and_sizes(decoders):
    decoder = decoders["image"]
    with pytest.raises(ValueError, match=r"\(B, 48, 32\)"):
        decoder.generate(torch.zeros(1, 77, 32))
    with pytest.raises(TypeError, match="num_frames"):
        decoder.generate(torch.zeros(1, 48, 32), num_frames=4)


def test_attention_slicing_and_bfloat16(decoders):
    reference = decoders["image"]
    cond = reference.encode_text(CAPTIONS[:1])
    (expected,) = reference.generate(cond, steps=2)
    (sliced,) = build_decoder(tiny("image", attention_slicing=True)).generate(cond, steps=2)
    assert np.array_equal(np.asarray(sliced), np.asarray(expected))
    half = build_decoder(tiny("image", dtype="bfloat16"))
    assert half.pipeline.unet.dtype == torch.bfloat16
    assert half.encode_text(CAPTIONS[:1]).dtype == torch.float32
    (image,) = half.generate(cond, steps=2)
    # bfloat16 rounding moves pixels a little, not the picture
    difference = np.abs(np.asarray(image, dtype=np.float32) - np.asarray(expected))
    assert difference.mean() < 3  # different captions differ by ~40
    cond = cond.clone().requires_grad_(True)
    half.denoising_loss(cond, targets_for("image")[:1]).backward()
    assert cond.grad.dtype == torch.float32 and cond.grad.abs().sum() > 0


# ---- the denoising loss --------------------------------------------------------------------
def targets_for(modality: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if modality == "image":
        return torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    if modality == "video":
        return torch.rand(2, 4, 3, 32, 32, generator=g) * 2 - 1
    t = torch.arange(16000) / 16000
    return torch.stack([torch.sin(2 * math.pi * 440 * t), torch.randn(16000, generator=g)])


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_denoising_loss_trains_only_the_conditioning(decoders, modality):
    decoder = decoders[modality]
    targets = targets_for(modality)
    cond = decoder.encode_text(CAPTIONS).requires_grad_(True)
    loss = decoder.denoising_loss(cond, targets, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss) and 0.05 < loss.item() < 20
    loss.backward()
    assert cond.grad is not None and cond.grad.abs().sum() > 0
    assert torch.isfinite(cond.grad).all()
    for name, module in decoder.pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            assert all(p.grad is None and not p.requires_grad for p in module.parameters()), name
    with torch.no_grad():
        same = decoder.denoising_loss(cond, targets, torch.Generator().manual_seed(0))
        other = decoder.denoising_loss(cond.flip(0), targets, torch.Generator().manual_seed(0))
    assert same.item() == loss.item()
    assert other.item() != loss.item()


def test_denoising_loss_follows_prediction_type():
    decoder = build_decoder(tiny("image"), seed=0)
    cond = decoder.encode_text(CAPTIONS)
    targets = targets_for("image")
    losses = {}
    base = decoder.pipeline.scheduler.config
    for kind in ("epsilon", "v_prediction", "sample"):
        decoder.pipeline.scheduler = DDIMScheduler.from_config(base, prediction_type=kind)
        losses[kind] = decoder.denoising_loss(cond, targets, torch.Generator().manual_seed(0))
    assert len({v.item() for v in losses.values()}) == 3
    decoder.pipeline.scheduler = DDIMScheduler.from_config(base, prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type"):
        decoder.denoising_loss(cond, targets)


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_zero_terminal_snr_schedule_starts_from_pure_noise(modality):
    """SD's schedule keeps signal at its last step (the leak that let the mini video decoder read
    a trajectory out of the starting noise); the rescaled one keeps none, samples from t=999 with
    v-prediction, and every pipeline still generates finite media with it."""
    leaky = build_tiny_pipeline(modality, TinyDecoderArch()).scheduler
    assert leaky.alphas_cumprod[-1] > 1e-3
    arch = TinyDecoderArch(zero_terminal_snr=True)
    decoder = build_decoder(tiny(modality, tiny=arch), seed=0)
    scheduler = decoder.pipeline.scheduler
    assert scheduler.alphas_cumprod[-1] == 0
    assert scheduler.config.prediction_type == "v_prediction"
    scheduler.set_timesteps(4)
    assert scheduler.timesteps[0] == arch.num_train_timesteps - 1
    out = decoder.generate(decoder.encode_text(CAPTIONS[:1]), steps=2, guidance=2.0, seed=0)
    media = out[0][0] if modality == "audio" else out[0]  # audio: (waveform, rate)
    assert np.isfinite(np.asarray(media, dtype=np.float64)).all()
    # the training target at the last step is -x0: the model must produce the sample from text
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    last = scheduler.alphas_cumprod[-1].view(1, 1, 1, 1)
    target = decoders_base.diffusion_target("v_prediction", latents, noise, last)
    torch.testing.assert_close(target, -latents)


def test_audio_log_mel_matches_the_vocoder(decoders):
    decoder = decoders["audio"]
    vocoder = decoder.pipeline.vocoder.config
    t = torch.arange(16000) / 16000
    tones = (1000.0, 4000.0)
    wave = torch.stack([0.3 * torch.sin(2 * math.pi * f * t) for f in tones])
    mel = decoder.log_mel(wave)
    assert mel.shape == (2, 100, vocoder.model_in_dim)  # one frame per 160-sample hop
    # the peak bin is the filter centred nearest the tone (Slaney mel: linear to 1 kHz, then log)
    peak = mel[:, 10:90].mean(1).argmax(-1)
    assert peak[0] < peak[1]
    for tone, bin_ in zip(tones, peak.tolist()):
        centre = _slaney_centre(bin_, vocoder.model_in_dim, vocoder.sampling_rate / 2)
        assert abs(centre - tone) / tone < 0.15, (tone, centre)
    # peak normalisation: loudness does not change the spectrogram; silence is the floor
    torch.testing.assert_close(decoder.log_mel(3 * wave), mel, rtol=0, atol=1e-2)
    assert torch.allclose(decoder.log_mel(torch.zeros(1, 1600)), torch.tensor(math.log(1e-5)))
    # 0.75 s is 75 frames, padded with silence to a multiple of the VAE's downsampling (2)
    short = decoder.log_mel(wave[:, :12000])
    assert short.shape[1] == 76 and torch.all(short[:, 75] == math.log(1e-5))


def _slaney_centre(index: int, bins: int, fmax: float) -> float:
    """Centre frequency of Slaney mel filter `index` of `bins` spanning 0..fmax Hz."""

    def to_mel(f: float) -> float:
        return f / (200 / 3) if f < 1000 else 15 + math.log(f / 1000) * 27 / math.log(6.4)

    def to_hz(m: float) -> float:
        return m * 200 / 3 if m < 15 else 1000 * math.exp((m - 15) * math.log(6.4) / 27)

    return to_hz(to_mel(fmax) * (index + 1) / (bins + 1))


# ---- loading ---------------------------------------------------------------------------------
@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_save_load_round_trip_is_identical(decoders, saved, modality):
    decoder = decoders[modality]
    loaded = build_decoder(tiny(modality, pretrained=str(saved[modality])), seed=0)
    assert loaded.conditioning_shape() == decoder.conditioning_shape()
    assert not loaded.is_loaded  # read from the saved JSON configs only
    cond = decoder.encode_text(CAPTIONS)
    assert torch.equal(loaded.encode_text(CAPTIONS), cond)
    size = {"num_frames": 2} if modality == "video" else {}
    outputs = decoder.generate(cond[:1], steps=2, **size)
    reloaded = loaded.generate(cond[:1], steps=2, **size)
    assert np.array_equal(as_array(outputs[0]), as_array(reloaded[0]))


def test_conditioning_shape_from_a_hub_id_in_the_cache(saved, tmp_path, monkeypatch):
    """A hub id is resolved through the Hugging Face cache (offline here), reading JSON only."""
    import huggingface_hub.constants as hub

    commit = "0" * 40
    repo = tmp_path / "models--nextgpt-test--tiny-audioldm"
    shutil.copytree(saved["audio"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    decoder = build_decoder(tiny("audio", pretrained="nextgpt-test/tiny-audioldm"))
    assert decoder.conditioning_shape() == (1, 24)
    assert decoder.sample_rate == 16000
    assert not decoder.is_loaded


def test_sd2_like_width_is_read_from_the_saved_config(tmp_path):
    """A decoder 48 wide (like SD-2's 1024 against SD-1.5's 768) just works; a config that
    still says the other width fails clearly, before any weights load."""
    wide = tiny("image", tiny=TinyDecoderArch(text_width=48, text_max_length=20))
    build_decoder(wide, seed=0).save(tmp_path)
    decoder = build_decoder(tiny("image", pretrained=str(tmp_path)))
    assert decoder.conditioning_shape() == (20, 48)
    assert decoder.encode_text(CAPTIONS).shape == (2, 20, 48)
    stale = build_decoder(tiny("image", pretrained=str(tmp_path), cond_len=20, cond_dim=32))
    with pytest.raises(ValueError, match=r"cond_dim=32.*gives 48"):
        stale.conditioning_shape()
    with pytest.raises(ValueError, match="cond_dim=32"):
        stale.encode_text(CAPTIONS)
    assert not stale.is_loaded
    with pytest.raises(ValueError, match=r"cond_len=77.*gives 1"):
        build_decoder(tiny("audio", cond_len=77)).conditioning_shape()


def test_loading_is_lazy_and_release_frees(monkeypatch):
    calls = []

    def counting_build(*args, **kwargs):
        calls.append(args)
        return build_tiny_pipeline(*args, **kwargs)

    monkeypatch.setattr(decoders_base, "build_tiny_pipeline", counting_build)
    decoder = build_decoder(tiny("image"), seed=3)
    assert decoder.conditioning_shape() == (48, 32)
    assert calls == [] and not decoder.is_loaded
    first = decoder.encode_text(CAPTIONS)
    decoder.negative_embeddings(2)
    assert len(calls) == 1 and decoder.is_loaded
    unet = weakref.ref(decoder.pipeline.unet)
    decoder.release()
    gc.collect()
    assert not decoder.is_loaded and unet() is None
    assert torch.equal(decoder.encode_text(CAPTIONS), first)  # reloaded, same weights
    assert len(calls) == 2


def test_tiny_pipelines_are_deterministic_per_seed():
    arch = TinyDecoderArch()
    rng = torch.get_rng_state()
    a, b, c = (build_tiny_pipeline("audio", arch, s).vocoder.state_dict() for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_build_decoder_dispatches_on_modality():
    kinds = {m: type(build_decoder(tiny(m))) for m in ("image", "video", "audio")}
    assert kinds == {"image": ImageDecoder, "video": VideoDecoder, "audio": AudioDecoder}
    with pytest.raises(ValueError, match="unknown decoder modality"):
        build_decoder(DecoderConfig("depth"))
    with pytest.raises(ValueError, match="modality 'audio'"):
        AudioDecoder(tiny("image"))


def test_unknown_dtype_fails_at_construction():
    from nextgpt.decoders import build_decoder

    with pytest.raises(ValueError, match="unknown decoder dtype 'float8'"):
        build_decoder(tiny("image", dtype="float8"))


def test_norm_groups_reach_the_autoencoder_and_unet():
    from nextgpt.config import TinyDecoderArch
    from nextgpt.decoders.tiny import build_tiny_pipeline

    arch = dataclasses.replace(tiny_config().decoders["image"].tiny, norm_groups=8)
    assert isinstance(arch, TinyDecoderArch)
    pipe = build_tiny_pipeline("image", arch, seed=0)
    assert pipe.vae.config.norm_num_groups == 8 and pipe.unet.config.norm_num_groups == 8
    assert pipe.vae.encoder.conv_norm_out.num_groups == 8


# ---- word-level CLIP tokenizer ---------------------------------------------------------------
WORDS = ("a", "small", "large", "red", "yellow", "circle", "square", "triangle", "in", "moving")


def test_word_tokenizer_keeps_the_words_whole_and_still_covers_english():
    from nextgpt.decoders.tiny import clip_char_tokenizer, clip_word_tokenizer

    tokenizer = clip_word_tokenizer(WORDS, 16)
    assert tokenizer.tokenize("A large Yellow circle, moving") == [
        "a</w>", "large</w>", "yellow</w>", "circle</w>", ",</w>", "moving</w>"
    ]  # fmt: skip
    # an unknown word, or a listed one inside a longer word, falls back to pieces; nothing is unk
    chars = clip_char_tokenizer(16)
    for text in ("squares", "purple hexagon", "Zoë's"):
        pieces = tokenizer.tokenize(text)
        assert len(pieces) > len(text.split())
        assert "".join(pieces).replace("</w>", "") == "".join(chars.tokenize(text)).replace(
            "</w>", ""
        )
        assert tokenizer.unk_token_id not in tokenizer(text).input_ids[1:-1]  # unk is <end>
    # the character vocabulary keeps its ids, so char and word tokenizers agree on single letters
    assert tokenizer("x").input_ids == chars("x").input_ids
    with pytest.raises(ValueError, match="ASCII letters"):
        clip_word_tokenizer(("a b",), 16)


def test_word_level_decoder_conditions_per_word_and_round_trips(tmp_path):
    """With `text_words` and no text layers the conditioning of a word depends on that word and
    its place only: swapping one word changes that row alone (what lets the UNet see the colour
    and the shape apart). Saved in diffusers' layout, the pipeline reloads the same tokenizer."""
    arch = TinyDecoderArch(text_words=WORDS, text_layers=0, text_max_length=12)
    decoder = build_decoder(tiny("image", tiny=arch), seed=0)
    assert decoder.conditioning_shape() == (12, 32)
    a, b = decoder.encode_text(["a small red circle", "a small yellow circle"])
    changed = (a - b).abs().amax(-1) > 1e-6
    assert changed.nonzero().flatten().tolist() == [3]  # <start> a small [red|yellow] circle
    decoder.save(tmp_path)
    loaded = build_decoder(tiny("image", tiny=arch, pretrained=str(tmp_path)), seed=0)
    assert loaded.pipeline.tokenizer.tokenize("a yellow triangle") == [
        "a</w>", "yellow</w>", "triangle</w>"
    ]  # fmt: skip
    assert torch.equal(loaded.encode_text(["a small red circle"]), a[None])


def test_audio_word_tokens_keep_each_word_whole_and_round_trip(tmp_path):
    """With `text_words` the audio decoder's CLAP (RoBERTa) tokenizer rebuilds each listed word as
    one token, first in the caption or after a space; other text still falls back to characters,
    and the single-character ids stay those of the character tokenizer. Saved in diffusers'
    layout, the pipeline reloads the same tokenizer and conditions identically."""
    from nextgpt.decoders.tiny import roberta_char_tokenizer, tiny_tokenizer

    words = ("buzzy", "high", "tone", "pulsing", "fast")
    arch = TinyDecoderArch(text_words=words)
    tokenizer = tiny_tokenizer("audio", arch)
    assert tokenizer.tokenize("high buzzy tone, pulsing fast") == [
        "high", "Ġbuzzy", "Ġtone", ",", "Ġpulsing", "Ġfast"
    ]  # fmt: skip
    assert tokenizer.tokenize("a hum") == list(roberta_char_tokenizer(48).tokenize("a hum"))
    assert tokenizer("x").input_ids == roberta_char_tokenizer(48)("x").input_ids
    with pytest.raises(ValueError, match="ASCII letters"):
        tiny_tokenizer("audio", TinyDecoderArch(text_words=("pulsing fast",)))
    with pytest.raises(ValueError, match="unknown decoder modality"):
        tiny_tokenizer("smell", TinyDecoderArch())

    decoder = build_decoder(tiny("audio", tiny=arch), seed=0)
    before = decoder.encode_text(["high buzzy tone"])
    decoder.save(tmp_path)
    loaded = build_decoder(tiny("audio", tiny=arch, pretrained=str(tmp_path)), seed=0)
    assert loaded.pipeline.tokenizer.tokenize("fast tone") == ["fast", "Ġtone"]
    assert torch.equal(loaded.encode_text(["high buzzy tone"]), before)


def test_word_merges_break_ties_by_symbol_order():
    """Equally frequent pairs merge plain symbols before word-final ones, then by text, and merged
    tokens rank in the order they were made, so the vocabulary does not depend on the call."""
    from nextgpt.decoders.tiny import _learned_merges

    vocab: dict[str, int] = {}
    words = [["c", "a", "b</w>"], ["c", "a", "t</w>"], ["b", "a</w>"]]
    # ('c', 'a') is the only pair seen twice; then three ties, each word once
    assert _learned_merges(words, vocab) == [
        ("c", "a"), ("b", "a</w>"), ("ca", "b</w>"), ("ca", "t</w>")
    ]  # fmt: skip
    assert vocab == {"ca": 0, "ba</w>": 1, "cab</w>": 2, "cat</w>": 3}


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_word_tokenizers_are_deterministic_and_rebuild_the_shipped_ones(modality):
    """The BPE trainer of `tokenizers` gave the video words 4 vocabularies in 30 calls; the merges
    learned here give one, the one the shipped nextgpt-mini's decoders carry, token for token."""
    from pathlib import Path

    from transformers import CLIPTokenizer, RobertaTokenizer

    import nextgpt
    from nextgpt.decoders.tiny import clip_word_tokenizer, roberta_word_tokenizer
    from nextgpt.mini.world import caption_words

    build, cls = (
        (roberta_word_tokenizer, RobertaTokenizer)
        if modality == "audio"
        else (clip_word_tokenizer, CLIPTokenizer)
    )
    words = caption_words(modality)
    built = [build(words, 16) for _ in range(8)]
    shipped_dir = Path(nextgpt.__file__).parent / "models" / "nextgpt-mini" / "decoders" / modality
    shipped = cls.from_pretrained(shipped_dir / "tokenizer")
    text = " ".join(words) + " " + ", ".join(reversed(words)) + " purple hexagon"
    for tokenizer in built:
        assert tokenizer.get_vocab() == shipped.get_vocab()
        assert tokenizer(text).input_ids == shipped(text).input_ids
    assert all(len(tokenizer.tokenize(w)) == 1 for w in words)


@pytest.mark.parametrize("modality", ["image", "video", "audio"])
def test_a_text_vocab_smaller_than_the_tokenizer_is_refused(modality):
    from nextgpt.decoders.tiny import tiny_tokenizer

    with pytest.raises(ValueError, match="text_vocab 100 < tokenizer size"):
        tiny_tokenizer(modality, TinyDecoderArch(text_vocab=100))
