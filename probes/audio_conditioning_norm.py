"""Probe: how long are the audio output projector's conditioning vectors, and how are they drawn
as given against put on the unit sphere? (docs/mini-design.md section 8, session 19)

AudioLDM conditions its UNet on one L2-normalised CLAP text vector, and the mini audio UNet was
trained on unit vectors only. For the eval's audio generation requests (`--count` per split, the
eval's items for `--seed`), this keeps the conditioning the model hands its audio decoder, prints
its length and its cosine to the decoder's own encoding of the gold caption, and judges what the
decoder draws from it twice with the same noise: as the projector gave it, and scaled to unit
length (what `AudioDecoder` does since session 19; the first arm switches that off).

    python probes/audio_conditioning_norm.py [MODEL] [--seed 0] [--count 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import nextgpt.decoders.audio as audio_module
from nextgpt.mini.evaluate import (
    ALL,
    SPLITS,
    caption_bank,
    conditioning_recorded,
    generation_items,
    judged_scores,
    judges_dir,
    load_judges,
    model_directory,
)
from nextgpt.mini.world import World, WorldConfig
from nextgpt.model import NextGPT


@contextlib.contextmanager
def drawn_as_given() -> Iterator[None]:
    """Switch off the decoder's scaling to unit length (the control arm)."""
    scale = audio_module.on_clap_sphere
    audio_module.on_clap_sphere = lambda cond: cond
    try:
        yield
    finally:
        audio_module.on_clap_sphere = scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="nextgpt-mini", help="name or directory")
    parser.add_argument("--seed", type=int, default=0, help="the eval's item and noise seed")
    parser.add_argument("--count", type=int, default=48, help="requests per split")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = World(WorldConfig(seed=0))
    model = NextGPT.from_pretrained(str(model_directory(args.model)))
    judges = load_judges(judges_dir(args.model, None))
    decoder = model.decoders["audio"]
    combos, bank = caption_bank(world, "audio", decoder)
    hits: dict[tuple[str, str, str], list[bool]] = {}
    with torch.no_grad():
        for split in SPLITS:
            lengths, cosines = [], []
            for i, g in enumerate(generation_items(world, split, "audio", args.count, args.seed)):
                seed = args.seed + i
                with conditioning_recorded(model, decode=False) as recorders:
                    model.generate(g.prompt, modalities=["audio"], max_new_tokens=64, seed=seed)
                cond = recorders["audio"].last
                if cond is None:
                    raise SystemExit(f"{split} request {i} emitted no audio group: {g.prompt!r}")
                gold = bank[combos.index(g.attributes)]
                lengths.append(cond.norm().item())
                cosines.append(F.cosine_similarity(cond.reshape(-1), gold.reshape(-1), 0).item())
                for arm in ("as given", "unit"):
                    with drawn_as_given() if arm == "as given" else contextlib.nullcontext():
                        (clip,) = decoder.generate(cond, seed=seed)
                    for name, ok in judged_scores(judges, "audio", clip, g.attributes).items():
                        hits.setdefault((split, arm, name), []).append(ok)
            n = len(lengths)
            print(
                f"{split}: length mean {sum(lengths) / n:.3f} (min {min(lengths):.3f}, max "
                f"{max(lengths):.3f}); cosine to the gold caption mean {sum(cosines) / n:.3f} "
                f"(min {min(cosines):.3f})"
            )
    names = [*(a.name for a in world.attributes("audio")), ALL]
    print("| split | drawn | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for split in SPLITS:
        for arm in ("as given", "unit"):
            cells = [f"{sum(v)}/{len(v)}" for v in (hits[(split, arm, m)] for m in names)]
            print(f"| {split} | {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
