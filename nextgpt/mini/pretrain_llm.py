"""Pretrain the miniature's language model: a BPE tokenizer and a tiny LLaMA on world dialogues.

NExT-GPT starts from Vicuna, an LLM that already speaks English; the miniature has none, so before
stage 1 it learns the world's language from the text of the training dialogues
(docs/mini-design.md, section 6 "LLM"). Each dialogue is laid out exactly as
`nextgpt.conversation.encode_conversation` lays it out in stages 1-3 (vicuna_v1: BOS, the system
line, `USER: ... ASSISTANT: ...</s>`), tokenized piece by piece in the same order, so the prior
learnt here is the one the later stages build on. Media placeholders are dropped: inputs become
projected encoder tokens and outputs signal tokens, both added later. Only train-split dialogues
are read; held-out dialogues (unseen attribute combinations) measure perplexity and answers.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from nextgpt.config import LLMConfig
from nextgpt.conversation import IGNORE_INDEX, ChatTemplate, get_template
from nextgpt.llm import random_llama
from nextgpt.mini.dialogues import KINDS, PLACEHOLDER, make_dialogue
from nextgpt.mini.schedules import warmup_cosine
from nextgpt.mini.world import MODALITIES, World
from nextgpt.tokenizer import train_bpe_tokenizer

TEMPLATE = "vicuna_v1"
Turns = list[tuple[str, str]]  # (speaker "human" | "gpt", text with <image>/<audio>/<video>)
# A piece of a laid-out conversation: text to tokenize, or "<bos>" / "<eos>"; and whether it is
# supervised in stages 1-3 (assistant content and its EOS).
Piece = tuple[str, bool]
BOS, EOS = "<bos>", "<eos>"


def mini_llm_config() -> LLMConfig:
    """The miniature's LLM (0.99M parameters with its 760-token vocabulary): big enough to
    learn the world's small grammar in minutes on one thread; `pretrained` is set once trained."""
    return LLMConfig(
        pretrained=None,
        template=TEMPLATE,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        intermediate_size=344,
        vocab_size=768,
        max_position=512,
    )


@dataclass(frozen=True)
class LLMTraining:
    """Tokenizer size and training schedule; the defaults are the full build's (about 7 minutes
    on one thread)."""

    vocab_size: int = 768  # the world's text has a few hundred words: whole words fit
    steps: int = 1200
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.01
    max_length: int = 192  # tokens; the longest dialogues (edits) are about 150
    eval_per_kind: int = 40  # held-out dialogues per kind for the loss and perplexity
    answer_checks: int = 60  # held-out text questions answered greedily
    seed: int = 0

    @classmethod
    def smoke(cls) -> LLMTraining:
        """Seconds: enough to see the loss fall."""
        return cls(vocab_size=400, steps=40, batch=16, warmup=5, eval_per_kind=6, answer_checks=6)


# ---- layout ----------------------------------------------------------------------------------
def read_dialogues(data_dir: str | Path) -> list[Turns]:
    """Every dialogue of a `write_dataset` folder: the pair files of each modality and MosIT."""
    root = Path(data_dir)
    dialogues: list[Turns] = []
    names = [f"{m}_{kind}.json" for m in MODALITIES for kind in ("comprehension", "generation")]
    for name in [*names, "mosit.json"]:
        path = root / name
        if not path.is_file():
            continue
        for record in json.loads(path.read_text()):
            turns = record.get("conversations") or record.get("conversation") or []
            dialogues.append([(t["from"], t["value"]) for t in turns])
    if not dialogues:
        raise FileNotFoundError(f"no dialogue files (write_dataset output) in {root}")
    return dialogues


def _text_parts(text: str) -> list[str]:
    """The text pieces of a turn as the data reader splits them (placeholders dropped)."""
    return [p.strip() for i, p in enumerate(PLACEHOLDER.split(text)) if i % 2 == 0 and p.strip()]


def layout(turns: Turns, template: ChatTemplate) -> list[Piece]:
    """The pieces `encode_conversation` tokenizes for these turns, in order, without media."""
    pieces: list[Piece] = [(BOS, False)]
    prefix = template.system + template.sep if template.system else ""
    for t, (speaker, text) in enumerate(turns):
        if speaker == "human":
            pieces.append((f"{prefix}{template.user} ", False))
            prefix = ""
            pieces += [(part, False) for part in _text_parts(text)]
            pieces.append((template.sep, False))
        else:
            pieces.append((template.assistant, False))
            pieces += [(" " + part, True) for part in _text_parts(text)]
            pieces.append((EOS, True))
            if t != len(turns) - 1:
                pieces.append((template.sep, False))
    return pieces


