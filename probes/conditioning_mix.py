"""Probe: can the image UNet learn to draw off-centre conditioning right (held-out red triangles)?
(docs/mini-design.md section 8, "Training the image UNet to tolerate off-centre rows")

On held-out requests the output projector puts a colour row nearer the right colour than any
other but pulled towards the colours the shape was seen with, and the UNet, trained on exact
caption encodings only, draws some of those pictures in the wrong colour. This probe keeps the
model's conditioning for the eval's image requests (train and held-out), fine-tunes a float32
copy of its image UNet for `--steps` more steps with part of each batch's conditioning mixed
towards the encoding of a caption that differs in one attribute (weight uniform up to `--mix`;
`--neighbours train` takes only train combinations as partners, `all` held-out ones too), and
judges what it then draws from that conditioning and from the gold caption. `--mix 0` is the
control (the same fine-tuning without mixing); `--steps 0` judges the model as it is.

    python probes/conditioning_mix.py --steps 0
    python probes/conditioning_mix.py --steps 300 --mix 0.45 --neighbours train
"""

from __future__ import annotations

import argparse
import collections
import copy

import torch
from projector_tap import ProjectorTap

from nextgpt.mini.denoiser import denoising_step
from nextgpt.mini.evaluate import judges_dir, load_judges
from nextgpt.mini.pretrain_image import _pixels, _tokens
from nextgpt.mini.world import World, WorldConfig, combination_key
from nextgpt.model import NextGPT


def _one_apart(a: dict[str, str], b: dict[str, str]) -> bool:
    """Whether two combinations differ in exactly one attribute."""
    return sum(a[name] != b[name] for name in a) == 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="nextgpt-mini", help="name or directory")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--mix", type=float, default=0.45, help="largest mixing weight")
    parser.add_argument("--share", type=float, default=0.5, help="share of a batch mixed")
    parser.add_argument("--neighbours", choices=("train", "all"), default="train")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--samples", type=int, default=2, help="pictures per request")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = NextGPT.from_pretrained(args.model)
    world = World(WorldConfig(seed=0))
    judges = load_judges(judges_dir(args.model, None))
    requests = ProjectorTap(model, "image").requests(world)

    pipe = copy.deepcopy(model.decoders["image"].pipeline).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def encode(texts: list[str]) -> torch.Tensor:
        return pipe.text_encoder(_tokens(pipe, texts)).last_hidden_state

    train = world.combinations("image", "train")
    partners = train + (world.combinations("image", "heldout") if args.neighbours == "all" else [])
    row = {combination_key(c): encode([world.caption("image", c)])[0] for c in train + partners}
    neighbours = [
        torch.stack([row[combination_key(d)] for d in partners if _one_apart(c, d)]) for c in train
    ]
    cond, empty = torch.stack([row[combination_key(c)] for c in train]), encode([""])
    index = {combination_key(c): i for i, c in enumerate(train)}

    unet = pipe.unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-2)
    alphas = pipe.scheduler.alphas_cumprod.float()
    kind = pipe.scheduler.config.prediction_type
    rng, generator = world.rng("image-decoder", "probe", 1), torch.Generator().manual_seed(1)
    for step in range(args.steps):
        samples = [world.sample("image", rng, "train") for _ in range(64)]
        with torch.no_grad():
            latents = pipe.vae.encode(_pixels([s.media for s in samples])).latent_dist
            latents = latents.sample(generator) * pipe.vae.config.scaling_factor
        rows = [index[combination_key(s.attributes)] for s in samples]
        c = cond[rows].clone()
        for i, r in enumerate(rows):
            if args.mix > 0 and torch.rand((), generator=generator) < args.share:
                partner = neighbours[r][torch.randint(len(neighbours[r]), (), generator=generator)]
                weight = torch.rand((), generator=generator) * args.mix
                c[i] = (1 - weight) * c[i] + weight * partner
        c = torch.where((torch.rand(64, generator=generator) < 0.1).view(-1, 1, 1), empty, c)
        loss = denoising_step(
            lambda noisy, t, cond: unet(noisy, t, cond).sample,
            opt,
            unet,
            latents,
            c,
            alphas,
            kind,
            generator,
        )
        if (step + 1) % 50 == 0:
            print(f"step {step + 1}: loss {loss:.4f}", flush=True)
    unet.eval().requires_grad_(False)

    @torch.no_grad()
    def judge(conds: torch.Tensor, golds: list[dict[str, str]]) -> str:
        hits, red_triangles = collections.Counter(), collections.Counter()
        for sample in range(args.samples):
            images = pipe(
                prompt_embeds=conds,
                negative_prompt_embeds=empty.expand(len(conds), -1, -1),
                num_inference_steps=20,
                guidance_scale=4.0,
                generator=torch.Generator().manual_seed(sample),
                height=32,
                width=32,
            ).images
            for image, gold in zip(images, golds, strict=True):
                judged = judges.judge("image", image)
                hits.update(a for a in gold if judged[a] == gold[a])
                if (gold["colour"], gold["shape"]) == ("red", "triangle"):
                    red_triangles[judged["colour"]] += 1
        n = args.samples * len(golds)
        rates = "  ".join(f"{a} {hits[a] / n:.3f}" for a in golds[0])
        return f"{rates}  red triangles drawn {dict(red_triangles)}"

    for split, (conds, golds) in requests.items():
        print(f"{split:>7} through NExT-GPT: {judge(conds, golds)}")
        gold_rows = torch.stack([encode([world.caption("image", g)])[0] for g in golds])
        print(f"{split:>7} gold caption:    {judge(gold_rows, golds)}")


if __name__ == "__main__":
    main()
