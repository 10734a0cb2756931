"""Output projector: the LLM's signal-token states -> one diffusion decoder's conditioning.

The LLM emits S signal tokens for a modality; a small encoder-decoder transformer reads their
states and `cond_len` learnable queries turn them into the (cond_len, cond_dim) sequence that the
decoder normally gets from its own text encoder (77x768 for SD-1.5, 1x512 for AudioLDM).

With `centre_inputs`, a learned offset per signal position is subtracted first, initialised from
data (like ActNorm's data-dependent start) by `set_input_offset`. A signal token's state is mostly
that token's own identity: the part that carries the request is a small deviation around a large
per-position constant, and a projector fed the raw states learns to read that deviation slowly.
On the miniature (stage 2, the LLM frozen) it cut the held-out L2 of a freshly trained video
projector from 0.27 to 0.04 at the same 1,000 steps (docs/mini-design.md section 8).
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
        self.input_offset: nn.Parameter | None = None
        if config.centre_inputs:
            self.input_offset = nn.Parameter(torch.zeros(num_signal_tokens, llm_dim))
            self.register_buffer("offset_ready", torch.zeros((), dtype=torch.bool))

    @property
    def needs_offset(self) -> bool:
        """True while a centring projector has not had its offset set from data."""
        return self.input_offset is not None and not bool(self.offset_ready)

    @torch.no_grad()
    def set_input_offset(self, mean: Tensor) -> None:
        """Start the offset at the mean (S, llm_dim) projector input of some training data; it
        trains on from there."""
        if self.input_offset is None:
            raise ValueError("this output projector was built without centre_inputs")
        if mean.shape != self.input_offset.shape:
            raise ValueError(
                f"input offset must be {tuple(self.input_offset.shape)}, got {tuple(mean.shape)}"
            )
        self.input_offset.copy_(mean.to(self.input_offset.dtype))
        self.offset_ready.fill_(True)

    def inputs(self, hidden: Tensor, input_embeds: Tensor | None = None) -> Tensor:
        """What the projector reads before centring: the states [+ the tokens' input embeddings]."""
        if self.add_input_embeddings and input_embeds is not None:
            hidden = hidden + input_embeds
        return hidden

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
        x = self.inputs(hidden, input_embeds).to(self.in_fc.weight.dtype)
        if self.input_offset is not None:
            x = x - self.input_offset
        x = self.in_fc(x)
        memory = self.encoder(x + self.pos_embed)
        queries = self.queries.expand(hidden.shape[0], -1, -1)
        return self.out_fc(self.decoder(queries, memory))
