"""Pretrain the miniature's video decoder (a tiny TextToVideoSDPipeline) on world videos.

It follows `pretrain_image.py` phase for phase, for the same reasons (docs/mini-design.md):
- the autoencoder first, trained per frame as Zeroscope's is, with 8 GroupNorm groups (one channel
  per group washes out colour) and three levels, so 32x32 frames become 8x8 latents: the UNet3D
  costs about 2.7 s/step on 16x16 latents and about 1 s/step on 8x8 (section 5C), and the 30
  minute budget only fits the latter;
- then the CLIP text encoder, pretrained with per-attribute linear probes on every wording of the
  train combinations and frozen, so the UNet3D sees conditioning that already separates shape,
  colour and direction from its first step;
- then the UNet3D on the denoising loss over (B, C, F, h, w) latents, with 10% empty captions for
  classifier-free guidance.
Only train-split combinations are ever trained on; generations are judged against the gold caption
on train and held-out combinations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import TextToVideoSDPipeline
from tqdm import tqdm

from nextgpt.config import TinyDecoderArch
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.mini.denoiser import train_denoiser, unet_phase
from nextgpt.mini.judges import Judge
from nextgpt.mini.pretrain_image import _tokens, train_probed_text_encoder
from nextgpt.mini.world import World, caption_words

MODALITY = "video"


def _video_arch() -> TinyDecoderArch:
    """(32, 64, 64): two downsamplings, 32x32 frames -> 8x8x4 latents. Zero terminal SNR: under
    SD's schedule the UNet3D learned to read the trajectory out of the starting noise, so its
    videos moved in a random direction whatever the caption said (0.25 after 2,400 steps). With
    the rescaled schedule the axis of motion binds within 300 steps and its sign after about
    1,500: 1.00 at 2,400 (docs/mini-design.md, section 8). Word tokens, one conditioning row per
    caption word, bind all three attributes on train combinations by 1,200 steps."""
    return TinyDecoderArch(
        norm_groups=8,
        vae_channels=(32, 64, 64),
        block_channels=(32, 64),
        zero_terminal_snr=True,
        text_words=caption_words("video"),
        text_layers=0,
        text_max_length=16,
    )


@dataclass(frozen=True)
class VideoDecoderTraining:
    """Steps and sizes of each phase; the defaults are the full build's (about 55 minutes at one
    thread, most of it the UNet3D's)."""

    arch: TinyDecoderArch = field(default_factory=_video_arch)
    ae_steps: int = 400  # 0.40-0.59 s/step at one thread: 3-4 minutes
    ae_batch: int = 32  # frames, each from a different video
    ae_lr: float = 1e-3
    ae_eval_videos: int = 100  # reconstructed videos judged per split
    text_steps: int = 300
    text_batch: int = 64
    text_lr: float = 2e-3
    # 0.93 s/step at batch 16 on one core. Direction binds last (under the zero-SNR schedule:
    # 0.50 at 1,200 steps, 1.00 at 1,800 with character tokens; with word tokens 1.00 on train
    # combinations at 1,200), so it gets 1,800 steps
    unet_steps: int = 1800
    unet_batch: int = 16
    unet_lr: float = 1e-3
    warmup: int = 50
    caption_dropout: float = 0.1
    eval_every: int = 600  # UNet steps between judged evaluations (0: only at the end)
    eval_per_combo: int = 1  # generated videos per combination and evaluation
    # train combinations evaluated (spread over all 36; 0: all); every held-out one always is
    eval_train_combos: int = 12
    eval_steps: int = 15  # DDIM steps when sampling for evaluation (24 videos: about 16 s)
    guidance: float = 4.0
    seed: int = 0

    @classmethod
    def smoke(cls) -> VideoDecoderTraining:
        """Seconds: proves every phase runs and the pipeline saves and reloads."""
        return cls(
            ae_steps=2,
            ae_batch=4,
            ae_eval_videos=2,
            text_steps=2,
            text_batch=8,
            unet_steps=2,
            unet_batch=2,
            warmup=1,
            eval_every=0,
            eval_train_combos=2,
            eval_steps=2,
        )


