"""Probe: would whole-word tokens make the audio decoder's one CLAP vector compositional?
(docs/mini-design.md section 8, "Word tokens do not make the CLAP vector compose")

Word-level CLIP text encoders made the image and video decoders draw held-out shape-colour pairs,
because each word got its own conditioning row. AudioLDM conditions on one pooled, projected and
normalised CLAP vector instead. This probe trains the audio decoder's CLAP text encoder as the
build does (`pretrain_audio.train_text_encoder`: linear probes on that normalised vector, every
wording of the train combinations) with its character-level tokenizer and with a RoBERTa
tokenizer given byte-level BPE merges that keep each caption word whole (both `word` and
`Ġword`), at one and two layers and three seeds, and prints the probes' accuracy on held-out
canonical captions (9 captions; chance 0.33). Probes trained on train pairs can lean on how the
attributes co-occur there, so it also fits each canonical caption's vector as a sum of one vector
per attribute value (least squares on the 18 train captions) and prints the share of the vector's
energy that sum leaves unexplained, on train and on held-out captions. No UNet is trained.

On the pair split (session 10) neither tokenizer composed; on the whole-combination split
(session 15) whole words read every held-out attribute at 0.67 to 1.00, characters pitch at 0.22
to 0.89, and the build's audio decoder now uses whole words (`roberta_word_tokenizer`).

    python probes/clap_words.py
"""

from __future__ import annotations

import argparse

import torch
from diffusers import AudioLDMPipeline

from nextgpt.config import TinyDecoderArch
from nextgpt.decoders.tiny import build_tiny_pipeline, roberta_word_tokenizer
from nextgpt.mini.pretrain_audio import AudioDecoderTraining, _embed, _tokens, train_text_encoder
from nextgpt.mini.world import World, WorldConfig, caption_words


def fresh_pipeline(
    world: World, tokens: str, layers: int, seed: int
) -> tuple[AudioLDMPipeline, TinyDecoderArch]:
    """An untrained tiny audio pipeline whose CLAP text encoder has `layers` layers, with the
    character-level tokenizer (`tokens="characters"`) or one that keeps each caption word whole
    (`"words"`, checked on a caption)."""
    arch = TinyDecoderArch(norm_groups=8, zero_terminal_snr=True, text_layers=layers)
    pipe = build_tiny_pipeline("audio", arch, seed)
    if tokens == "words":
        pipe.tokenizer = roberta_word_tokenizer(caption_words("audio"), arch.text_max_length)
        caption = world.caption("audio", world.combinations("audio", "train")[0])
        pieces = pipe.tokenizer.tokenize(caption)
        if len(pieces) != len(caption.split()):
            raise RuntimeError(f"{caption!r} did not tokenize by words: {pieces}")
    return pipe, arch


def additive_residual(pipe, world: World) -> tuple[float, float]:
    """Unexplained energy share of the sum-of-attribute-vectors fit: train, held-out captions."""
    attributes = world.attributes("audio")
    train, heldout = world.combinations("audio", "train"), world.combinations("audio", "heldout")
    combos = train + heldout
    with torch.no_grad():
        vectors = _embed(pipe, *_tokens(pipe, [world.caption("audio", c) for c in combos]))
    onehots = torch.tensor(
        [[float(c[a.name] == v) for a in attributes for v in a.values] for c in combos]
    )
    # one-hot columns of each attribute sum to 1, so the design is rank-deficient: lstsq's rank
    # decision then flips between calls on the same input; the SVD pseudo-inverse does not
    weights = torch.linalg.pinv(onehots[: len(train)]) @ vectors[: len(train)]
    share = ((vectors - onehots @ weights) ** 2).sum(-1) / (vectors**2).sum(-1)
    return float(share[: len(train)].mean()), float(share[len(train) :].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World(WorldConfig(seed=0))
    for tokens in ("characters", "words"):
        for layers in (1, 2):
            for seed in range(args.seeds):
                pipe, arch = fresh_pipeline(world, tokens, layers, seed)
                settings = AudioDecoderTraining(arch=arch, seed=seed)
                torch.manual_seed(seed)  # the encoder's dropout draws from the global generator
                scores = train_text_encoder(pipe, world, settings, False)
                fit = additive_residual(pipe, world)
                print(
                    f"{tokens:>10}, {layers} layer(s), seed {seed}: held-out probes {scores}; "
                    f"unexplained by a sum: train {fit[0]:.3f}, held-out {fit[1]:.3f}"
                )


if __name__ == "__main__":
    main()
