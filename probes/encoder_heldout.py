"""Probe: how does the miniature encoder's held-out reading move with its training budget and
seed? (docs/mini-design.md section 8, session 14: held-out audio rhythm is its lowest figure)

Trains the build's encoder recipe (`EncoderTraining`) with the given steps, seed and number of
augmented probe samples, and prints the evaluation the build records: fresh linear probes on the
frozen mean patch token, and caption retrieval, on train and held-out combinations.

    python probes/encoder_heldout.py [--steps 700] [--seed 0] [--augmented 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from nextgpt.mini.pretrain_encoder import EncoderTraining, pretrain_encoder
from nextgpt.mini.world import World, WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    base = EncoderTraining()
    parser.add_argument("--steps", type=int, default=base.steps)
    parser.add_argument("--seed", type=int, default=base.seed)
    parser.add_argument("--augmented", type=int, default=base.augmented)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    training = dataclasses.replace(base, steps=args.steps, seed=args.seed, augmented=args.augmented)
    _, metrics = pretrain_encoder(World(WorldConfig(seed=0)), training, progress=False)
    print(
        json.dumps(
            {"settings": vars(args), "probes": metrics["probes"], "retrieval": metrics["retrieval"]}
        )
    )


if __name__ == "__main__":
    main()
