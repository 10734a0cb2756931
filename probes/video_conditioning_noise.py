"""Probe: does the video UNet3D draw near-miss conditioning right once it has been trained on
noisy caption encodings? (docs/mini-design.md section 8, "The video decoder and near-miss rows")

A linear output projector writes every held-out video request's conditioning nearer its own
caption's encoding than any other caption's (read-back 1.00), about 1 % of the way to the
nearest caption of another colour, yet the video decoder draws some of those requests in the
wrong colour: it was trained on exact caption encodings only. This probe keeps the model's
conditioning for the eval's video requests (train and held-out), fine-tunes a float32 copy of its
video UNet3D for `--steps` more steps with Gaussian noise of standard deviation `--sigma` added
to every element of each kept caption's encoding (empty captions stay exact, as guidance reads
them), and judges what it then draws from that conditioning and from the gold caption.
`--sigma 0` is the control (the same fine-tuning without noise); `--steps 0` judges the decoder
as it is.

    python probes/video_conditioning_noise.py MODEL --steps 0
    python probes/video_conditioning_noise.py MODEL --steps 300 --sigma 0.15
"""

from __future__ import annotations

import argparse
import collections
import copy

import numpy as np
import torch
from projector_tap import ProjectorTap

from nextgpt.mini.denoiser import denoising_step
from nextgpt.mini.evaluate import judges_dir, load_judges
from nextgpt.mini.pretrain_image import _tokens
from nextgpt.mini.pretrain_video import _encode, _pixels
from nextgpt.mini.world import World, WorldConfig, combination_key
from nextgpt.model import NextGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="nextgpt-mini", help="name or directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sigma", type=float, default=0.15, help="noise on each element")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = NextGPT.from_pretrained(args.model)
    world = World(WorldConfig(seed=0))
    judges = load_judges(judges_dir(args.model, None))
    requests = ProjectorTap(model, "video").requests(world)

    pipe = copy.deepcopy(model.decoders["video"].pipeline).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        return pipe.text_encoder(_tokens(pipe, texts)).last_hidden_state

    train = world.combinations("video", "train")
    cond, empty = encode([world.caption("video", c) for c in train]), encode([""])
    index = {combination_key(c): i for i, c in enumerate(train)}
    unet = pipe.unet.train().requires_grad_(True)

    def predict(noisy: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return unet(noisy, t, encoder_hidden_states=c).sample

    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    alphas = pipe.scheduler.alphas_cumprod.float()
    kind = pipe.scheduler.config.prediction_type
    rng, generator = world.rng("video-decoder", "probe", 1), torch.Generator().manual_seed(1)
    b = args.batch
    for step in range(args.steps):
        samples = [world.sample("video", rng, "train") for _ in range(b)]
        with torch.no_grad():
            videos = torch.stack([_pixels(s.media[0]) for s in samples])
            latents = _encode(pipe, videos, generator)
        c = cond[[index[combination_key(s.attributes)] for s in samples]]
        c = c + args.sigma * torch.randn(c.shape, generator=generator)
        c = torch.where((torch.rand(b, generator=generator) < 0.1).view(-1, 1, 1), empty, c)
        loss = denoising_step(predict, opt, unet, latents, c, alphas, kind, generator)
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss:.4f}", flush=True)
    unet.eval().requires_grad_(False)

    @torch.no_grad()
    def judge(conds: torch.Tensor, golds: list[dict[str, str]]) -> str:
        hits = collections.Counter()
        for start in range(0, len(golds), 16):
            part = conds[start : start + 16]
            frames = pipe(
                prompt_embeds=part,
                negative_prompt_embeds=empty.expand(len(part), -1, -1),
                num_frames=world.config.video_frames,
                num_inference_steps=20,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(start),
                output_type="np",
            ).frames
            for video, gold in zip(frames, golds[start : start + 16], strict=True):
                pixels = (np.clip(video, 0.0, 1.0) * 255).round().astype(np.uint8)
                judged = judges.judge("video", (pixels, world.config.video_fps))
                hits.update(a for a in gold if judged[a] == gold[a])
        return "  ".join(f"{a} {hits[a] / len(golds):.3f}" for a in golds[0])

    for split, (conds, golds) in requests.items():
        print(f"{split:>7} through NExT-GPT: {judge(conds, golds)}", flush=True)
        gold_rows = encode([world.caption("video", g) for g in golds])
        print(f"{split:>7} gold caption:    {judge(gold_rows, golds)}", flush=True)


if __name__ == "__main__":
    main()
