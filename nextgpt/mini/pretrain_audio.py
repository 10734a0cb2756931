"""Pretrain the miniature's audio decoder (a tiny AudioLDMPipeline) on world sounds.

The phases follow docs/mini-design.md and mirror `pretrain_image.py`:
1. the mel autoencoder, on the log-mels NExT-GPT's `AudioDecoder.log_mel` computes, so training
   sees exactly the spectrograms inference and stage 2 use;
2. the vocoder (log-mel -> waveform), without a GAN: L1 on the log-mel of its output plus a
   multi-resolution STFT loss, both floored 40 dB below the target crop's peak, plus an L1 on the
   crop's mean, on short crops (the vocoder is frame-local, so a quarter second teaches it as much
   per frame as a second at a quarter of the cost). The vocoder caps the whole audio ceiling, so
   it is judged on vocoded real mels before the UNet trains;
3. the CLAP text encoder, with a tokenizer that keeps each caption word whole, pretrained with
   per-attribute linear probes on its normalised projection (the very vector the UNet is
   conditioned on) and frozen, so the conditioning separates pitch, timbre and rhythm from the
   UNet's first step;
4. the UNet on the denoising loss, with 10% empty captions for classifier-free guidance.
Only train-split combinations are ever trained on; generations are judged against the gold caption
on train and held-out combinations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AudioLDMPipeline
from torch import nn
from tqdm import tqdm
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

from nextgpt.config import DecoderConfig, TinyDecoderArch
from nextgpt.decoders.audio import LOG_FLOOR, AudioDecoder, mel_hop, mel_magnitude
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.mini.denoiser import train_denoiser, unet_phase
from nextgpt.mini.judges import Judge
from nextgpt.mini.world import TEMPLATES, World, caption_words


@dataclass(frozen=True)
class AudioDecoderTraining:
    """Steps and sizes of each phase; the defaults are the full build's, about 25 minutes of CPU
    on one thread (measured per step: autoencoder 0.75 s, vocoder 0.076 s, UNet 0.78 s, one
    judged evaluation 22 s). `smoke()` gives a run of a few seconds for tests."""

    # zero terminal SNR: under SD's schedule the UNet reached timbre 0.69 after 1,000 steps; with
    # the rescaled one it reached 0.83 after 500 (the vocoder alone scores 0.82), pitch 1.00 both
    # whole-word CLAP tokens: the character-level text encoder pooled held-out captions into
    # vectors whose pitch and rhythm linear probes read at 0.89 and 0.67 (rhythm generated at 0.52
    # on held-out combinations); with words, 1.00 / 1.00 / 1.00 at two of three seeds
    # (probes/clap_words.py on the whole-combination split, docs/mini-design.md section 8)
    arch: TinyDecoderArch = field(
        default_factory=lambda: TinyDecoderArch(
            norm_groups=8, zero_terminal_snr=True, text_words=caption_words("audio")
        )
    )
    # the vocoder is built here, not from `arch`: the tiny arch ties its width to the UNet's
    # first block (32), and calibration found 32 channels too weak (judge 0.70-0.78)
    vocoder_channels: int = 64
    vocoder_resblock_kernels: tuple[int, ...] = (3,)
    vocoder_dilations: tuple[tuple[int, ...], ...] = ((1, 3),)
    ae_steps: int = 250  # the loss fell 5.3 -> 0.9 in the first 35 steps
    ae_batch: int = 16
    ae_lr: float = 1e-3
    vocoder_steps: int = 6000  # 400 steps gave judge 0.77 / 0.50 / 0.83; the plan's ~8 min
    vocoder_batch: int = 16
    vocoder_crop: int = 25  # mel frames per crop (10 ms each)
    vocoder_lr: float = 2e-3
    # the vocoder's log-spectral losses compare magnitudes only down to this far below the target
    # crop's peak. Unfloored, they also asked it to copy the world's -48 dB noise floor, which a
    # deterministic vocoder cannot: it drew a comb of frame-rate partials there instead, loud
    # enough to make pure tones read hollow or buzzy (pure 17 of 63 on the vocoder shipped before;
    # 2,000-step probes on the same world: pure 55 of 61 floored, 0 of 61 not; mini-design §8)
    vocoder_floor_db: float = 40.0
    # L1 on each output crop's mean: neither log-spectral loss sees the mean, and unchecked the
    # output rode a level near +-0.97, where the final tanh saturates
    vocoder_mean_weight: float = 10.0
    text_steps: int = 300
    text_batch: int = 64
    text_lr: float = 2e-3
    # held-out rhythm drawn from the gold caption: 0.78 at 1,000 steps, 0.96 at 2,000
    # (probes/audio_unet_steps.py, 27 clips; mini-design §8)
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    eval_every: int = 500  # UNet steps between judged evaluations (0: only at the end)
    eval_per_combo: int = 3  # generated clips per combination and evaluation
    eval_steps: int = 20  # DDIM steps when sampling for evaluation
    guidance: float = 3.0
    eval_clips: int = 90  # real clips per split for judging the autoencoder and the vocoder
    seed: int = 0

    @classmethod
    def smoke(cls) -> AudioDecoderTraining:
        """A few seconds end to end: proves every phase runs and the pipeline saves and loads."""
        return cls(
            vocoder_channels=16,
            ae_steps=2,
            ae_batch=2,
            vocoder_steps=2,
            vocoder_batch=2,
            text_steps=2,
            text_batch=8,
            unet_steps=2,
            unet_batch=2,
            warmup=1,
            eval_every=0,
            eval_per_combo=1,
            eval_steps=2,
            eval_clips=4,
        )


# ---- building -----------------------------------------------------------------------------------
def build_pipeline(t: AudioDecoderTraining) -> AudioLDMPipeline:
    """The tiny AudioLDM pipeline with a vocoder of the chosen width in place of the tiny one."""
    pipe = build_tiny_pipeline("audio", t.arch, t.seed)
    rates = tuple(t.arch.vocoder_upsample_rates)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed + 1)
        vocoder = SpeechT5HifiGan(
            SpeechT5HifiGanConfig(
                model_in_dim=t.arch.mel_bins,
                sampling_rate=t.arch.sample_rate,
                upsample_initial_channel=t.vocoder_channels,
                upsample_rates=rates,
                upsample_kernel_sizes=tuple(2 * r for r in rates),
                resblock_kernel_sizes=t.vocoder_resblock_kernels,
                resblock_dilation_sizes=t.vocoder_dilations,
                normalize_before=False,
                initializer_range=0.1,  # as in tiny.py: 0.01 starts from near-silence
            )
        ).eval()
    pipe = AudioLDMPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        vocoder=vocoder,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _mel_view(pipe: AudioLDMPipeline, arch: TinyDecoderArch) -> AudioDecoder:
    """An AudioDecoder bound to `pipe`, so training targets come from the very `log_mel` that
    NExT-GPT uses (it reads only the vocoder's config and the VAE's scale)."""
    return AudioDecoder.from_pipeline(DecoderConfig(modality="audio", tiny=arch), pipe, "cpu")


def _waves(samples: list[Any]) -> torch.Tensor:
    return torch.from_numpy(np.stack([s.media[0] for s in samples]))


def _accuracy(judge: Judge, clips: list[np.ndarray], gold: list[dict[str, str]], rate: int) -> dict:
    """Per-attribute share of clips whose judged value is the gold one."""
    seen = judge.predict([(np.asarray(c, dtype=np.float32), rate) for c in clips])
    return {
        name: round(float(np.mean([s[name] == g[name] for s, g in zip(seen, gold)])), 4)
        for name in judge.config.attributes
    }


# ---- 1. mel autoencoder -------------------------------------------------------------------------
def train_autoencoder(
    pipe: AudioLDMPipeline, mel: AudioDecoder, world: World, t: AudioDecoderTraining, progress: bool
) -> list[float]:
    """L1 on log-mels plus a tiny KL; then set the latents' scaling factor to 1/std so the UNet
    sees unit-variance latents. Returns the loss of every step (the test checks it falls)."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=t.ae_lr)
    rng = world.rng("audio-decoder", "ae", t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    losses = []
    bar = tqdm(range(t.ae_steps), desc="audio autoencoder", disable=not progress)
    for _ in bar:
        x = mel.log_mel(_waves([world.sample("audio", rng, "train") for _ in range(t.ae_batch)]))
        x = x.unsqueeze(1)
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(y, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = mel.log_mel(_waves(world.samples("audio", 128, "train", "ae-scale", t.seed)))
        std = vae.encode(x.unsqueeze(1)).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


@torch.no_grad()
def reconstruct(pipe: AudioLDMPipeline, mels: torch.Tensor) -> torch.Tensor:
    """(B, T, mels) -> the autoencoder's reconstruction from the posterior mean."""
    vae = pipe.vae
    return vae.decode(vae.encode(mels.unsqueeze(1)).latent_dist.mean).sample.squeeze(1)


# ---- 2. vocoder ---------------------------------------------------------------------------------
def floored_log_l1(y: torch.Tensor, x: torch.Tensor, floor_db: float) -> torch.Tensor:
    """L1 between log magnitudes `y` (output) and `x` (target), each first raised to a floor
    `floor_db` below the target's own peak (per item): detail quieter than that, such as the
    world's noise floor, is neither asked for nor penalised. `floor_db <= 0` floors at AudioLDM's
    absolute LOG_FLOOR only."""
    floor = x.new_full((x.shape[0], 1), LOG_FLOOR)
    if floor_db > 0:
        peak = x.flatten(1).amax(dim=1, keepdim=True)
        floor = torch.maximum(floor, peak * 10 ** (-floor_db / 20))
    floor = floor.view(-1, *([1] * (x.dim() - 1)))
    return F.l1_loss(torch.log(torch.maximum(y, floor)), torch.log(torch.maximum(x, floor)))


def _stft_loss(y: torch.Tensor, x: torch.Tensor, floor_db: float) -> torch.Tensor:
    """Multi-resolution log-magnitude L1: short windows fix the rhythm's edges, long ones the
    harmonics that make timbre."""
    total = y.new_zeros(())
    for n in (128, 256, 512):
        window = torch.hann_window(n)
        a = torch.stft(y, n, n // 4, n, window, return_complex=True).abs()
        b = torch.stft(x, n, n // 4, n, window, return_complex=True).abs()
        total = total + floored_log_l1(a, b, floor_db)
    return total / 3


def _normalised(wav: torch.Tensor) -> torch.Tensor:
    """The waveform at the level `log_mel` analyses it (mean removed, peak 0.5): the vocoder must
    reproduce that level, since the mel it reads is of it."""
    wav = wav - wav.mean(dim=1, keepdim=True)
    return 0.5 * wav / (wav.abs().amax(dim=1, keepdim=True) + 1e-8)


def train_vocoder(
    pipe: AudioLDMPipeline, mel: AudioDecoder, world: World, t: AudioDecoderTraining, progress: bool
) -> list[float]:
    """Random `vocoder_crop`-frame crops of train-split clips: the mel crop in, the matching stretch
    of the normalised waveform out. Returns the loss of every step."""
    vocoder = pipe.vocoder.train().requires_grad_(True)
    cfg = pipe.vocoder.config
    hop = mel_hop(cfg)
    opt = torch.optim.AdamW(vocoder.parameters(), lr=t.vocoder_lr, betas=(0.8, 0.99))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, t.vocoder_steps))))
    )
    rng = world.rng("audio-decoder", "vocoder", t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    losses = []
    bar = tqdm(range(t.vocoder_steps), desc="audio vocoder", disable=not progress)
    for _ in bar:
        wav = _waves([world.sample("audio", rng, "train") for _ in range(t.vocoder_batch)])
        mels = mel.log_mel(wav)
        target = _normalised(wav)
        frames = min(wav.shape[1] // hop, mels.shape[1])
        crop = min(t.vocoder_crop, frames)
        starts = torch.randint(0, frames - crop + 1, (t.vocoder_batch,), generator=generator)
        m = torch.stack([mels[i, s : s + crop] for i, s in enumerate(starts.tolist())])
        x = torch.stack([target[i, s * hop : (s + crop) * hop] for i, s in enumerate(starts)])
        y = vocoder(m)[:, : x.shape[1]]
        floor = t.vocoder_floor_db
        # unnormalised: a crop's own peak differs from the clip's, so normalising would compare
        # crops at different levels
        loss = floored_log_l1(mel_magnitude(y, cfg), mel_magnitude(x, cfg), floor)
        loss = loss + _stft_loss(y, x, floor)
        loss = loss + t.vocoder_mean_weight * y.mean(dim=1).abs().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vocoder.parameters(), 5.0)
        opt.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    vocoder.eval().requires_grad_(False)
    return losses


@torch.no_grad()
def judge_vocoder(
    pipe: AudioLDMPipeline, mel: AudioDecoder, world: World, judge: Judge, count: int
) -> dict:
    """Judge vocoded real mels (the vocoder's own ceiling) and vocoded autoencoder reconstructions
    (the ceiling of the whole decoder below the UNet), per split; plus the mel L1 of the
    autoencoder."""
    rate = int(pipe.vocoder.config.sampling_rate)
    out: dict[str, Any] = {"vocoded": {}, "through_autoencoder": {}, "autoencoder_mel_l1": {}}
    for split in ("train", "heldout"):
        samples = world.samples("audio", count, split, "audio-decoder-eval")
        gold = [s.attributes for s in samples]
        mels = mel.log_mel(_waves(samples))
        recon = reconstruct(pipe, mels)
        out["autoencoder_mel_l1"][split] = round(F.l1_loss(recon, mels).item(), 4)
        out["vocoded"][split] = _accuracy(judge, pipe.vocoder(mels).numpy(), gold, rate)
        out["through_autoencoder"][split] = _accuracy(
            judge, pipe.vocoder(recon).numpy(), gold, rate
        )
    return out


# ---- 3. text encoder ----------------------------------------------------------------------------
def _tokens(pipe: AudioLDMPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask exactly as AudioLDM's `_encode_prompt` makes them."""
    enc = pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return enc.input_ids, enc.attention_mask


def _embed(pipe: AudioLDMPipeline, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The normalised CLAP text projection: what AudioLDM conditions its UNet on."""
    return F.normalize(pipe.text_encoder(ids, attention_mask=mask).text_embeds, dim=-1)


def train_wordings(world: World) -> list[tuple[str, dict[str, str]]]:
    """Every train combination in every caption template, with its attributes: what the text
    encoder learns from (each wording, not only the canonical caption, so the vector follows the
    words rather than one sentence shape)."""
    attributes = world.attributes("audio")
    return [
        (template.format(**{a.name: a.phrase(c[a.name]) for a in attributes}), c)
        for c in world.combinations("audio", "train")
        for template in TEMPLATES["audio"]
    ]


def train_text_encoder(
    pipe: AudioLDMPipeline, world: World, t: AudioDecoderTraining, progress: bool
) -> dict:
    """Probe every attribute from the normalised projection, on every wording of the train
    combinations; then freeze. Probing the projection itself (not hidden states) makes the one
    vector the UNet sees carry each attribute. Returns the probes' accuracy on held-out canonical
    captions."""
    encoder = pipe.text_encoder.train().requires_grad_(True)
    attributes = world.attributes("audio")
    width = encoder.config.projection_dim
    probes = nn.ModuleDict({a.name: nn.Linear(width, len(a.values)) for a in attributes})
    captions = train_wordings(world)
    ids, mask = _tokens(pipe, [text for text, _ in captions])
    targets = {
        a.name: torch.tensor([a.values.index(c[a.name]) for _, c in captions]) for a in attributes
    }

    def logits(i: torch.Tensor, m: torch.Tensor) -> dict[str, torch.Tensor]:
        # x10: a unit vector's logits would otherwise need large probe weights to be confident
        h = 10.0 * _embed(pipe, i, m)
        return {name: probe(h) for name, probe in probes.items()}

    params = list(encoder.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=t.text_lr)
    generator = torch.Generator().manual_seed(t.seed)
    for _ in tqdm(range(t.text_steps), desc="audio text encoder", disable=not progress):
        idx = torch.randint(0, len(captions), (t.text_batch,), generator=generator)
        out = logits(ids[idx], mask[idx])
        loss = sum(F.cross_entropy(out[k], targets[k][idx]) for k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    heldout = world.combinations("audio", "heldout")
    with torch.no_grad():
        out = logits(*_tokens(pipe, [world.caption("audio", c) for c in heldout]))
    scores = {}
    for a in attributes:
        hits = [a.values[i] == c[a.name] for i, c in zip(out[a.name].argmax(-1).tolist(), heldout)]
        scores[a.name] = round(float(np.mean(hits)), 4)
    return scores


# ---- 4. UNet ------------------------------------------------------------------------------------
@torch.no_grad()
def judge_generations(
    pipe: AudioLDMPipeline, world: World, judge: Judge, t: AudioDecoderTraining
) -> dict:
    """Generate `eval_per_combo` one-second clips of every combination from its canonical caption,
    conditioned as NExT-GPT does (prompt embeddings, not prompts), and judge them, per split."""
    pipe.unet.eval()
    rate = int(pipe.vocoder.config.sampling_rate)
    negative = _embed(pipe, *_tokens(pipe, [""]))
    metrics: dict[str, Any] = {}
    for split in ("train", "heldout"):
        gold = [c for c in world.combinations("audio", split) for _ in range(t.eval_per_combo)]
        cond = _embed(pipe, *_tokens(pipe, [world.caption("audio", c) for c in gold]))
        audios = pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=negative.expand(len(gold), -1),
            audio_length_in_s=1.0,
            num_inference_steps=t.eval_steps,
            guidance_scale=t.guidance,
            generator=torch.Generator().manual_seed(t.seed),
            output_type="np",
        ).audios
        metrics[split] = _accuracy(judge, list(audios), gold, rate)
    return metrics


def train_unet(
    pipe: AudioLDMPipeline,
    mel: AudioDecoder,
    world: World,
    t: AudioDecoderTraining,
    evaluate: Callable[[], dict],
    progress: bool,
) -> list[dict]:
    """The shared denoiser loop (`train_denoiser`) on mel latents of freshly rendered train
    clips, conditioned through the class embedding on the frozen text projection of their
    canonical captions."""
    scale = pipe.vae.config.scaling_factor
    return train_denoiser(
        pipe,
        world,
        "audio",
        t,
        encode_captions=lambda texts: _embed(pipe, *_tokens(pipe, texts)),
        latents_of=lambda samples, generator: (
            pipe.vae.encode(mel.log_mel(_waves(samples)).unsqueeze(1)).latent_dist.sample(generator)
            * scale
        ),
        predict=lambda noisy, steps, c: (
            pipe.unet(noisy, steps, encoder_hidden_states=None, class_labels=c).sample
        ),
        evaluate=evaluate,
        progress=progress,
        name="audio UNet",
    )


def pretrain_audio_front(
    world: World, judge: Judge, t: AudioDecoderTraining, progress: bool = False
) -> tuple[AudioLDMPipeline, dict, torch.Tensor]:
    """The phases before the UNet (autoencoder, vocoder, text encoder); returns the pipeline,
    their metrics and the torch RNG state that `pretrain_audio_unet` continues from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        pipe = build_pipeline(t)
        mel = _mel_view(pipe, t.arch)
        metrics: dict[str, Any] = {}

        start = time.perf_counter()
        losses = train_autoencoder(pipe, mel, world, t, progress)
        metrics["autoencoder"] = {
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(losses[-1], 4) if losses else None,
            "scaling_factor": round(float(pipe.vae.config.scaling_factor), 5),
            "seconds": round(time.perf_counter() - start, 1),
        }

        start = time.perf_counter()
        losses = train_vocoder(pipe, mel, world, t, progress)
        seconds = round(time.perf_counter() - start, 1)
        judged = judge_vocoder(pipe, mel, world, judge, t.eval_clips)
        metrics["autoencoder"]["mel_l1"] = judged["autoencoder_mel_l1"]
        metrics["autoencoder"].update(judged["through_autoencoder"])
        metrics["vocoder"] = {
            **judged["vocoded"],
            "loss_first": round(losses[0], 4) if losses else None,
            "loss_last": round(losses[-1], 4) if losses else None,
            "parameters": sum(p.numel() for p in pipe.vocoder.parameters()),
            "seconds": seconds,
        }
        tqdm.write(f"audio autoencoder {metrics['autoencoder']}")
        tqdm.write(f"audio vocoder {metrics['vocoder']}")

        start = time.perf_counter()
        metrics["text_encoder"] = {"heldout_probes": train_text_encoder(pipe, world, t, progress)}
        metrics["text_encoder"]["seconds"] = round(time.perf_counter() - start, 1)

        return pipe, metrics, torch.get_rng_state()


def pretrain_audio_unet(
    pipe: AudioLDMPipeline,
    world: World,
    judge: Judge,
    t: AudioDecoderTraining,
    rng_state: torch.Tensor,
    progress: bool = False,
) -> dict:
    """The UNet phase on `pretrain_audio_front`'s pipeline; returns its metrics."""
    mel = _mel_view(pipe, t.arch)
    evaluate = lambda: judge_generations(pipe, world, judge, t)  # noqa: E731
    return unet_phase(lambda: train_unet(pipe, mel, world, t, evaluate, progress), rng_state)


def pretrain_audio_decoder(
    world: World, judge: Judge, t: AudioDecoderTraining, progress: bool = False
) -> tuple[AudioLDMPipeline, dict]:
    """All four phases in one process; returns the trained pipeline and the metrics to record."""
    pipe, metrics, rng_state = pretrain_audio_front(world, judge, t, progress)
    metrics.update(pretrain_audio_unet(pipe, world, judge, t, rng_state, progress))
    return pipe, metrics
