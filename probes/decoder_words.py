"""Probe: do the miniature's image and video decoders draw held-out shape-colour pairs when their
CLIP text encoders read whole words instead of characters? (docs/mini-design.md section 8)

It runs the build's own decoder recipe (`pretrain_image_decoder` or `pretrain_video_decoder`:
autoencoder, probed text encoder, UNet) with the tokens and text-encoder depth given, and prints
the judged accuracy of generations from each split's canonical captions every `--every` UNet
steps. The judges are the shipped package's.

    python probes/decoder_words.py --tokens char --steps 2500   # the shipped image recipe
    python probes/decoder_words.py --tokens word --steps 2500
    python probes/decoder_words.py --modality video --tokens word --steps 1200

`word` gives the tokenizer the world's caption words (`caption_words`: only words that train
captions hold), a conditioning length of 16 tokens and no text-encoder layers, so each word's
state is its own embedding at its place, with no mixing between words. `char` is the shipped
recipe: character tokens, 48 of them, and two text-encoder layers. `--text-layers N` overrides
the depth either way.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from nextgpt.config import TinyDecoderArch
from nextgpt.mini.evaluate import model_directory
from nextgpt.mini.judges import Judge
from nextgpt.mini.pretrain_image import ImageDecoderTraining, pretrain_image_decoder
from nextgpt.mini.pretrain_video import VideoDecoderTraining, pretrain_video_decoder
from nextgpt.mini.world import World, WorldConfig, caption_words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modality", choices=("image", "video"), default="image")
    parser.add_argument("--tokens", choices=("char", "word"), default="char")
    parser.add_argument("--text-layers", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--steps", type=int, default=None, help="UNet steps (the recipe's)")
    parser.add_argument("--every", type=int, default=None, help="UNet steps between judgings")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="write the metrics here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    recipes = {
        "image": (ImageDecoderTraining(), pretrain_image_decoder),
        "video": (VideoDecoderTraining(), pretrain_video_decoder),
    }
    t, pretrain = recipes[args.modality]
    arch = t.arch
    if args.tokens == "word":
        arch = replace(
            arch, text_words=caption_words(args.modality), text_max_length=16, text_layers=0
        )
    else:
        plain = TinyDecoderArch()
        arch = replace(
            arch,
            text_words=(),
            text_max_length=plain.text_max_length,
            text_layers=plain.text_layers,
        )
    if args.text_layers is not None:
        arch = replace(arch, text_layers=args.text_layers)
    t = replace(
        t,
        arch=arch,
        unet_steps=t.unet_steps if args.steps is None else args.steps,
        eval_every=t.eval_every if args.every is None else args.every,
    )
    judge = Judge.load(model_directory("nextgpt-mini") / "judges", args.modality)
    start = time.perf_counter()
    _, metrics = pretrain(World(WorldConfig(seed=0)), judge, t)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    metrics["settings"] = {**vars(args), "text_layers": arch.text_layers}
    for row in metrics["unet"]["history"]:
        cells = [
            f"{s} " + " ".join(f"{k} {v:.2f}" for k, v in row[s].items())
            for s in ("train", "heldout")
        ]
        print(f"step {row['step']:>5}  " + "  |  ".join(cells), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(metrics, indent=1, default=str))


if __name__ == "__main__":
    main()
