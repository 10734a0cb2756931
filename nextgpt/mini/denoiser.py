"""The denoiser training loop shared by the miniature's image, video and audio decoders.

Each decoder trains its UNet the same way: freshly rendered train-split samples, encoded to
latents by the frozen autoencoder, noised at a uniformly drawn timestep, regressed on the
scheduler's target (`diffusion_target`: epsilon, or v under a zero-terminal-SNR schedule), and
conditioned on the frozen text encoder's output for the sample's canonical caption, the empty
caption `caption_dropout` of the time so classifier-free guidance works. What differs between the
decoders is only how samples become latents, how captions become conditioning and how the UNet
takes it, so those come in as functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nextgpt.decoders.base import diffusion_target
from nextgpt.mini.world import Sample, World, combination_key


class DenoiserSchedule(Protocol):
    """The fields of a decoder's training settings that the UNet loop reads."""

    unet_steps: int
    unet_batch: int
    unet_lr: float
    warmup: int
    caption_dropout: float
    eval_every: int
    seed: int


def denoising_step(
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    unet: torch.nn.Module,
    latents: torch.Tensor,
    cond: torch.Tensor,
    alphas: torch.Tensor,
    kind: str,
    generator: torch.Generator,
) -> float:
    """One optimiser step of the denoising loss on `latents` under `cond`: a uniform timestep
    and Gaussian noise per sample, drawn from `generator` in that order (so a run that draws
    the same way reproduces), the scheduler's target, gradients clipped to norm 1. Shared by
    `train_denoiser` and the probes that fine-tune a decoder's UNet. Returns the loss."""
    steps = torch.randint(0, len(alphas), (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    a = alphas[steps].view(-1, *[1] * (latents.dim() - 1))
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    loss = F.mse_loss(predict(noisy, steps, cond), diffusion_target(kind, latents, noise, a))
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    return loss.item()


def train_denoiser(
    pipe: Any,
    world: World,
    modality: str,
    t: DenoiserSchedule,
    *,
    encode_captions: Callable[[list[str]], torch.Tensor],
    latents_of: Callable[[list[Sample], torch.Generator], torch.Tensor],
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    evaluate: Callable[[], dict],
    progress: bool,
    name: str,
) -> list[dict]:
    """Train `pipe.unet` for `t.unet_steps` steps; return the judged evaluations taken every
    `t.eval_every` steps and at the end, each with the mean loss since the previous one.

    `encode_captions` maps captions to conditioning rows (one per caption), `latents_of` rendered
    samples to scaled latents (drawing any randomness from the generator it is given), and
    `predict(noisy, timesteps, cond)` runs the UNet. Every random draw comes from generators
    seeded by `t.seed`, in a fixed order, so a run is reproducible.
    """
    unet = pipe.unet.train().requires_grad_(True)
    combos = world.combinations(modality, "train")
    index = {combination_key(c): i for i, c in enumerate(combos)}
    with torch.no_grad():
        cond = encode_captions([world.caption(modality, c) for c in combos])
        empty = encode_captions([""])
    opt = torch.optim.AdamW(unet.parameters(), lr=t.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / t.warmup))
    alphas = pipe.scheduler.alphas_cumprod.float()
    kind = pipe.scheduler.config.prediction_type
    rng = world.rng(f"{modality}-decoder", "unet", t.seed)
    generator = torch.Generator().manual_seed(t.seed)
    history: list[dict] = []
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(1, t.unet_steps + 1), desc=name, disable=not progress)
    for step in bar:
        samples = [world.sample(modality, rng, "train") for _ in range(t.unet_batch)]
        with torch.no_grad():
            latents = latents_of(samples, generator)
        rows = torch.tensor([index[combination_key(s.attributes)] for s in samples])
        drop = torch.rand(t.unet_batch, generator=generator) < t.caption_dropout
        c = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), empty, cond[rows])
        loss = denoising_step(predict, opt, unet, latents, c, alphas, kind, generator)
        schedule.step()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step == t.unet_steps or (t.eval_every and step % t.eval_every == 0):
            row = {
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                "loss": round(float(np.mean(losses)), 4),
                **evaluate(),
            }
            losses = []
            history.append(row)
            unet.train()
            tqdm.write(f"{name} {row}")
    unet.eval().requires_grad_(False)
    return history


def unet_phase(train: Callable[[], list[dict]], rng_state: torch.Tensor) -> dict[str, Any]:
    """Run a decoder's UNet phase (`train` returns `train_denoiser`'s history) from the torch RNG
    state that the decoder's earlier phases left, and return the metrics every decoder records
    for it.

    Taking the state in is what lets the build run the phases before the UNet as a part of their
    own: stages 2 and 3 need only a decoder's text encoder, so they can train while the UNets do,
    and the UNet still trains to the same weights as when every phase runs in one process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng_state)
        start = time.perf_counter()
        history = train()
    return {
        "unet": {"seconds": round(time.perf_counter() - start, 1), "history": history},
        "generations": {k: history[-1][k] for k in ("train", "heldout")},
    }
