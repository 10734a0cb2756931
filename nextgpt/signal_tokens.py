"""The one place that says which special tokens exist: signal tokens and media placeholders.

Signal tokens are what the LLM writes to ask for an output modality (`<image_00>..<image_03>`,
`<audio_00>..`, `<video_00>..`); a group is always emitted whole and in order. Media placeholders
(`<image>`, `<audio>`, `<video>`) mark where projected input media are spliced into the LLM input.
Both are added to the tokenizer as special tokens, and user text is tokenized with special tokens
split, so typing `<image_00>` never produces one.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextgpt.config import MODALITIES, SignalTokenConfig


def signal_token_names(modality: str, count: int) -> list[str]:
    return [f"<{modality}_{i:02d}>" for i in range(count)]


def placeholder_name(modality: str) -> str:
    return f"<{modality}>"


@dataclass(frozen=True)
class SignalTokens:
    """Names and (once bound to a tokenizer) ids of every signal token and media placeholder."""

    counts: dict[str, int]
    ids: dict[str, tuple[int, ...]]  # modality -> signal token ids, in order
    placeholder_ids: dict[str, int]  # modality -> placeholder id

    @staticmethod
    def names(config: SignalTokenConfig) -> list[str]:
        """All special-token strings to add, signal tokens first, then the placeholders."""
        out: list[str] = []
        for m in MODALITIES:
            out += signal_token_names(m, getattr(config, m))
        out += [placeholder_name(m) for m in MODALITIES]
        return out

    @classmethod
    def bind(cls, config: SignalTokenConfig, tokenizer) -> SignalTokens:
        """Look up the ids of tokens already added to `tokenizer`; fail loudly if any is missing."""
        counts = {m: getattr(config, m) for m in MODALITIES}
        vocab = tokenizer.get_vocab()
        missing = [n for n in cls.names(config) if n not in vocab]
        if missing:
            raise ValueError(f"tokenizer lacks signal/placeholder tokens {missing[:5]}...")
        ids = {m: tuple(vocab[n] for n in signal_token_names(m, counts[m])) for m in MODALITIES}
        placeholder_ids = {m: vocab[placeholder_name(m)] for m in MODALITIES}
        return cls(counts=counts, ids=ids, placeholder_ids=placeholder_ids)

    @property
    def all_signal_ids(self) -> set[int]:
        return {i for ids in self.ids.values() for i in ids}

    @property
    def start_ids(self) -> dict[int, str]:
        """First id of each group -> its modality."""
        return {ids[0]: m for m, ids in self.ids.items() if ids}

    def modality_of(self, token_id: int) -> str | None:
        for m, ids in self.ids.items():
            if token_id in ids:
                return m
        return None

    @property
    def placeholder_modality(self) -> dict[int, str]:
        return {i: m for m, i in self.placeholder_ids.items()}
