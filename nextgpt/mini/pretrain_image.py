"""Pretrain the miniature's image decoder (a tiny StableDiffusionPipeline) on world images.

The order follows docs/mini-design.md: the autoencoder first (GroupNorm with 8 groups, since one
channel per group washes out colour), checked by judging its reconstructions; then the CLIP text
encoder, pretrained with per-attribute linear probes and frozen, so the UNet sees conditioning that
already separates the attributes from its first step; then the UNet on the denoising loss, with 10%
empty captions for classifier-free guidance. Only train-split combinations are ever trained on;
generations are judged against the gold caption on train and held-out combinations.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from torch import nn
from tqdm import tqdm

from nextgpt.config import TinyDecoderArch
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.mini.denoiser import train_denoiser, unet_phase
from nextgpt.mini.judges import Judge
from nextgpt.mini.world import TEMPLATES, World, caption_words


def _image_arch() -> TinyDecoderArch:
    """A word-level text encoder (one token per caption word, no transformer layers): each
    attribute word then lands in one conditioning row, which NExT-GPT's output projector can hit
    row by row; with the character-level one the held-out colours came out wrong through the
    whole path (docs/mini-design.md, section 8)."""
    return TinyDecoderArch(
        norm_groups=8, text_words=caption_words("image"), text_layers=0, text_max_length=16
    )


@dataclass(frozen=True)
class ImageDecoderTraining:
    """Steps and sizes of each phase; the defaults are the full build's (about 31 minutes at one
    thread). With word tokens every attribute of both splits is drawn right from 1,500 UNet steps
    on, where the character-level encoder needed 2,500 for train combinations alone."""

    arch: TinyDecoderArch = field(default_factory=_image_arch)
    ae_steps: int = 400
    ae_batch: int = 32
    ae_lr: float = 1e-3
    text_steps: int = 300
    text_batch: int = 64
    text_lr: float = 2e-3
    unet_steps: int = 1500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    warmup: int = 100
    caption_dropout: float = 0.1
    eval_every: int = 500  # UNet steps between judged evaluations (0: only at the end)
    eval_per_combo: int = 4  # generated images per combination and evaluation
    eval_steps: int = 20  # DDIM steps when sampling for evaluation
    guidance: float = 4.0
    seed: int = 0


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [-1, 1], the VAE's input range."""
    x = torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images]))
    return x.permute(0, 3, 1, 2) / 127.5 - 1.0


def _images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def _accuracy(judge: Judge, images: list[Image.Image], gold: list[dict[str, str]]) -> dict:
    """Per-attribute share of images whose judged value is the gold one."""
    seen = judge.predict(images)
    return {
        name: round(float(np.mean([s[name] == g[name] for s, g in zip(seen, gold)])), 4)
        for name in judge.config.attributes
    }


def train_autoencoder(
    pipe: StableDiffusionPipeline, world: World, t: ImageDecoderTraining, progress: bool
) -> None:
    """L1 plus L1 on 4x4-pooled colour plus a tiny KL; then set the latents' scaling factor."""
    vae = pipe.vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=t.ae_lr)
    rng = world.rng("image-decoder", "ae", t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    for _ in tqdm(range(t.ae_steps), desc="image autoencoder", disable=not progress):
        x = _pixels([world.sample("image", rng, "train").media for _ in range(t.ae_batch)])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        loss = F.l1_loss(y, x) + F.l1_loss(F.avg_pool2d(y, 4), F.avg_pool2d(x, 4))
        loss = loss + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = _pixels([s.media for s in world.samples("image", 256, "train", "ae-scale", t.seed)])
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)


@torch.no_grad()
def judge_reconstructions(
    pipe: StableDiffusionPipeline, world: World, judge: Judge, split: str, count: int
) -> dict:
    samples = world.samples("image", count, split, "ae-eval")
    x = _pixels([s.media for s in samples])
    y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    metrics = _accuracy(judge, _images(y), [s.attributes for s in samples])
    metrics["mse"] = round(F.mse_loss((y + 1) / 2, (x + 1) / 2).item(), 5)
    return metrics


