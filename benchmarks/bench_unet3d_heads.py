"""Video UNet3D training step: the miniature's attention layout vs wider heads.

diffusers' 3D blocks read `attention_head_dim` as the width of a head, where the 2D blocks read
it as the number of heads (the naming quirk diffusers keeps for old configs). The miniature
passes its 2 heads, so its UNet3D attends with heads 2 channels wide (16 heads at 32 channels).
This times one AdamW step at the build's batch (16 videos of 8 frames, 8x8x4 latents) for the
current layout and for heads 16 wide, alternating runs so noise hits both alike.

    .venv/bin/python benchmarks/bench_unet3d_heads.py [--repeats 5] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet3DConditionModel

from nextgpt.decoders.tiny import _unet_kwargs
from nextgpt.mini.pretrain_video import _video_arch


def unet(head_dim: int) -> UNet3DConditionModel:
    kwargs = _unet_kwargs(_video_arch(), "3D")
    kwargs["attention_head_dim"] = head_dim
    torch.manual_seed(0)
    return UNet3DConditionModel(**kwargs)


def step_seconds(model: UNet3DConditionModel, steps: int, batch: int, frames: int) -> float:
    arch = _video_arch()
    side = model.config.sample_size
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, arch.latent_channels, frames, side, side)
    cond = torch.randn(batch, arch.text_max_length, arch.text_width)
    t = torch.randint(0, 1000, (batch,))
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(x, t, encoder_hidden_states=cond).sample.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {d: unet(d) for d in (2, 16)}
    for d, m in models.items():
        print(f"head width {d}: {sum(p.numel() for p in m.parameters()):,} parameters")
    times: dict[int, list[float]] = {d: [] for d in models}
    for m in models.values():  # warm-up
        step_seconds(m, 1, args.batch, args.frames)
    for _ in range(args.repeats):
        for d, m in models.items():
            times[d].append(step_seconds(m, args.steps, args.batch, args.frames))
    med = {d: statistics.median(v) for d, v in times.items()}
    for d in models:
        print(f"head width {d:2d}: {med[d]:.3f} s/step (median of {args.repeats})")
    print(f"ratio width 16 / width 2: {med[16] / med[2]:.2f}")


if __name__ == "__main__":
    main()
