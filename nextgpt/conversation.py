"""Conversations: messages that mix text and media, turned into token ids, labels and media slots.

One function, `encode_conversation`, serves training and generation, so the model sees the same
layout in both. User media become a run of placeholder ids (later replaced by projected encoder
tokens); media in an assistant turn become that modality's signal-token group (what the model must
emit). Text is tokenized with special tokens split, so a typed `<image_00>` or `<image>` is text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nextgpt.config import MODALITIES

IGNORE_INDEX = -100


@dataclass
class ChatTemplate:
    """Role prefixes and separators; the model's EOS token ends every assistant turn."""

    system: str
    user: str = "USER:"
    assistant: str = "ASSISTANT:"
    sep: str = " "
    stop: str | None = None  # text that ends a reply for models trained without EOS after turns


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate(
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    ),
    # Vicuna v0 (the 2023 NExT-GPT release) uses "### Human:" / "### Assistant:" turns.
    "vicuna_v0": ChatTemplate(
        system="A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's questions.",
        user="### Human:",
        assistant="### Assistant:",
        sep="\n",
    ),
    # the released NExT-GPT checkpoint: no system line, replies end with "\n###" rather than EOS
    "nextgpt_v0": ChatTemplate(
        system="", user="### Human:", assistant="### Assistant:", sep="\n", stop="\n###"
    ),
    "plain": ChatTemplate(system="", user="USER:", assistant="ASSISTANT:", sep=" "),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


@dataclass
class Part:
    """One piece of a turn: `kind` is "text" or a modality; `value` is the text or the media."""

    kind: str
    value: Any


@dataclass
class Turn:
    role: str  # "user" | "assistant"
    parts: list[Part]


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    media: list[tuple[str, Any]] = field(default_factory=list)  # user media, in order
    outputs: list[tuple[str, Any]] = field(default_factory=list)  # assistant media, in order


def parse_messages(messages: list[dict] | str) -> tuple[list[Turn], str | None]:
    """Read OpenAI-style messages into turns; returns (turns, system prompt override).

    Content is a string or a list of parts: `{"type": "text", "text": ...}` or
    `{"type": "image" | "audio" | "video", "<type>": value}` (a path, PIL image, array, ...).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    turns: list[Turn] = []
    system: str | None = None
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role == "system":
            if not isinstance(content, str):
                raise ValueError(f"message {i}: a system message must be a string")
            system = content
            continue
        if role not in ("user", "assistant"):
            raise ValueError(f"message {i}: unknown role {role!r}; use user, assistant or system")
        turns.append(Turn(role, _parse_content(content, i)))
    return turns, system


def _parse_content(content: Any, index: int) -> list[Part]:
    if isinstance(content, str):
        return [Part("text", content)]
    if not isinstance(content, list):
        raise ValueError(f"message {index}: content must be a string or a list of parts")
    parts = []
    for j, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            parts.append(Part("text", str(item.get("text", ""))))
        elif kind in MODALITIES:
            if kind not in item:
                raise ValueError(f"message {index} part {j}: a {kind} part needs a '{kind}' key")
            parts.append(Part(kind, item[kind]))
        else:
            raise ValueError(
                f"message {index} part {j}: unknown part type {kind!r}; "
                f"use text, {', '.join(MODALITIES)}"
            )
    return parts


def encode_conversation(
    turns: list[Turn],
    llm,
    template: ChatTemplate,
    num_media_tokens: dict[str, int],
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> EncodedConversation:
    """Lay out turns as `[BOS] system USER: ... ASSISTANT: ...<eos>...`.

    Only assistant content and its closing EOS are supervised (labels); everything else is
    IGNORE_INDEX. With `add_generation_prompt` the sequence ends with an open assistant turn.
    """
    signal = llm.signal
    bos = llm.tokenizer.bos_token_id
    ids: list[int] = [bos] if bos is not None else []
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    enc = EncodedConversation(ids, labels)

    def add(tokens: list[int], supervised: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))

    system_text = template.system if system is None else system
    prefix = system_text + template.sep if system_text else ""
    for t, turn in enumerate(turns):
        if turn.role == "user":
            add(llm.tokenize(f"{prefix}{template.user} "), False)
            prefix = ""
            for part in turn.parts:
                if part.kind == "text":
                    add(llm.tokenize(part.value), False)
                else:
                    add([signal.placeholder_ids[part.kind]] * num_media_tokens[part.kind], False)
                    enc.media.append((part.kind, part.value))
            add(llm.tokenize(template.sep), False)
        else:
            add(llm.tokenize(template.assistant), False)
            for part in turn.parts:
                if part.kind == "text":
                    add(llm.tokenize(" " + part.value if part.value else ""), True)
                else:
                    add(list(signal.ids[part.kind]), True)
                    enc.outputs.append((part.kind, part.value))
            add([llm.eos_token_id], True)
            if t != len(turns) - 1:
                add(llm.tokenize(template.sep), False)
    if add_generation_prompt:
        if turns and turns[-1].role == "assistant":
            raise ValueError("the last message is the assistant's: nothing to reply to")
        add(llm.tokenize(template.assistant), False)
    return enc