def _pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> (N, 3, H, W) in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float()
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def _uint8(x: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def _accuracy(judge: Judge, videos: list[np.ndarray], gold: list[dict[str, str]], fps: float):
    """Per-attribute share of videos whose judged value is the gold one."""
    seen = judge.predict([(v, fps) for v in videos])
    return {
        name: round(float(np.mean([s[name] == g[name] for s, g in zip(seen, gold)])), 4)
        for name in judge.config.attributes
    }


def _encode(pipe: TextToVideoSDPipeline, videos: torch.Tensor, generator: torch.Generator):
    """Pixel videos (B, F, 3, H, W) -> scaled latents (B, C, F, h, w), each frame on its own, as
    `VideoDecoder._latents` and the pipeline's `decode_latents` lay them out."""
    b, f = videos.shape[:2]
    latents = pipe.vae.encode(videos.flatten(0, 1)).latent_dist.sample(generator)
    latents = latents * pipe.vae.config.scaling_factor
    return latents.unflatten(0, (b, f)).permute(0, 2, 1, 3, 4)


def train_autoencoder(
    pipe: TextToVideoSDPipeline, world: World, t: VideoDecoderTraining, progress: bool
) -> list[float]:
    """L1 plus L1 on 4x4-pooled colour plus a tiny KL, on single frames (one random frame from
    each of `ae_batch` fresh train videos, so a batch is not eight near-copies of one shape); then
    set the latents' scaling factor to 1/std so the UNet3D sees unit-variance latents. Returns the
    loss per step."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=t.ae_lr)
    rng = world.rng("video-decoder", "ae", t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    losses = []
    for _ in tqdm(range(t.ae_steps), desc="video autoencoder", disable=not progress):
        frames = []
        for _ in range(t.ae_batch):
            video, _ = world.sample(MODALITY, rng, "train").media
            frames.append(video[int(rng.integers(len(video)))])
        x = _pixels(np.stack(frames))
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(y, x) + F.l1_loss(F.avg_pool2d(y, 4), F.avg_pool2d(x, 4))
        loss = loss + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        samples = world.samples(MODALITY, 32, "train", "ae-scale", t.seed)
        x = _pixels(np.concatenate([s.media[0] for s in samples]))
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


@torch.no_grad()
def judge_reconstructions(
    pipe: TextToVideoSDPipeline, world: World, judge: Judge, split: str, count: int
) -> dict:
    """Whole videos through the autoencoder frame by frame, judged: the ceiling the UNet3D's
    generations can reach, and whether held-out colours and motion survive encoding."""
    samples = world.samples(MODALITY, count, split, "ae-eval")
    frames = world.config.video_frames
    x = _pixels(np.concatenate([s.media[0] for s in samples]))
    y = torch.cat(
        [pipe.vae.decode(pipe.vae.encode(chunk).latent_dist.mean).sample for chunk in x.split(256)]
    )
    videos = list(_uint8(y).reshape(count, frames, *y.shape[2:], 3))
    metrics = _accuracy(judge, videos, [s.attributes for s in samples], world.config.video_fps)
    metrics["mse"] = round(F.mse_loss((y + 1) / 2, (x + 1) / 2).item(), 5)
    return metrics


def _eval_combos(world: World, split: str, count: int) -> list[dict[str, str]]:
    """`count` combinations spread evenly over the split's fixed order (0: all of them), so a
    cheap evaluation still covers every shape, colour and direction."""
    combos = world.combinations(MODALITY, split)
    if not count or count >= len(combos):
        return combos
    return [combos[i] for i in np.linspace(0, len(combos) - 1, count).round().astype(int)]


@torch.no_grad()
def generate(
    pipe: TextToVideoSDPipeline,
    prompts: list[str],
    t: VideoDecoderTraining,
    frames: int = 8,
) -> list[np.ndarray]:
    """Videos from captions through the pipeline, as uint8 (F, H, W, 3): what NExT-GPT's
    VideoDecoder will call, with the evaluation's sampler settings."""
    out = pipe(
        prompt=prompts,
        negative_prompt=[""] * len(prompts),
        num_frames=frames,
        height=t.arch.sample_size,
        width=t.arch.sample_size,
        num_inference_steps=t.eval_steps,
        guidance_scale=t.guidance,
        generator=torch.Generator().manual_seed(t.seed),
        output_type="np",
    ).frames
    return [(np.clip(v, 0.0, 1.0) * 255).round().astype(np.uint8) for v in out]


def judge_generations(
    pipe: TextToVideoSDPipeline, world: World, judge: Judge, t: VideoDecoderTraining
) -> dict:
    """Generate `eval_per_combo` videos of each evaluated combination from its canonical caption
    and judge them against it, per split."""
    pipe.unet.eval()
    counts = {"train": t.eval_train_combos, "heldout": 0}
    metrics: dict[str, Any] = {}
    for split in ("train", "heldout"):
        gold = [
            c for c in _eval_combos(world, split, counts[split]) for _ in range(t.eval_per_combo)
        ]
        videos = generate(
            pipe, [world.caption(MODALITY, c) for c in gold], t, world.config.video_frames
        )
        metrics[split] = _accuracy(judge, videos, gold, world.config.video_fps)
    return metrics


def train_unet(
    pipe: TextToVideoSDPipeline,
    world: World,
    t: VideoDecoderTraining,
    evaluate: Callable[[], dict],
    progress: bool,
) -> list[dict]:
    """The shared denoiser loop (`train_denoiser`) on (B, C, F, h, w) latents of freshly rendered
    train videos, conditioned on the frozen text encoder's states of their canonical captions."""
    return train_denoiser(
        pipe,
        world,
        MODALITY,
        t,
        encode_captions=lambda texts: pipe.text_encoder(_tokens(pipe, texts)).last_hidden_state,
        latents_of=lambda samples, generator: _encode(
            pipe, torch.stack([_pixels(s.media[0]) for s in samples]), generator
        ),
        predict=lambda noisy, steps, c: pipe.unet(noisy, steps, encoder_hidden_states=c).sample,
        evaluate=evaluate,
        progress=progress,
        name="video UNet3D",
    )


def pretrain_video_front(
    world: World, judge: Judge, t: VideoDecoderTraining, progress: bool = False
) -> tuple[TextToVideoSDPipeline, dict, torch.Tensor]:
    """The phases before the UNet (autoencoder, text encoder); returns the pipeline, their
    metrics and the torch RNG state that `pretrain_video_unet` continues from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        pipe = build_tiny_pipeline(MODALITY, t.arch, t.seed)
        metrics: dict[str, Any] = {}
        start = time.perf_counter()
        losses = train_autoencoder(pipe, world, t, progress)
        metrics["autoencoder"] = {
            split: judge_reconstructions(pipe, world, judge, split, t.ae_eval_videos)
            for split in ("train", "heldout")
        }
        metrics["autoencoder"]["final_loss"] = round(float(np.mean(losses[-20:])), 4)
        metrics["autoencoder"]["seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        probes = train_probed_text_encoder(
            pipe, world, MODALITY, t.text_steps, t.text_batch, t.text_lr, t.seed, progress
        )
        metrics["text_encoder"] = {
            "heldout_probes": probes,
            "seconds": round(time.perf_counter() - start, 1),
        }
        return pipe, metrics, torch.get_rng_state()


def pretrain_video_unet(
    pipe: TextToVideoSDPipeline,
    world: World,
    judge: Judge,
    t: VideoDecoderTraining,
    rng_state: torch.Tensor,
    progress: bool = False,
) -> dict:
    """The UNet3D phase on `pretrain_video_front`'s pipeline; returns its metrics."""
    evaluate = lambda: judge_generations(pipe, world, judge, t)  # noqa: E731
    return unet_phase(lambda: train_unet(pipe, world, t, evaluate, progress), rng_state)


def pretrain_video_decoder(
    world: World, judge: Judge, t: VideoDecoderTraining, progress: bool = False
) -> tuple[TextToVideoSDPipeline, dict]:
    """All three phases in one process; returns the trained pipeline and the metrics to record
    (the same keys as the image decoder's: autoencoder, text_encoder, unet, generations)."""
    pipe, metrics, rng_state = pretrain_video_front(world, judge, t, progress)
    metrics.update(pretrain_video_unet(pipe, world, judge, t, rng_state, progress))
    return pipe, metrics
