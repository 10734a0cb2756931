"""The one place that says what each of NExT-GPT's three training stages trains, and its losses.

Everything NExT-GPT adapts falls in one of four parameter groups:
- `input_projector`: encoder tokens -> LLM embeddings;
- `output_projectors`: signal-token states -> decoder conditioning, one per modality;
- `signal_rows`: the embedding and lm_head rows of the signal tokens and media placeholders (the
  full matrices take gradients, masked to those rows, so every other row stays bit-identical);
- `lora`: LoRA adapters on the LLM's linear layers.
The encoder, the LLM's own weights and the diffusion decoders never train. `apply_stage` freezes
everything, unfreezes exactly the stage's groups and fails if any of them is empty, so a stage can
never train nothing (the reference code's stage 3 did).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nextgpt.config import LoraSettings

PARAMETER_GROUPS: tuple[str, ...] = ("input_projector", "output_projectors", "signal_rows", "lora")


@dataclass(frozen=True)
class Stage:
    number: int
    name: str
    trains: tuple[str, ...]  # parameter groups
    losses: tuple[str, ...]  # default loss terms (NextGPT.forward); "diffusion" can be added
    lora: bool  # adds LoRA to the LLM when it has none


STAGES: dict[int, Stage] = {
    # X -> caption: the LLM reads projected media and is scored on the caption it writes.
    1: Stage(1, "encoding-side alignment", ("input_projector",), ("text",), lora=False),
    # caption -> signal tokens: the text loss teaches the signal rows to emit the group, the L2
    # loss aligns the projected group with the decoder's own embedding of the caption.
    2: Stage(
        2,
        "decoding-side alignment",
        ("output_projectors", "signal_rows"),
        ("text", "align"),
        lora=False,
    ),
    # MosIT dialogues: text everywhere, plus the stage-2 losses where a turn generates media.
    3: Stage(
        3,
        "modality-switching instruction tuning",
        ("input_projector", "output_projectors", "signal_rows", "lora"),
        ("text", "align"),
        lora=True,
    ),
}


def get_stage(number: int) -> Stage:
    if number not in STAGES:
        raise ValueError(f"unknown stage {number!r}; use one of {sorted(STAGES)}")
    return STAGES[number]


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Every adaptable parameter of a NextGPT, by group, with its name in the model."""
    names = {id(p): n for n, p in model.named_parameters()}
    base = model.llm.base_model
    rows = [base.get_input_embeddings().weight]
    head = base.get_output_embeddings()
    if head is not None and head.weight is not rows[0]:
        rows.append(head.weight)
    return {
        "input_projector": list(_named(model.input_projector, "input_projector")),
        "output_projectors": list(_named(model.output_projectors, "output_projectors")),
        "signal_rows": [(names[id(p)], p) for p in rows],
        "lora": [(f"llm.{n}", p) for n, p in model.llm.named_parameters() if "lora_" in n],
    }


def _named(module: nn.Module, prefix: str):
    return ((f"{prefix}.{n}", p) for n, p in module.named_parameters())


@dataclass
class StagePlan:
    """What a stage trains in one model: the parameters of each group, and the counts."""

    stage: Stage
    groups: dict[str, list[tuple[str, nn.Parameter]]]
    trainable: int  # parameters that can change (signal rows: only those rows)
    total: int

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.groups.values() for _, p in group]

    def summary(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        groups = ", ".join(self.groups)
        return (
            f"stage {self.stage.number} ({self.stage.name}): training {self.trainable:,} of "
            f"{self.total:,} parameters ({share:.2f}%) in {groups}"
        )


def apply_stage(model: nn.Module, stage: Stage, lora: LoraSettings | None = None) -> StagePlan:
    """Freeze the model but for `stage`'s groups; add LoRA first when the stage needs it."""
    if stage.lora and not model.llm.has_lora:
        settings = lora or LoraSettings()
        model.llm.apply_lora(settings)
        model.config.llm.lora = settings
    model.requires_grad_(False)
    all_groups = parameter_groups(model)
    groups = {}
    for name in stage.trains:
        params = all_groups[name]
        if not params:
            raise ValueError(f"stage {stage.number} trains {name}, but this model has none")
        for _, p in params:
            p.requires_grad_(True)
        groups[name] = params
    special = model.llm.special_ids
    trainable = 0
    for name, params in groups.items():
        for _, p in params:
            if name == "signal_rows":
                _mask_rows(p, special)
                trainable += len(special) * p.shape[1]
            else:
                trainable += p.numel()
    if trainable == 0:
        raise ValueError(f"stage {stage.number} would train nothing")
    total = sum(p.numel() for p in model.parameters())
    return StagePlan(stage, groups, trainable, total)


def _mask_rows(weight: nn.Parameter, rows: list[int]) -> None:
    """Zero the gradient of every row but `rows`, before it reaches `.grad` or a DDP reduction.
    The mask follows the gradient's device: the model may be moved after this (accelerate)."""
    mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    mask[rows] = 1
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))


def set_train_mode(model: nn.Module, plan: StagePlan) -> None:
    """Train mode for the LLM (LoRA dropout, gradient checkpointing) and the trained projectors;
    frozen projectors run as in inference (no Gumbel noise in a frozen grouping projector)."""
    model.train()
    if "input_projector" not in plan.groups:
        model.input_projector.eval()
    if "output_projectors" not in plan.groups:
        model.output_projectors.eval()
