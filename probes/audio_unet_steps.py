"""Probe: does the audio decoder's UNet draw held-out combinations better when it trains longer?
(docs/mini-design.md section 8, session 15: held-out rhythm generation is the last figure at the
edge of the 15 points)

Takes a built audio decoder (`DIR/audio-decoder/pipeline` of `nextgpt mini build`), keeps its
trained autoencoder, vocoder and CLAP text encoder frozen, and trains a fresh UNet with the
build's recipe (`AudioDecoderTraining`, same seed) for `--steps` steps, printing the judged
generations the build records every `eval_every` steps (3 clips per combination: 54 train, 27
held-out). The recipe's learning rate is constant after warm-up, so steps 500 and 1,000 reproduce
the build's own UNet (session 15: to every printed digit) and later steps are what a longer
`unet_steps` would give.

    python probes/audio_unet_steps.py --build build/mini [--steps 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AudioLDMPipeline

from nextgpt.mini.judges import Judges
from nextgpt.mini.pretrain_audio import (
    AudioDecoderTraining,
    _mel_view,
    build_pipeline,
    judge_generations,
    train_unet,
)
from nextgpt.mini.world import World, WorldConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", type=Path, required=True, help="a `nextgpt mini build` folder")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = AudioDecoderTraining(unet_steps=args.steps)
    world = World(WorldConfig(seed=settings.seed))
    judge = Judges.load(args.build / "judges", ("audio",)).judges["audio"]
    trained = AudioLDMPipeline.from_pretrained(str(args.build / "audio-decoder" / "pipeline"))
    torch.manual_seed(settings.seed)
    pipe = build_pipeline(settings)  # a fresh UNet, initialised as the build's was
    pipe.register_modules(
        vae=trained.vae.requires_grad_(False),
        vocoder=trained.vocoder.requires_grad_(False),
        text_encoder=trained.text_encoder.requires_grad_(False),
        tokenizer=trained.tokenizer,
    )
    start = time.perf_counter()
    history = train_unet(
        pipe,
        _mel_view(pipe, settings.arch),
        world,
        settings,
        lambda: judge_generations(pipe, world, judge, settings),
        progress=False,
    )
    for record in history:
        print(record, flush=True)
    print(f"{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
