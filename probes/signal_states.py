"""Probe: do a model's image signal-token states carry each attribute of the request?
(docs/mini-design.md section 8, "a full build with word-level image and video decoders")

For every train combination it asks "Make a picture of a {size} {colour} {shape}.", keeps the
states the image output projector receives (the LLM's hidden states at the signal tokens) and
the conditioning it returns, and prints, per attribute, the mean squared distance between the
states (and the conditionings) of two requests that differ in that attribute only. No image is
decoded. A small distance is not proof that the states lack an attribute: in session 7's
word-level build size lay 0.0005 apart here, yet a linear probe read it from those states at
1.00, and the projector, not the LLM, was what lost it (docs/mini-design.md section 8). A
conditioning distance near zero beside a state distance above zero points at the projector.

    python probes/signal_states.py                      # the shipped nextgpt-mini
    python probes/signal_states.py build/mini/package/nextgpt-mini
"""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import torch
from projector_tap import ProjectorTap

from nextgpt.mini.world import World, WorldConfig
from nextgpt.model import NextGPT

ATTRIBUTES = ("size", "colour", "shape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="nextgpt-mini", help="name or directory")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = NextGPT.from_pretrained(args.model)
    world = World(WorldConfig(seed=0))
    tap = ProjectorTap(model, "image")

    records: dict[tuple[str, ...], dict[str, Any]] = {}
    for combo in world.combinations("image", "train"):
        prompt = f"Make a picture of a {combo['size']} {combo['colour']} {combo['shape']}."
        state, cond = tap.ask(prompt)
        records[tuple(combo[a] for a in ATTRIBUTES)] = {"states": state, "cond": cond}

    for i, name in enumerate(ATTRIBUTES):
        states, conds = [], []
        for a, b in itertools.combinations(records, 2):
            if [j for j in range(len(ATTRIBUTES)) if a[j] != b[j]] == [i]:
                states.append(float(((records[a]["states"] - records[b]["states"]) ** 2).mean()))
                conds.append(float(((records[a]["cond"] - records[b]["cond"]) ** 2).mean()))
        print(
            f"{name:>6}: {len(states):>2} pairs  states {sum(states) / len(states):.4f}  "
            f"conditioning {sum(conds) / len(conds):.4f}"
        )


if __name__ == "__main__":
    main()
