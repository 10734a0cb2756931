"""Probe: the held-out figures a stage-3 run decides, without any diffusion.
(docs/mini-design.md section 8, "the spread of stage 3 over seeds")

`nextgpt eval` spends most of its seven minutes decoding media. The held-out misses that vary
from build to build already show before any decoding: in the caption answers, and in the
conditioning that the output projectors hand to a decoder, read back as the nearest caption
embedding of the decoder's own text encoder (the eval's "conditioning" rows). This probe measures
just those two, on the eval's own items (same seeds, same counts), in about half a minute a model
on two threads, so that every checkpoint of several stage-3 runs can be compared.

    python probes/stage3_heldout.py build/mini/stage3/run/checkpoint-00004000 [more models...]
"""

from __future__ import annotations

import argparse

import torch

from nextgpt.mini.evaluate import (
    ALL,
    SPLITS,
    caption_bank,
    caption_items,
    caption_scores,
    conditioning_recorded,
    generation_items,
    nearest_caption_scores,
    user_message,
)
from nextgpt.mini.world import MODALITIES, World, WorldConfig
from nextgpt.model import NextGPT


def measure(model: NextGPT, world: World, count: int, seed: int) -> dict[str, dict[str, float]]:
    """Accuracy per (kind modality.attribute) and split: kind `cap` for captions, `cnd` for the
    conditioning read-back of generation requests."""
    tallies: dict[str, dict[str, list[bool]]] = {}

    def add(key: str, split: str, ok: bool) -> None:
        tallies.setdefault(key, {s: [] for s in SPLITS})[split].append(ok)

    banks = {m: caption_bank(world, m, model.decoders[m]) for m in MODALITIES}
    for split in SPLITS:
        for m in MODALITIES:
            for item in caption_items(world, split, m, count, seed):
                message = user_message(f"<{m}>\n{item.prompt}", [item.media])
                reply = model.generate([message], modalities=[], max_new_tokens=48)
                for name, ok in caption_scores(world, m, reply.text, item.attributes).items():
                    add(f"cap {m}.{name}", split, ok)
            for i, g in enumerate(generation_items(world, split, m, count, seed)):
                with conditioning_recorded(model, decode=False) as recorders:
                    model.generate(g.prompt, modalities=[m], max_new_tokens=64, seed=seed + i)
                cond = recorders[m].last
                if cond is None:  # no group emitted: nothing reached the decoder
                    scores = dict.fromkeys([*g.attributes, ALL], False)
                else:
                    scores = nearest_caption_scores(*banks[m], cond, g.attributes)
                for name, ok in scores.items():
                    add(f"cnd {m}.{name}", split, ok)
    return {k: {s: sum(v[s]) / len(v[s]) for s in SPLITS} for k, v in tallies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="model directories (runs or checkpoints)")
    parser.add_argument("--count", type=int, default=48, help="items per modality and split")
    parser.add_argument("--seed", type=int, default=0, help="the eval's item seed")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World(WorldConfig(seed=0))
    for path in args.models:
        model = NextGPT.from_pretrained(path)  # in eval mode
        with torch.no_grad():
            rows = measure(model, world, args.count, args.seed)
        attributes = {k: v for k, v in rows.items() if not k.endswith(ALL)}
        held = [v["heldout"] for v in attributes.values()]
        gap, where = max((v["train"] - v["heldout"], k) for k, v in attributes.items())
        print(
            f"{path}: held-out mean {sum(held) / len(held):.3f}, worst {min(held):.2f}, "
            f"largest gap {gap:.2f} ({where})"
        )
        cells = [f"{k} {v['train']:.2f}/{v['heldout']:.2f}" for k, v in rows.items()]
        for i in range(0, len(cells), 5):
            print("   ", " | ".join(cells[i : i + 5]))


if __name__ == "__main__":
    main()
