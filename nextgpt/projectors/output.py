"""Output projectors: the LLM's signal-token states -> one diffusion decoder's conditioning.

The LLM emits S signal tokens for a modality; a projector reads their states and returns the
(cond_len, cond_dim) sequence that the decoder normally gets from its own text encoder (77x768 for
SD-1.5, 1x512 for AudioLDM). Two kinds (`OutputProjectorConfig.kind`):

- `transformer` (`OutputProjector`, the paper's): a small encoder-decoder transformer whose
  `cond_len` learnable queries read the S states.
- `linear` (`LinearOutputProjector`): one linear map from the S states, flattened, to the whole
  conditioning. When the states carry a request's attributes as a sum (they do in the miniature:
  a linear probe reads held-out combinations from them), a linear map sends a combination never
  seen in training to the sum of its attributes' conditionings, where the transformer writes
  whatever its training left between the seen pairs. Fitted on the miniature's train requests
  only, a linear map drew held-out image colour at 0.96-0.98 from the very states the
  transformer drew at 0.77 (docs/mini-design.md section 8).

With `centre_inputs`, the running mean of what the projector reads, per signal position, is
subtracted first: mean-only batch normalisation (Salimans & Kingma, 2016), with the mean kept as
an exponential moving average over training batches and used as is at inference. A signal
token's state is mostly that token's own identity: the part that carries the request is a small
deviation around a large per-position constant, and a projector fed the raw states learns to
read it slowly. The constant also moves while stage 2 trains the signal rows from scratch, so a
mean taken once at the start is soon stale (measured: off by as much as the mean itself after
6,000 steps), hence the running average. On the shipped miniature's stage-2 states a freshly
trained video projector reached an L2 of 0.018 centred against 0.042 raw at the same 1,000 steps
(docs/mini-design.md section 8).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nextgpt.config import OutputProjectorConfig


class _SignalReader(nn.Module):
    """What both kinds do before projecting: check the span, add the signal tokens' input
    embeddings when configured, cast to the projector's dtype and centre by the running mean."""

    def __init__(self, config: OutputProjectorConfig, llm_dim: int, num_signal_tokens: int) -> None:
        super().__init__()
        self.num_signal_tokens = num_signal_tokens
        self.add_input_embeddings = config.add_input_embeddings
        self.centre_inputs = config.centre_inputs
        self.centre_momentum = config.centre_momentum
        if config.centre_inputs:
            self.register_buffer("input_mean", torch.zeros(num_signal_tokens, llm_dim))
            self.register_buffer("mean_ready", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _track_mean(self, x: Tensor) -> None:
        """Fold a training batch's mean input into the running mean (the first batch sets it)."""
        batch_mean = x.mean(0).to(self.input_mean.dtype)
        if bool(self.mean_ready):
            self.input_mean.lerp_(batch_mean, self.centre_momentum)
        else:
            self.input_mean.copy_(batch_mean)
            self.mean_ready.fill_(True)

    def read(self, hidden: Tensor, input_embeds: Tensor | None, dtype: torch.dtype) -> Tensor:
        """(B, S, llm_dim) signal-token states [+ input embeddings] -> centred (B, S, llm_dim).

        S must equal `num_signal_tokens`: reading the wrong span of the LLM's output (an
        off-by-one in the reference code) should fail loudly, not project the wrong tokens.
        """
        if hidden.ndim != 3 or hidden.shape[1] != self.num_signal_tokens:
            raise ValueError(
                f"output projector expects (B, {self.num_signal_tokens}, llm_dim) signal-token "
                f"states, got {tuple(hidden.shape)}"
            )
        if self.add_input_embeddings and input_embeds is not None:
            hidden = hidden + input_embeds
        # the LLM may run in another precision than the trained projector
        x = hidden.to(dtype)
        if self.centre_inputs:
            if self.training and x.shape[0] > 0:
                self._track_mean(x.detach())
            x = x - self.input_mean.to(x.dtype)
        return x


class OutputProjector(_SignalReader):
    """Linear(llm -> hidden) -> transformer encoder over the S signal states (+ learned positions)
    -> transformer decoder over `cond_len` learned queries -> Linear(hidden -> cond_dim)."""

    def __init__(
        self,
        config: OutputProjectorConfig,
        llm_dim: int,
        num_signal_tokens: int,
        cond_len: int,
        cond_dim: int,
    ) -> None:
        super().__init__(config, llm_dim, num_signal_tokens)
        d = config.hidden_dim
        self.in_fc = nn.Linear(llm_dim, d)
        self.pos_embed = nn.Parameter(torch.randn(num_signal_tokens, d) * 0.02)
        self.queries = nn.Parameter(torch.randn(cond_len, d) * 0.02)
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                d,
                config.num_heads,
                config.ff_dim,
                config.dropout,
                batch_first=True,
                norm_first=True,
            ),
            config.encoder_layers,
            norm=nn.LayerNorm(d),
            enable_nested_tensor=False,  # unsupported with norm_first; avoids torch's warning
        )
        self.decoder = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(
                d,
                config.num_heads,
                config.ff_dim,
                config.dropout,
                batch_first=True,
                norm_first=True,
            ),
            config.decoder_layers,
            norm=nn.LayerNorm(d),
        )
        self.out_fc = nn.Linear(d, cond_dim)

    def forward(self, hidden: Tensor, input_embeds: Tensor | None = None) -> Tensor:
        """(B, S, llm_dim) signal-token states [+ input embeddings] -> (B, cond_len, cond_dim)."""
        x = self.in_fc(self.read(hidden, input_embeds, self.in_fc.weight.dtype))
        memory = self.encoder(x + self.pos_embed)
        queries = self.queries.expand(hidden.shape[0], -1, -1)
        return self.out_fc(self.decoder(queries, memory))


