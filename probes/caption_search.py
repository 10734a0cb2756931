"""Probe: is a held-out caption lost in decoding, or does the model believe the wrong pair?
(docs/mini-design.md section 8, "Decoding does not recover held-out captions")

The eval's captions are greedy. A held-out caption names one attribute right and swaps the other
for a partner the LLM has read with it ("a large yellow square" for a yellow circle). Two
decoding-side remedies, on the eval's own caption items (48 per modality and split, seed 0):

1. Search: score every caption the world can write (each combination in each template, as the
   model writes it: capitalised, with a full stop, then EOS) under the model with the medium,
   and keep the most likely one, by summed or by mean token log-probability. This bounds what
   beam search could find.
2. Contrastive decoding in the manner of visual contrastive decoding (Leng et al., 2023): greedy
   on `(1 + w) log p(x | medium) - w log p(x | no medium)` among tokens whose probability under
   the medium is at least `b` times the best's. The prompt without the medium's positions
   gives the text-only prediction that carries the pair prior.

    python probes/caption_search.py [--model nextgpt-mini] [--contrast 0:0.1,1:0.03,2:0.03]
"""

from __future__ import annotations

import argparse
import itertools

import torch

from nextgpt.cli import load_model
from nextgpt.conversation import encode_conversation, parse_messages
from nextgpt.mini.evaluate import caption_items, caption_scores, user_message
from nextgpt.mini.world import MODALITIES, TEMPLATES, World, WorldConfig
from nextgpt.model import NextGPT, visible_text


def _encoded(model: NextGPT, messages: list[dict], generation_prompt: bool):
    turns, system = parse_messages(messages)
    counts = {m: model.num_media_tokens(m) for m in MODALITIES}
    return encode_conversation(
        turns, model.llm, model.template, counts, system=system,
        add_generation_prompt=generation_prompt,
    )  # fmt: skip


def _embeds(model: NextGPT, ids: list[int], modality: str, media: torch.Tensor) -> torch.Tensor:
    return model.embed_inputs(torch.tensor([ids]), {modality: media[None]})


def candidates(world: World, modality: str) -> list[tuple[dict[str, str], str]]:
    """Every combination of both splits in every template, written as the model writes it."""
    attributes = world.attributes(modality)
    out = []
    for values in itertools.product(*[a.values for a in attributes]):
        combo = dict(zip([a.name for a in attributes], values))
        words = {a.name: a.phrase(combo[a.name]) for a in attributes}
        for template in TEMPLATES[modality]:
            text = template.format(**words)
            out.append((combo, text[0].upper() + text[1:] + "."))
    return out


@torch.no_grad()
def most_likely(
    model: NextGPT, message: dict, modality: str, media: torch.Tensor, cands: list
) -> tuple[dict[str, str], dict[str, str]]:
    """The candidate with the highest summed and with the highest mean log-probability."""
    scored = []
    for combo, text in cands:
        enc = _encoded(model, [message, {"role": "assistant", "content": text}], False)
        logits, _, _ = model.llm(_embeds(model, enc.input_ids, modality, media))
        labels = torch.tensor(enc.labels[1:])
        supervised = labels != -100
        logp = torch.log_softmax(logits[0, :-1].float(), -1)[supervised]
        token_logp = logp.gather(1, labels[supervised][:, None]).squeeze(1)
        scored.append((float(token_logp.sum()), float(token_logp.mean()), combo))
    return max(scored, key=lambda s: s[0])[2], max(scored, key=lambda s: s[1])[2]


@torch.no_grad()
def contrastive_caption(
    model: NextGPT,
    message: dict,
    modality: str,
    media: torch.Tensor,
    weight: float,
    plausibility: float,
    max_tokens: int = 48,
) -> str:
    """Greedy contrastive decoding of a text-only answer (no signal tokens)."""
    enc = _encoded(model, [message], True)
    embeds = _embeds(model, enc.input_ids, modality, media)
    keep = torch.tensor([i != model.llm.signal.placeholder_ids[modality] for i in enc.input_ids])
    banned = [i for ids in model.llm.signal.ids.values() for i in ids]
    banned += list(model.llm.signal.placeholder_ids.values())
    caches = [model.llm.new_cache(), model.llm.new_cache()]
    logits, _, caches[0] = model.llm(embeds, cache=caches[0])
    prior, _, caches[1] = model.llm(embeds[:, keep], cache=caches[1])
    ids: list[int] = []
    for _ in range(max_tokens):
        logp = torch.log_softmax(logits[0, -1].float(), -1)
        scores = (1 + weight) * logp - weight * torch.log_softmax(prior[0, -1].float(), -1)
        scores[logp < logp.max() + torch.log(torch.tensor(plausibility))] = float("-inf")
        scores[banned] = float("-inf")
        token = int(scores.argmax())
        if token == model.llm.eos_token_id:
            break
        ids.append(token)
        text, stopped = visible_text(model.llm.decode(ids), model.template.stop)
        if stopped:
            break
        step = model.llm.embed(torch.tensor([[token]]))
        logits, _, caches[0] = model.llm(step, cache=caches[0])
        prior, _, caches[1] = model.llm(step, cache=caches[1])
    return visible_text(model.llm.decode(ids), model.template.stop, final=True)[0].strip()


def _line(label: str, tally: dict[str, list[bool]]) -> str:
    return f"{label}: " + ", ".join(f"{k} {sum(v) / len(v):.2f}" for k, v in tally.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nextgpt-mini")
    parser.add_argument("--items", type=int, default=48, help="per modality and split")
    parser.add_argument("--contrast", default="0:0.1,1:0.03,2:0.03", help="w:b,... (0: greedy)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    world = World(WorldConfig(seed=0))
    settings = [tuple(float(x) for x in spec.split(":")) for spec in args.contrast.split(",")]
    for modality in MODALITIES:
        cands = candidates(world, modality)
        for split in ("train", "heldout"):
            tallies: dict[str, dict[str, list[bool]]] = {}
            for item in caption_items(world, split, modality, args.items):
                message = user_message(f"<{modality}>\n{item.prompt}", [item.media])
                media = model.prepare_media(modality, item.media)
                by_sum, by_mean = most_likely(model, message, modality, media, cands)
                found = {"most likely (sum)": by_sum, "most likely (mean)": by_mean}
                for label, combo in found.items():
                    for name, value in item.attributes.items():
                        tallies.setdefault(label, {}).setdefault(name, []).append(
                            combo[name] == value
                        )
                for weight, plausibility in settings:
                    text = contrastive_caption(
                        model, message, modality, media, weight, plausibility
                    )
                    label = f"contrast w={weight:g} b={plausibility:g}"
                    for name, ok in caption_scores(world, modality, text, item.attributes).items():
                        tallies.setdefault(label, {}).setdefault(name, []).append(ok)
            for label, tally in tallies.items():
                print(f"{modality} {split} " + _line(label, tally), flush=True)


if __name__ == "__main__":
    main()
