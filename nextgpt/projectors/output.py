"""Output projector: the LLM's signal-token states -> one diffusion decoder's conditioning.

The LLM emits S signal tokens for a modality; a small encoder-decoder transformer reads their
states and `cond_len` learnable queries turn them into the (cond_len, cond_dim) sequence that the
decoder normally gets from its own text encoder (77x768 for SD-1.5, 1x512 for AudioLDM).

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


class OutputProjector(nn.Module):
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
        super().__init__()
        d = config.hidden_dim
        self.num_signal_tokens = num_signal_tokens
        self.add_input_embeddings = config.add_input_embeddings
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

    def forward(self, hidden: Tensor, input_embeds: Tensor | None = None) -> Tensor:
        """(B, S, llm_dim) signal-token states [+ input embeddings] -> (B, cond_len, cond_dim).

        S must equal `num_signal_tokens`: reading the wrong span of the LLM's output (an
        off-by-one in the reference code) should fail loudly, not project the wrong tokens.
        """
        if hidden.ndim != 3 or hidden.shape[1] != self.num_signal_tokens:
            raise ValueError(
                f"output projector expects (B, {self.num_signal_tokens}, llm_dim) signal-token "
                f"states, got {tuple(hidden.shape)}"
            )
        # the LLM may run in another precision than the trained projector
        if self.add_input_embeddings and input_embeds is not None:
            hidden = hidden + input_embeds
        x = hidden.to(self.in_fc.weight.dtype)
        if self.centre_inputs:
            if self.training and x.shape[0] > 0:
                self._track_mean(x.detach())
            x = x - self.input_mean.to(x.dtype)
        x = self.in_fc(x)
        memory = self.encoder(x + self.pos_embed)
        queries = self.queries.expand(hidden.shape[0], -1, -1)
        return self.out_fc(self.decoder(queries, memory))
