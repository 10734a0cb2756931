"""Probe: does the audio decoder's CLAP vector compose once the caption enters it additively?
(docs/mini-design.md section 8, "Nor an additive text encoder")

`clap_words.py` found that neither characters nor whole-word tokens make the one pooled, projected
CLAP vector compose: held-out pitch and rhythm read near chance. Here the token mixing itself is
made additive: the one layer's query weights are held at zero, so every position, `<s>` among them,
attends uniformly and `<s>` reads the mean of every token's value. Two objectives:

- `probes`: the build's (`pretrain_audio.train_text_encoder`: linear probes per attribute on the
  normalised vector); prints the probes' accuracy on the 9 held-out canonical captions;
- `additive`: the vector is pulled (cosine) towards the normalised sum of fixed random vectors, one
  per attribute value, so its train targets are additive by construction; prints, for held-out
  captions, the attributes of the nearest target among all 27 combinations.

Both print the share of the vector's energy that a sum of per-value vectors (least squares on the
18 train captions) leaves unexplained. No UNet is trained.

    python probes/clap_additive.py [--seeds 3]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import torch.nn.functional as F
from clap_words import additive_residual, fresh_pipeline

from nextgpt.mini.pretrain_audio import (
    AudioDecoderTraining,
    _embed,
    _tokens,
    train_text_encoder,
    train_wordings,
)
from nextgpt.mini.world import World, WorldConfig


def hold_queries_at_zero(pipe) -> None:
    """Uniform attention in every layer: zero query weights whose gradients are discarded."""
    for layer in pipe.text_encoder.text_model.encoder.layer:
        query = layer.attention.self.query
        torch.nn.init.zeros_(query.weight)
        torch.nn.init.zeros_(query.bias)
        query.weight.register_hook(torch.zeros_like)
        query.bias.register_hook(torch.zeros_like)


def train_additive(pipe, world: World, seed: int, steps: int = 300) -> dict[str, float]:
    """Pull the vector of every train wording towards its additive target; returns held-out
    accuracy of the nearest target's attributes."""
    attributes = world.attributes("audio")
    width = pipe.text_encoder.config.projection_dim
    generator = torch.Generator().manual_seed(1000 + seed)
    values = {a.name: torch.randn(len(a.values), width, generator=generator) for a in attributes}

    def target(combo: dict[str, str]) -> torch.Tensor:
        parts = [values[a.name][a.values.index(combo[a.name])] for a in attributes]
        return F.normalize(torch.stack(parts).sum(0), dim=-1)

    wordings = train_wordings(world)
    ids, mask = _tokens(pipe, [text for text, _ in wordings])
    targets = torch.stack([target(c) for _, c in wordings])
    encoder = pipe.text_encoder.train().requires_grad_(True)
    opt = torch.optim.AdamW(encoder.parameters(), lr=2e-3)
    for _ in range(steps):
        idx = torch.randint(0, len(wordings), (64,), generator=generator)
        cosine = (_embed(pipe, ids[idx], mask[idx]) * targets[idx]).sum(-1)
        loss = (1 - cosine).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    encoder.eval().requires_grad_(False)
    names = [a.name for a in attributes]
    every = [dict(zip(names, v)) for v in itertools.product(*[a.values for a in attributes])]
    bank = torch.stack([target(c) for c in every])
    heldout = world.combinations("audio", "heldout")
    with torch.no_grad():
        vectors = _embed(pipe, *_tokens(pipe, [world.caption("audio", c) for c in heldout]))
    nearest = [every[int(i)] for i in (vectors @ bank.T).argmax(-1)]
    return {
        name: round(sum(n[name] == c[name] for n, c in zip(nearest, heldout)) / len(heldout), 4)
        for name in names
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World(WorldConfig(seed=0))
    for objective in ("probes", "additive"):
        for tokens in ("characters", "words"):
            for seed in range(args.seeds):
                pipe, arch = fresh_pipeline(world, tokens, 1, seed)
                hold_queries_at_zero(pipe)
                torch.manual_seed(seed)  # the encoder's dropout draws from the global generator
                if objective == "probes":
                    scores = train_text_encoder(
                        pipe, world, AudioDecoderTraining(arch=arch, seed=seed), False
                    )
                else:
                    scores = train_additive(pipe, world, seed)
                fit = additive_residual(pipe, world)
                print(
                    f"{objective:>8}, {tokens:>10}, seed {seed}: held-out {scores}; "
                    f"unexplained by a sum: train {fit[0]:.3f}, held-out {fit[1]:.3f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
