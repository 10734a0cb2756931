"""Probe: does the shipped model perceive a held-out combination's attributes when it is asked
about one attribute at a time? (docs/mini-design.md section 8)

The eval's caption table asks "Describe this image." and reads every attribute out of one
sentence, so an unseen pair must be written out whole. Here each item asks one attribute's first
question of the dialogues ("What colour is the shape?") about fresh media, 24 per attribute and
split, balanced over the split's combinations, and reads that attribute back with
`parse_caption`.

    python probes/questions.py [--model nextgpt-mini] [--items 24]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nextgpt.cli import load_model
from nextgpt.mini.dialogues import QUESTIONS
from nextgpt.mini.evaluate import balanced_combinations, user_message
from nextgpt.mini.world import MODALITIES, World, WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nextgpt-mini")
    parser.add_argument("--items", type=int, default=24, help="per attribute and split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    world = World(WorldConfig(seed=0))
    print("| modality | attribute | train | held-out | chance |")
    print("| --- | --- | --- | --- | --- |")
    for modality in MODALITIES:
        for attribute in world.attributes(modality):
            question = QUESTIONS[attribute.name][0][0]
            rates = []
            for split in ("train", "heldout"):
                rng = world.rng("probe-questions", split, modality, attribute.name)
                hits = []
                for combo in balanced_combinations(world, modality, split, args.items, rng):
                    media = world.render(modality, combo, rng)
                    message = user_message(f"<{modality}>\n{question}", [media])
                    reply = model.generate([message], modalities=[], max_new_tokens=16)
                    read = world.parse_caption(modality, reply.text)[attribute.name]
                    hits.append(read == combo[attribute.name])
                rates.append(float(np.mean(hits)))
            cells = [*rates, 1 / len(attribute.values)]
            text = " | ".join(f"{c:.2f}" for c in cells)
            print(f"| {modality} | {attribute.name} | {text} |", flush=True)


if __name__ == "__main__":
    main()
