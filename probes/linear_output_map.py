"""Probe: does a linear map from the same signal-token states compose held-out pairs where the
output projector does not? (docs/mini-design.md section 8, "A linear map from the same states")

For `--train` requests (train combinations, eval wordings drawn with another seed) and the eval's
48 held-out requests of one modality, it keeps the states the output projector receives (the
LLM's hidden states at the signal tokens, flattened) and what it returns. On the train requests
it fits the conditioning target, the decoder's encoding of the canonical caption, as a linear
function of the states, in closed form (ridge, `--ridge`) and by Adam from zero (`--adam-steps`,
as stage 2 would train a linear projector). It then reports, on held-out requests, each map's
mean squared error and worst row against the target, the conditioning read-back (the caption
nearest to it) and, with `--judge`, what the decoder draws from it, beside the same figures for
the model's own output projector. Only train requests are fitted; held-out ones are only read.

    python probes/linear_output_map.py                  # shipped model, image
    python probes/linear_output_map.py build/mini/package/nextgpt-mini --modality video --judge
"""

from __future__ import annotations

import argparse
import collections

import torch
import torch.nn.functional as F
from projector_tap import ProjectorTap

from nextgpt.mini.evaluate import generation_items, judge_input, judges_dir, load_judges
from nextgpt.mini.world import World, WorldConfig, combination_key
from nextgpt.model import NextGPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="nextgpt-mini", help="name or directory")
    parser.add_argument("--modality", choices=("image", "video", "audio"), default="image")
    parser.add_argument("--train", type=int, default=144, help="train requests fitted")
    parser.add_argument("--ridge", type=float, default=0.1)
    parser.add_argument("--adam-steps", type=int, default=3000)
    parser.add_argument("--adam-lr", type=float, default=1e-2)
    parser.add_argument("--judge", action="store_true", help="also decode and judge, 2 samples")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    modality = args.modality

    model = NextGPT.from_pretrained(args.model)
    world = World(WorldConfig(seed=0))
    tap = ProjectorTap(model, modality)
    decoder = model.decoders[modality]

    combos = world.combinations(modality, "train") + world.combinations(modality, "heldout")
    with torch.no_grad():
        targets = {
            combination_key(c): decoder.encode_text([world.caption(modality, c)])[0].float()
            for c in combos
        }
    table = torch.stack([targets[combination_key(c)] for c in combos])

    def collect(
        split: str, count: int, seed: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
        states, conds, golds = [], [], []
        for item in generation_items(world, split, modality, count, seed=seed):
            state, cond = tap.ask(item.prompt)
            states.append(state.float().flatten())
            conds.append(cond.float())
            golds.append(item.attributes)
        wanted = torch.stack([targets[combination_key(g)] for g in golds])
        return torch.stack(states), torch.stack(conds), wanted, golds

    train_states, _, train_targets, _ = collect("train", args.train, seed=7)
    states, own, wanted, golds = collect("heldout", 48, seed=0)
    centre = train_states.mean(0)

    def design(s: torch.Tensor) -> torch.Tensor:
        return torch.cat([s - centre, torch.ones(len(s), 1)], dim=1)

    x, y = design(train_states), train_targets.flatten(1)
    ridge = torch.linalg.solve(x.T @ x + args.ridge * torch.eye(x.shape[1]), x.T @ y)
    weights = torch.zeros_like(ridge, requires_grad=True)
    opt = torch.optim.Adam([weights], lr=args.adam_lr)
    for _ in range(args.adam_steps):
        loss = F.mse_loss(x @ weights, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    fitted = {
        "ridge": F.mse_loss(x @ ridge, y).item(),
        "Adam": F.mse_loss(x @ weights.detach(), y).item(),
    }
    print(f"train mse: ridge {fitted['ridge']:.5f}, Adam {fitted['Adam']:.5f}")
    maps = {
        "output projector": own,
        f"ridge {args.ridge:g}": (design(states) @ ridge).view_as(wanted),
        f"Adam {args.adam_steps}": (design(states) @ weights.detach()).view_as(wanted),
    }
    judges = None
    if args.judge:
        judges = load_judges(judges_dir(args.model, None))
    for name, cond in maps.items():
        error = ((cond - wanted) ** 2).mean(-1)
        hits: collections.Counter = collections.Counter()
        for c, gold in zip(cond, golds, strict=True):
            nearest = combos[int(((table - c) ** 2).mean((-1, -2)).argmin())]
            hits.update(a for a in gold if nearest[a] == gold[a])
        readback = "  ".join(f"{a} {hits[a] / len(golds):.2f}" for a in golds[0])
        print(
            f"{name:>16}: held-out mse {error.mean():.4f}, worst row {error.max():.3f}; "
            f"read-back {readback}"
        )
        if judges is not None:
            drawn: collections.Counter = collections.Counter()
            for sample in range(2):
                for media, gold in zip(
                    tap.decode(cond.to(decoder.pipeline.unet.dtype), seed=sample),
                    golds,
                    strict=True,
                ):
                    media = judge_input(modality, media, world.config.video_fps)
                    judged = judges.judge(modality, media)
                    drawn.update(a for a in gold if judged[a] == gold[a])
            rates = "  ".join(f"{a} {drawn[a] / (2 * len(golds)):.2f}" for a in golds[0])
            print(f"{'':>16}  judged: {rates}")


if __name__ == "__main__":
    main()
