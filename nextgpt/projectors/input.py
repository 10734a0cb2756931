"""Input projectors: encoder tokens (B, N, in_dim) -> LLM input embeddings (B, M, out_dim).

`linear` maps every token on its own (the 2023 NExT-GPT). `grouping` is the ICML version: learnable
concept tokens gather the encoder tokens in stages (GroupViT-like), so the LLM reads a few
concept-level tokens whatever the number of patches of the modality.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextgpt.config import InputProjectorConfig

INPUT_PROJECTOR_KINDS: tuple[str, ...] = ("linear", "grouping")


class LinearProjector(nn.Module):
    """One shared Linear(in_dim -> out_dim) per token; the token count is unchanged."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def num_output_tokens(self, n_in: int) -> int:
        return n_in

    def forward(self, tokens: Tensor) -> Tensor:
        # the frozen encoder may run in another precision than the trained projector
        return self.proj(tokens.to(self.proj.weight.dtype))


def gumbel_soft_assign(similarity: Tensor, tau: Tensor, noise_scale: float) -> Tensor:
    """Soft assignment of each input token over the concepts: `softmax(similarity / tau +
    noise_scale * G)` over dim 1 of the (B, M concepts, N tokens) similarity, G ~ Gumbel(0, 1).

    The temperature divides the similarity only. Written as `(similarity + G) / tau`, the noise
    (its maximum grows like log M) swamps cosine similarities in [-1, 1] and no value of tau can
    change which concept wins, so training assignments are random (measured: 1.6% agreement with
    the noise-free ones for 64 concepts). Here a learned tau sharpens the logits against the noise,
    which is how the paper says tau "finds the assignment boundaries". `noise_scale=0` (eval)
    gives a deterministic assignment.
    """
    logits = similarity / tau
    if noise_scale:
        # sample in float32: a bf16 uniform hits 0 often enough to give infinite noise
        u = torch.rand(similarity.shape, device=similarity.device, dtype=torch.float32)
        gumbel = -torch.log(-torch.log(u.clamp_(min=torch.finfo(torch.float32).tiny)))
        logits = logits + noise_scale * gumbel.to(similarity.dtype)
    return torch.softmax(logits, dim=1)


def gumbel_hard_assign(similarity: Tensor, tau: Tensor, noise_scale: float) -> Tensor:
    """Hard one-hot assignment of each input token to one concept, differentiable straight-through.

    Every column of the result is exactly one-hot in the forward pass, while the backward pass sees
    the soft assignment `A` of `gumbel_soft_assign`: `onehot(argmax A) + A - stopgrad(A)` (the
    paper's and GroupViT's rule).
    """
    soft = gumbel_soft_assign(similarity, tau, noise_scale)
    hard = torch.zeros_like(soft).scatter_(1, soft.argmax(dim=1, keepdim=True), 1.0)
    # parenthesised so that the forward value is exactly `hard` (no rounding of 1 + s - s)
    return hard + (soft - soft.detach())


# `InputProjectorConfig.assignment` -> how a grouping stage turns similarities into assignments
ASSIGNMENTS = {"hard": gumbel_hard_assign, "soft": gumbel_soft_assign}


def group_average(assign: Tensor, x: Tensor) -> Tensor:
    """Mean of the tokens `x` (B, N, D) assigned to each concept by `assign` (B, M, N).

    A concept that received no token gets a zero vector rather than a division by zero. With a
    soft assignment the weights are fractional, and a concept whose total weight is under one
    token gets its weighted sum: it fades in and out with its weight instead of jumping.
    """
    counts = assign.sum(dim=-1, keepdim=True).clamp(min=1.0)
    return (assign @ x) / counts


