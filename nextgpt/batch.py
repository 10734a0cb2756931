"""A training/evaluation batch: padded token ids and labels, input media, and generation targets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from nextgpt.conversation import IGNORE_INDEX, EncodedConversation


@dataclass
class OutputTarget:
    """What one signal group in an assistant turn should produce.

    `caption` feeds the caption-alignment loss through the decoder's own text encoder unless
    `embedding` (precomputed, (L, D)) is given; `media` (decoder-ready tensor) feeds the
    diffusion loss.
    """

    caption: str | None = None
    embedding: torch.Tensor | None = None
    media: torch.Tensor | None = None


@dataclass
class Targets:
    """Per output modality, the targets of its signal groups in order of occurrence."""

    captions: list[str | None] = field(default_factory=list)
    embeddings: list[torch.Tensor | None] = field(default_factory=list)
    media: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), IGNORE_INDEX where not supervised
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # modality -> (n, ...) inputs
    targets: dict[str, Targets] = field(default_factory=dict)

    def to(self, device: torch.device | str) -> Batch:
        def move(x: Any) -> Any:
            return x.to(device) if isinstance(x, torch.Tensor) else x

        targets = {
            m: Targets(t.captions, [move(e) for e in t.embeddings], [move(x) for x in t.media])
            for m, t in self.targets.items()
        }
        return Batch(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.labels),
            {m: move(x) for m, x in self.media.items()},
            targets,
        )


def as_target(value: Any) -> OutputTarget:
    """An assistant media part's value: an OutputTarget, a caption string, or a dict of fields."""
    if isinstance(value, OutputTarget):
        return value
    if value is None or isinstance(value, str):
        return OutputTarget(caption=value)
    if isinstance(value, dict):
        return OutputTarget(value.get("caption"), value.get("embedding"), value.get("media"))
    raise TypeError(f"cannot read an output target from {type(value).__name__}")


def collate(
    items: list[EncodedConversation],
    pad_id: int,
    prepare_media: Callable[[str, Any], torch.Tensor],
    max_length: int | None = None,
) -> Batch:
    """Right-pad sequences; stack input media per modality in order of occurrence."""
    if max_length is not None:
        for i, item in enumerate(items):
            if len(item.input_ids) > max_length:
                raise ValueError(
                    f"sample {i}: {len(item.input_ids)} tokens exceed max_length {max_length}"
                )
    length = max(len(x.input_ids) for x in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    media: dict[str, list[torch.Tensor]] = {}
    targets: dict[str, Targets] = {}
    for i, item in enumerate(items):
        n = len(item.input_ids)
        ids[i, :n] = torch.tensor(item.input_ids)
        labels[i, :n] = torch.tensor(item.labels)
        mask[i, :n] = 1
        for modality, value in item.media:
            media.setdefault(modality, []).append(prepare_media(modality, value))
        for modality, value in item.outputs:
            target = as_target(value)
            t = targets.setdefault(modality, Targets())
            t.captions.append(target.caption)
            t.embeddings.append(target.embedding)
            t.media.append(target.media)
    stacked = {m: torch.stack(xs) for m, xs in media.items()}
    return Batch(ids, mask, labels, stacked, targets)
