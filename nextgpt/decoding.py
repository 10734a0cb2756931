"""Token choice during generation: sampling plus the rules that keep signal tokens well formed.

The reference code's degenerate outputs (endless `[IMG3] [VID8]`, half groups, an assertion on the
span of signal tokens) come from letting the LLM emit signal tokens freely. Here a group, once
started, is completed in order; a modality is produced at most once per reply; modalities the caller
did not allow are never started; modalities the caller requires are started when the model would
otherwise stop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nextgpt.signal_tokens import SignalTokens


@dataclass
class SamplingOptions:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None


def choose_token(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None
) -> int:
    """Greedy at temperature 0, else nucleus sampling."""
    if options.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / options.temperature, dim=-1)
    if options.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < options.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class SignalGuide:
    """State machine over signal-token groups for one reply."""

    signal: SignalTokens
    allowed: set[str]  # modalities the reply may produce
    required: set[str] = field(default_factory=set)  # modalities it must produce
    banned_ids: set[int] = field(default_factory=set)  # e.g. placeholders, BOS, pad
    produced: list[str] = field(default_factory=list)
    _group: str | None = None
    _pos: int = 0

    @property
    def in_group(self) -> bool:
        return self._group is not None

    def group_of(self, token: int) -> str | None:
        """The modality whose group `token` continues or starts; None for a text token."""
        return self._group or self.signal.start_ids.get(token)

    @property
    def pending(self) -> list[str]:
        return [m for m in sorted(self.required) if m not in self.produced]

    def tokens_needed(self) -> int:
        """Tokens still owed: the rest of the open group plus every pending group."""
        rest = len(self.signal.ids[self._group]) - self._pos if self._group else 0
        return rest + sum(len(self.signal.ids[m]) for m in self.pending if m != self._group)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with every token that would break the rules set to -inf."""
        out = logits.clone()
        if self._group is not None:
            forced = self.signal.ids[self._group][self._pos]
            keep = out[forced].clone()
            out.fill_(float("-inf"))
            out[forced] = keep if torch.isfinite(keep) else 0.0
            return out
        banned = set(self.banned_ids)
        for m, ids in self.signal.ids.items():
            banned.update(ids[1:])
            if m not in self.allowed or m in self.produced:
                banned.update(ids[:1])
        if banned:
            out[torch.tensor(sorted(banned), dtype=torch.long)] = float("-inf")
        return out

    def override(self, token: int, eos_id: int, budget_left: int) -> int:
        """Replace the chosen token when the model would stop (or run out) with groups pending."""
        stopping = token == eos_id or budget_left <= self.tokens_needed()
        if self._group is None and self.pending and stopping:
            return self.signal.ids[self.pending[0]][0]
        return token

    def next_token(
        self,
        logits: torch.Tensor,
        options: SamplingOptions,
        generator: torch.Generator | None,
        eos_id: int,
        generated: int,
    ) -> int | None:
        """Choose the next token under the rules, or None to stop the reply.

        The token budget (`options.max_new_tokens`) stops text, never an open or required group.
        """
        budget_left = options.max_new_tokens - generated
        token = self.override(
            choose_token(self.mask(logits), options, generator), eos_id, budget_left
        )
        if token == eos_id or (budget_left <= 0 and not self.in_group and not self.pending):
            return None
        return token

    def advance(self, token: int) -> str | None:
        """Record `token`; returns the modality when it completes a group."""
        if self._group is None:
            m = self.signal.start_ids.get(token)
            if m is None:
                return None
            self._group, self._pos = m, 0
        self._pos += 1
        if self._pos == len(self.signal.ids[self._group]):
            done, self._group = self._group, None
            self.produced.append(done)
            return done
        return None