def _transformer_blocks(
    dim: int, depth: int, num_heads: int, mlp_ratio: float, dropout: float
) -> nn.Sequential:
    """`depth` pre-norm transformer layers (an empty stack is the identity)."""
    return nn.Sequential(
        *(
            nn.TransformerEncoderLayer(
                dim,
                num_heads,
                dim_feedforward=int(dim * mlp_ratio),
                dropout=dropout,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(depth)
        )
    )


class _GroupingStage(nn.Module):
    """Transformer over [concepts; tokens], then merge the tokens into the concepts they match."""

    def __init__(
        self,
        dim: int,
        num_concepts: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        init_tau: float,
        gumbel_scale: float,
        assignment: str = "hard",
    ) -> None:
        super().__init__()
        self.gumbel_scale = gumbel_scale
        self.assign = ASSIGNMENTS[assignment]
        self.concepts = nn.Parameter(torch.randn(num_concepts, dim) * 0.02)
        self.blocks = _transformer_blocks(dim, depth, num_heads, mlp_ratio, dropout)
        # learned in log space so that tau stays positive
        self.log_tau = nn.Parameter(torch.tensor(math.log(init_tau)))
        hidden = int(dim * mlp_ratio)
        self.merge_mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, D) -> new tokens (B, M, D) and the assignment (B, M, N)."""
        m = self.concepts.shape[0]
        concepts = self.concepts.expand(x.shape[0], -1, -1)
        y = self.blocks(torch.cat([concepts, x], dim=1))
        c_hat, x_hat = y[:, :m], y[:, m:]
        similarity = F.normalize(c_hat, dim=-1) @ F.normalize(x_hat, dim=-1).transpose(1, 2)
        noise = self.gumbel_scale if self.training else 0.0
        assign = self.assign(similarity, self.log_tau.exp(), noise)
        return c_hat + self.merge_mlp(group_average(assign, x_hat)), assign


class GroupingProjector(nn.Module):
    """Concept-token grouping (NExT-GPT ICML): N encoder tokens -> `concept_tokens[-1]` tokens.

    in_fc -> one grouping stage per entry of `config.concept_tokens` (each with `depths[l]`
    transformer layers) -> `depths[-1]` transformer layers over the last concepts -> LayerNorm ->
    out_fc. There are no positional embeddings: the encoder's tokens already carry their own, and
    any N works. After each forward, `last_assignments[l]` holds stage l's assignment
    (B, M_l, N_l), detached, for inspection: column n says which concept token n joined (one-hot
    with `assignment="hard"`, weights summing to 1 with `"soft"`).

    `assignment="hard"` is the paper's rule (argmax with the straight-through trick). It assumes
    that the tokens of one input differ, as ViT patch tokens do. Where they are nearly alike, as in
    nextgpt-mini's 2-layer encoder (spread across an input's tokens a third of that across
    inputs), a token's similarities to the concepts are close, small parameter moves flip many
    assignments at once, and the output jumps where the straight-through gradient, which sees only
    the soft weights, expects it to move smoothly. Measured there, stage 1 with hard assignment
    made the projector's output nearly the same for every input and the captions stayed at chance;
    `"soft"` merges with the Gumbel-softmax weights themselves, which move continuously, and
    learned (docs/mini-design.md section 8).
    """

    def __init__(self, config: InputProjectorConfig, in_dim: int, out_dim: int) -> None:
        super().__init__()
        if len(config.depths) != len(config.concept_tokens) + 1:
            raise ValueError(
                f"grouping projector: depths {tuple(config.depths)} must have one entry per "
                f"concept stage {tuple(config.concept_tokens)} plus one for the final stage"
            )
        if config.assignment not in ASSIGNMENTS:
            raise ValueError(
                f"grouping projector: unknown assignment {config.assignment!r}; "
                f"known: {', '.join(ASSIGNMENTS)}"
            )
        d = config.hidden_dim
        self.concept_tokens = tuple(config.concept_tokens)
        self.in_fc = nn.Linear(in_dim, d)
        self.stages = nn.ModuleList(
            _GroupingStage(
                d,
                m,
                depth,
                config.num_heads,
                config.mlp_ratio,
                config.dropout,
                config.init_tau,
                config.gumbel_scale,
                config.assignment,
            )
            for m, depth in zip(config.concept_tokens, config.depths)
        )
        self.final_blocks = _transformer_blocks(
            d, config.depths[-1], config.num_heads, config.mlp_ratio, config.dropout
        )
        self.norm = nn.LayerNorm(d)
        self.out_fc = nn.Linear(d, out_dim)
        self.last_assignments: list[Tensor] = []

    def num_output_tokens(self, n_in: int) -> int:
        return self.concept_tokens[-1] if self.concept_tokens else n_in

    def forward(self, tokens: Tensor) -> Tensor:
        # the frozen encoder may run in another precision than the trained projector
        x = self.in_fc(tokens.to(self.in_fc.weight.dtype))
        assignments = []
        for stage in self.stages:
            x, assign = stage(x)
            assignments.append(assign.detach())
        self.last_assignments = assignments
        return self.out_fc(self.norm(self.final_blocks(x)))


def build_input_projector(config: InputProjectorConfig, in_dim: int, out_dim: int) -> nn.Module:
    """The input projector named by `config.kind`, mapping in_dim-wide tokens to out_dim."""
    if config.kind == "linear":
        return LinearProjector(in_dim, out_dim)
    if config.kind == "grouping":
        return GroupingProjector(config, in_dim, out_dim)
    raise ValueError(
        f"unknown input projector kind {config.kind!r}; known: {', '.join(INPUT_PROJECTOR_KINDS)}"
    )