class LinearOutputProjector(_SignalReader):
    """One linear map from the S centred signal states, flattened, to the whole conditioning.

    It starts at zero (weights and bias), so training begins from the conditioning every request
    shares and every later change is learned from the align loss, as the closed-form probe that
    motivated it was fitted (docs/mini-design.md section 8). It has S * llm_dim * cond_len *
    cond_dim weights: at most 0.53M a modality in the miniature, but about a billion for SD-1.5's
    4 signal tokens under a 7B LLM (7.8 billion for Zeroscope's 24), so paper-size models keep
    the transformer.
    """

    def __init__(
        self,
        config: OutputProjectorConfig,
        llm_dim: int,
        num_signal_tokens: int,
        cond_len: int,
        cond_dim: int,
    ) -> None:
        super().__init__(config, llm_dim, num_signal_tokens)
        self.cond_shape = (cond_len, cond_dim)
        self.fc = nn.Linear(num_signal_tokens * llm_dim, cond_len * cond_dim)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, hidden: Tensor, input_embeds: Tensor | None = None) -> Tensor:
        """(B, S, llm_dim) signal-token states [+ input embeddings] -> (B, cond_len, cond_dim)."""
        x = self.read(hidden, input_embeds, self.fc.weight.dtype)
        return self.fc(x.flatten(1)).view(hidden.shape[0], *self.cond_shape)


_PROJECTORS: dict[str, type[OutputProjector | LinearOutputProjector]] = {
    "transformer": OutputProjector,
    "linear": LinearOutputProjector,
}
OUTPUT_PROJECTOR_KINDS: tuple[str, ...] = tuple(_PROJECTORS)


def build_output_projector(
    config: OutputProjectorConfig,
    llm_dim: int,
    num_signal_tokens: int,
    cond_len: int,
    cond_dim: int,
) -> nn.Module:
    """The output projector named by `config.kind`, for one modality's signal tokens."""
    if config.kind not in _PROJECTORS:
        raise ValueError(
            f"unknown output projector kind {config.kind!r}; known: "
            f"{', '.join(OUTPUT_PROJECTOR_KINDS)}"
        )
    return _PROJECTORS[config.kind](config, llm_dim, num_signal_tokens, cond_len, cond_dim)
