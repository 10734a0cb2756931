"""From Samples to Batches: encoding, truncation, and a step-indexed sampler for exact resume.

`StepBatchSampler` makes the data order a pure function of (seed, optimizer step): step s takes
the s-th global batch of a seeded permutation of the epoch, cut into micro-batches of
`batch_size`; micro-batch k of process r is chunk `k * processes + r`. So N processes without
accumulation see exactly the micro-batches one process sees with N accumulation steps, and a
resumed run starts at the step where it stopped, without replaying the data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from nextgpt.batch import Batch, OutputTarget, collate
from nextgpt.config import MODALITIES, EncoderConfig
from nextgpt.conversation import (
    IGNORE_INDEX,
    ChatTemplate,
    EncodedConversation,
    Part,
    Turn,
    encode_conversation,
)
from nextgpt.data.embeddings import CaptionEmbeddingStore, load_embedding_file
from nextgpt.data.formats import DataError, Sample
from nextgpt.data.targets import TargetMedia
from nextgpt.media import MediaError
from nextgpt.model import encoder_input
from nextgpt.signal_tokens import SignalTokens

logger = logging.getLogger(__name__)


class SampleEncoder:
    """Sample -> EncodedConversation with every file loaded: encoder inputs and output targets.

    A target's embedding is the record's own embedding file if it names one, else the store's
    precomputed embedding of its caption, else None (the model then runs the decoder's text
    encoder). Target media are loaded only when `targets` is given (the diffusion loss is on).
    """

    def __init__(
        self,
        llm: Any,
        template: ChatTemplate,
        media_tokens: dict[str, int],
        encoder_config: EncoderConfig,
        max_length: int | None = None,
        captions: CaptionEmbeddingStore | None = None,
        targets: TargetMedia | None = None,
    ) -> None:
        self.llm = llm
        self.template = template
        self.media_tokens = media_tokens
        self.encoder_config = encoder_config
        self.max_length = max_length
        self.captions = captions
        self.targets = targets

    @classmethod
    def for_model(cls, model: Any, **kwargs: Any) -> SampleEncoder:
        tokens = {m: model.num_media_tokens(m) for m in MODALITIES}
        return cls(model.llm, model.template, tokens, model.config.encoder, **kwargs)

    def __call__(self, sample: Sample) -> EncodedConversation:
        try:
            turns = [Turn(t.role, [self._part(t.role, p) for p in t.parts]) for t in sample.turns]
        except (MediaError, DataError) as e:
            raise DataError(f"{sample.source}: {e}") from e
        enc = encode_conversation(turns, self.llm, self.template, self.media_tokens)
        if self.max_length is not None and len(enc.input_ids) > self.max_length:
            enc = truncate(enc, self.max_length, self.llm.signal, self.media_tokens)
            if all(label == IGNORE_INDEX for label in enc.labels):
                raise DataError(
                    f"{sample.source}: nothing to learn within max_length {self.max_length}"
                )
        return enc

    def _part(self, role: str, part: Part) -> Part:
        if part.kind == "text":
            return part
        if role == "user":
            return Part(part.kind, encoder_input(part.kind, part.value, self.encoder_config))
        target: OutputTarget = part.value
        embedding = target.embedding
        if isinstance(embedding, Path):
            embedding = load_embedding_file(embedding)
        if embedding is None and target.caption is not None and self.captions is not None:
            embedding = self.captions.get(part.kind, target.caption)
        media = None
        if self.targets is not None and isinstance(target.media, Path):
            media = self.targets(part.kind, target.media)
        return Part(part.kind, OutputTarget(target.caption, embedding, media))


def truncate(
    enc: EncodedConversation, max_length: int, signal: SignalTokens, media_tokens: dict[str, int]
) -> EncodedConversation:
    """Cut to at most `max_length` tokens without splitting a media run or a signal group; media
    and targets whose tokens were cut are dropped with them."""
    ids = enc.input_ids
    placeholders = signal.placeholder_modality
    starts = signal.start_ids
    kept_in = dict.fromkeys(MODALITIES, 0)
    kept_out = dict.fromkeys(MODALITIES, 0)
    i = 0
    while i < max_length:
        token = ids[i]
        if token in placeholders or token in starts:
            modality = placeholders.get(token) or starts[token]
            span = media_tokens[modality] if token in placeholders else len(signal.ids[modality])
            if i + span > max_length:
                break
            (kept_in if token in placeholders else kept_out)[modality] += 1
            i += span
        else:
            i += 1
    return EncodedConversation(
        ids[:i], enc.labels[:i], _first(enc.media, kept_in), _first(enc.outputs, kept_out)
    )


def _first(items: list[tuple[str, Any]], counts: dict[str, int]) -> list[tuple[str, Any]]:
    left = dict(counts)
    out = []
    for modality, value in items:
        if left[modality] > 0:
            left[modality] -= 1
            out.append((modality, value))
    return out


def _tensor(modality: str, value: Any) -> torch.Tensor:
    return value  # SampleEncoder has already turned every input into the encoder's tensor


def collate_encoded(items: list[EncodedConversation], pad_id: int) -> Batch:
    return collate(items, pad_id, _tensor)


class ConversationDataset(Dataset):
    """Samples in memory, encoded (files loaded) on access, in DataLoader workers if any.

    With `skip_bad`, a record whose media fail to load (found only here, when its files are read)
    is logged with its file and record and replaced by the next record that loads, so every
    micro-batch keeps its size and the data order stays a function of the step (exact resume).
    """

    def __init__(
        self,
        samples: list[Sample],
        encoder: SampleEncoder,
        skip_bad: bool = False,
        max_skips: int = 100,
    ) -> None:
        self.samples = samples
        self.encoder = encoder
        self.skip_bad = skip_bad
        self.max_skips = max_skips

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> EncodedConversation:
        if not self.skip_bad:
            return self.encoder(self.samples[index])
        errors: list[str] = []
        for k in range(min(self.max_skips, len(self.samples))):
            try:
                return self.encoder(self.samples[(index + k) % len(self.samples)])
            except DataError as e:
                errors.append(str(e))
                logger.warning("skipped a record whose files do not load: %s", e)
        raise DataError(
            f"{len(errors)} records in a row from index {index} failed to load; first: {errors[0]}"
        )


class StepBatchSampler(Sampler[list[int]]):
    """This process's micro-batches for optimizer steps `start_step`..`total_steps - 1`."""

    def __init__(
        self,
        size: int,
        batch_size: int,
        accumulation: int,
        processes: int,
        rank: int,
        total_steps: int,
        seed: int,
        shuffle: bool = True,
        start_step: int = 0,
    ) -> None:
        self.size, self.batch_size, self.accumulation = size, batch_size, accumulation
        self.processes, self.rank = processes, rank
        self.total_steps, self.start_step = total_steps, start_step
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * accumulation * processes
        if size < self.global_batch:
            raise DataError(
                f"{size} training samples are fewer than one global batch of {self.global_batch} "
                f"(batch_size x grad_accum x processes)"
            )

    @property
    def steps_per_epoch(self) -> int:
        return self.size // self.global_batch

    def __len__(self) -> int:
        return (self.total_steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[int]]:
        order, epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                order = self.order(epoch)
            base = (step % self.steps_per_epoch) * self.global_batch
            for micro in range(self.accumulation):
                chunk = micro * self.processes + self.rank
                start = base + chunk * self.batch_size
                yield order[start : start + self.batch_size]

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()


class EvalBatchSampler(Sampler[list[int]]):
    """Every evaluation sample once, in order; process r takes batches r, r + N, ..."""

    def __init__(self, size: int, batch_size: int, processes: int, rank: int) -> None:
        self.batches = [
            list(range(i, min(i + batch_size, size))) for i in range(0, size, batch_size)
        ][rank::processes]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)