def _tokens(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as `encode_prompt` makes them (padded to the maximum length)."""
    return pipe.tokenizer(
        captions,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def train_text_encoder(
    pipe: StableDiffusionPipeline, world: World, t: ImageDecoderTraining, progress: bool
) -> dict:
    """The image decoder's CLIP text encoder, probed and frozen (`train_probed_text_encoder`)."""
    return train_probed_text_encoder(
        pipe, world, "image", t.text_steps, t.text_batch, t.text_lr, t.seed, progress
    )


def train_probed_text_encoder(
    pipe: Any,
    world: World,
    modality: str,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    progress: bool = False,
) -> dict:
    """Probe every attribute from the pooled and mean token states, on every wording of the train
    combinations of `modality`; then freeze. Returns the probes' accuracy on held-out canonical
    captions. The image and video decoders (both CLIP) share it."""
    encoder = pipe.text_encoder.train().requires_grad_(True)
    attributes = world.attributes(modality)
    width = encoder.config.hidden_size
    probes = nn.ModuleDict({a.name: nn.Linear(2 * width, len(a.values)) for a in attributes})
    combos = world.combinations(modality, "train")
    captions = [
        (template.format(**{a.name: a.phrase(c[a.name]) for a in attributes}), c)
        for c in combos
        for template in TEMPLATES[modality]
    ]
    ids = _tokens(pipe, [text for text, _ in captions])
    targets = {
        a.name: torch.tensor([a.values.index(c[a.name]) for _, c in captions]) for a in attributes
    }

    def logits(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        out = encoder(tokens)
        h = torch.cat([out.pooler_output, out.last_hidden_state.mean(1)], dim=-1)
        return {name: probe(h) for name, probe in probes.items()}

    params = list(encoder.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=f"{modality} text encoder", disable=not progress):
        idx = torch.randint(0, len(captions), (batch,), generator=generator)
        out = logits(ids[idx])
        loss = sum(F.cross_entropy(out[k], targets[k][idx]) for k in out)
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    heldout = world.combinations(modality, "heldout")
    with torch.no_grad():
        out = logits(_tokens(pipe, [world.caption(modality, c) for c in heldout]))
    scores = {}
    for a in attributes:
        hits = [a.values[i] == c[a.name] for i, c in zip(out[a.name].argmax(-1).tolist(), heldout)]
        scores[a.name] = round(float(np.mean(hits)), 4)
    return scores


@torch.no_grad()
def judge_generations(
    pipe: StableDiffusionPipeline, world: World, judge: Judge, t: ImageDecoderTraining
) -> dict:
    """Generate `eval_per_combo` images of every combination from its canonical caption and judge
    them against it, per split."""
    pipe.unet.eval()
    metrics: dict[str, Any] = {}
    for split in ("train", "heldout"):
        gold = [c for c in world.combinations("image", split) for _ in range(t.eval_per_combo)]
        prompts = [world.caption("image", c) for c in gold]
        images = pipe(
            prompt=prompts,
            negative_prompt=[""] * len(prompts),
            num_inference_steps=t.eval_steps,
            guidance_scale=t.guidance,
            height=t.arch.sample_size,
            width=t.arch.sample_size,
            generator=torch.Generator().manual_seed(t.seed),
            output_type="pil",
        ).images
        metrics[split] = _accuracy(judge, images, gold)
    return metrics


def train_unet(
    pipe: StableDiffusionPipeline,
    world: World,
    t: ImageDecoderTraining,
    evaluate: Callable[[], dict],
    progress: bool,
) -> list[dict]:
    """The shared denoiser loop (`train_denoiser`) on latents of freshly rendered train images,
    conditioned on the frozen text encoder's states of their canonical captions."""
    scale = pipe.vae.config.scaling_factor
    return train_denoiser(
        pipe,
        world,
        "image",
        t,
        encode_captions=lambda texts: pipe.text_encoder(_tokens(pipe, texts)).last_hidden_state,
        latents_of=lambda samples, generator: (
            pipe.vae.encode(_pixels([s.media for s in samples])).latent_dist.sample(generator)
            * scale
        ),
        predict=lambda noisy, steps, c: pipe.unet(noisy, steps, encoder_hidden_states=c).sample,
        evaluate=evaluate,
        progress=progress,
        name="image UNet",
    )


def pretrain_image_front(
    world: World, judge: Judge, t: ImageDecoderTraining, progress: bool = False
) -> tuple[StableDiffusionPipeline, dict, torch.Tensor]:
    """The phases before the UNet (autoencoder, text encoder); returns the pipeline, their
    metrics and the torch RNG state that `pretrain_image_unet` continues from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        pipe = build_tiny_pipeline("image", t.arch, t.seed)
        metrics: dict[str, Any] = {}
        start = time.perf_counter()
        train_autoencoder(pipe, world, t, progress)
        metrics["autoencoder"] = {
            split: judge_reconstructions(pipe, world, judge, split, 200)
            for split in ("train", "heldout")
        }
        metrics["autoencoder"]["seconds"] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()
        metrics["text_encoder"] = {"heldout_probes": train_text_encoder(pipe, world, t, progress)}
        metrics["text_encoder"]["seconds"] = round(time.perf_counter() - start, 1)
        return pipe, metrics, torch.get_rng_state()


def pretrain_image_unet(
    pipe: StableDiffusionPipeline,
    world: World,
    judge: Judge,
    t: ImageDecoderTraining,
    rng_state: torch.Tensor,
    progress: bool = False,
) -> dict:
    """The UNet phase on `pretrain_image_front`'s pipeline; returns its metrics."""
    evaluate = lambda: judge_generations(pipe, world, judge, t)  # noqa: E731
    return unet_phase(lambda: train_unet(pipe, world, t, evaluate, progress), rng_state)


def pretrain_image_decoder(
    world: World, judge: Judge, t: ImageDecoderTraining, progress: bool = False
) -> tuple[StableDiffusionPipeline, dict]:
    """All three phases in one process; returns the trained pipeline and the metrics to record."""
    pipe, metrics, rng_state = pretrain_image_front(world, judge, t, progress)
    metrics.update(pretrain_image_unet(pipe, world, judge, t, rng_state, progress))
    return pipe, metrics