class Encoder:
    """Tokenizes laid-out pieces as `LanguageModel.tokenize` does, caching repeated pieces."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[str, list[int]] = {
            BOS: [tokenizer.bos_token_id],
            EOS: [tokenizer.eos_token_id],
        }

    def ids(self, text: str) -> list[int]:
        if text not in self.cache:
            self.cache[text] = self.tokenizer(
                text, add_special_tokens=False, split_special_tokens=True
            )["input_ids"]
        return self.cache[text]

    def encode(self, pieces: list[Piece]) -> tuple[list[int], list[int]]:
        """(input ids, labels with only the supervised pieces kept)."""
        ids: list[int] = []
        labels: list[int] = []
        for text, supervised in pieces:
            tokens = self.ids(text)
            ids += tokens
            labels += tokens if supervised else [IGNORE_INDEX] * len(tokens)
        return ids, labels


def train_tokenizer(
    dialogues: list[Turns], vocab_size: int, template: ChatTemplate
) -> PreTrainedTokenizerFast:
    """Byte-level BPE on exactly the pieces that will be tokenized (so merges match the layout:
    a user's text starts a piece without a leading space, an answer with one)."""
    corpus = [text for d in dialogues for text, _ in layout(d, template) if text not in (BOS, EOS)]
    return train_bpe_tokenizer(corpus, vocab_size=vocab_size, repeats=1)


def build_model(
    tokenizer: PreTrainedTokenizerFast, config: LLMConfig, seed: int
) -> LlamaForCausalLM:
    """A random LLaMA as `LanguageModel.from_config` builds one, sized to the tokenizer."""
    return random_llama(tokenizer, config, seed)


def _batch(
    examples: list[tuple[list[int], list[int]]], pad: int, max_length: int, all_text: bool
) -> dict[str, torch.Tensor]:
    """Right-padded batch; labels are every token (`all_text`) or the supervised ones."""
    length = min(max_length, max(len(ids) for ids, _ in examples))
    ids = torch.full((len(examples), length), pad, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, (x, y) in enumerate(examples):
        x, y = x[:length], (x if all_text else y)[:length]
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
        mask[row, : len(x)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def length_batches(lengths: list[int], batch: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: shuffled, then sorted by length within pools of 16 batches,
    so a batch pads little (dialogues run from about 40 to 150 tokens) and stays random."""
    pool = 16 * batch
    while True:
        order = rng.permutation(len(lengths))
        batches = []
        for i in range(0, len(order), pool):
            chunk = sorted(order[i : i + pool], key=lambda j: lengths[j])
            batches += [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
        for b in rng.permutation(len(batches)):
            yield [int(j) for j in batches[b]]


def _loss(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def answer_loss(
    model: LlamaForCausalLM,
    examples: list[tuple[list[int], list[int]]],
    pad: int,
    max_length: int,
    batch: int = 32,
) -> float:
    """Mean loss per supervised (assistant) token: what stages 1-3 train on."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch):
        b = _batch(examples[i : i + batch], pad, max_length, all_text=False)
        n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
        total += _loss(model, b).item() * n
        count += n
    return total / max(1, count)


def heldout_dialogues(world: World, per_kind: int, seed: int) -> dict[str, list[Turns]]:
    """Held-out-split dialogues of every kind (unseen combinations), from their own stream."""
    return {
        kind: [
            make_dialogue(world, kind, "heldout", i, stream=f"llm-eval-{seed}").turns
            for i in range(per_kind)
        ]
        for kind in KINDS
    }


@torch.no_grad()
def check_answers(
    model: LlamaForCausalLM,
    encoder: Encoder,
    world: World,
    template: ChatTemplate,
    count: int,
    seed: int,
) -> dict:
    """Greedy answers to the first question of held-out text dialogues (no media needed): the
    share that equals the gold answer exactly, and the share that names the same attributes
    (`parse_caption` in every modality; wordings are random, so this is the fairer score)."""
    model.eval()
    exact, same, shown = [], [], []
    for i in range(count):
        turns = make_dialogue(world, "text", "heldout", i, stream=f"llm-answers-{seed}").turns
        (_, question), (_, gold) = turns[0], turns[1]
        pieces = layout([("human", question)], template)
        ids, _ = encoder.encode(pieces + [(template.assistant, False)])
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=48,
            do_sample=False,
            eos_token_id=encoder.tokenizer.eos_token_id,
            pad_token_id=encoder.tokenizer.pad_token_id,
        )
        answer = encoder.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip()
        exact.append(answer == gold.strip())
        same.append(
            all(world.parse_caption(m, answer) == world.parse_caption(m, gold) for m in MODALITIES)
        )
        if len(shown) < 5:
            shown.append({"question": question, "gold": gold, "answer": answer})
    return {
        "exact": round(float(np.mean(exact)), 4),
        "same_attributes": round(float(np.mean(same)), 4),
        "examples": shown,
    }


def pretrain_llm(
    world: World, data_dir: str | Path, t: LLMTraining, progress: bool = False
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, dict]:
    """Tokenizer, then the LM on every token of the train dialogues; returns both and metrics."""
    template = get_template(TEMPLATE)
    config = mini_llm_config()
    start = time.perf_counter()
    dialogues = read_dialogues(data_dir)
    tokenizer = train_tokenizer(dialogues, t.vocab_size, template)
    encoder = Encoder(tokenizer)
    train = [encoder.encode(layout(d, template)) for d in dialogues]
    lengths = [len(ids) for ids, _ in train]
    heldout = heldout_dialogues(world, t.eval_per_kind, t.seed)
    held = {k: [encoder.encode(layout(d, template)) for d in v] for k, v in heldout.items()}
    held_all = [e for v in held.values() for e in v]
    rng = np.random.default_rng(t.seed)
    train_eval = [train[i] for i in rng.choice(len(train), min(len(train), 200), replace=False)]
    pad = tokenizer.pad_token_id
    metrics: dict[str, Any] = {
        "dialogues": len(dialogues),
        "vocab": len(tokenizer),
        "tokens_per_dialogue": {
            "mean": round(float(np.mean(lengths)), 1),
            "max": int(max(lengths)),
            "truncated": int(sum(n > t.max_length for n in lengths)),
        },
        "prepare_seconds": round(time.perf_counter() - start, 1),
    }
    with torch.random.fork_rng(devices=[]):
        model = build_model(tokenizer, config, t.seed)
        metrics["parameters"] = sum(p.numel() for p in model.parameters())
        before = answer_loss(model, held_all, pad, t.max_length)
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)

        schedule = warmup_cosine(opt, t.warmup, t.steps)
        model.train()
        start = time.perf_counter()
        losses = []
        batches = length_batches(lengths, t.batch, rng)
        bar = tqdm(range(t.steps), desc="LLM", disable=not progress)
        for _ in bar:
            rows = next(batches)
            loss = _loss(model, _batch([train[i] for i in rows], pad, t.max_length, True))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{loss.item():.3f}")
        seconds = time.perf_counter() - start
        model.eval().requires_grad_(False)
        after = answer_loss(model, held_all, pad, t.max_length)
        metrics.update(
            {
                "steps": t.steps,
                "seconds": round(seconds, 1),
                "seconds_per_step": round(seconds / max(1, t.steps), 3),
                "train_loss_first": round(losses[0], 4) if losses else None,
                "train_loss_last": round(float(np.mean(losses[-20:])), 4) if losses else None,
                "heldout_answer_loss_before": round(before, 4),
                "heldout_answer_loss_after": round(after, 4),
                "heldout_perplexity": round(math.exp(after), 3),
                "train_answer_loss_after": round(
                    answer_loss(model, train_eval, pad, t.max_length), 4
                ),
                "heldout_perplexity_by_kind": {
                    k: round(math.exp(answer_loss(model, v, pad, t.max_length)), 3)
                    for k, v in held.items()
                },
                "answers": check_answers(model, encoder, world, template, t.answer_checks, t.seed),
            }
        )
    return model, tokenizer, metrics


def save_llm(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, directory: str | Path
) -> None:
    """transformers layout: `LLMConfig(pretrained=directory, template="vicuna_v1")` loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
