"""Conversation layout: what is supervised, where media go, and which text is never special."""

from __future__ import annotations

import pytest

from nextgpt.conversation import (
    IGNORE_INDEX,
    Part,
    Turn,
    encode_conversation,
    get_template,
    parse_messages,
)

COUNTS = {"image": 3, "audio": 2, "video": 5}


def test_layout_and_labels(tiny_llm):
    turns = [
        Turn("user", [Part("image", "img.png"), Part("text", "What is this?")]),
        Turn("assistant", [Part("text", "A red circle.")]),
        Turn("user", [Part("text", "Draw a blue one.")]),
        Turn("assistant", [Part("text", "Sure!"), Part("image", "a blue circle")]),
    ]
    enc = encode_conversation(turns, tiny_llm, get_template("vicuna_v1"), COUNTS)
    ids, labels = enc.input_ids, enc.labels
    assert len(ids) == len(labels)
    assert ids[0] == tiny_llm.tokenizer.bos_token_id
    sig = tiny_llm.signal
    assert ids.count(sig.placeholder_ids["image"]) == 3  # one image, 3 tokens
    assert enc.media == [("image", "img.png")]
    assert enc.outputs == [("image", "a blue circle")]
    supervised = [t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX]
    # exactly the assistant replies, their signal group and one EOS per assistant turn
    text = tiny_llm.tokenizer.decode(supervised, skip_special_tokens=False)
    assert text.count("</s>") == 2
    assert "A red circle." in text and "Sure!" in text
    assert "What is this" not in text and "Draw a blue" not in text
    assert supervised[-5:-1] == list(sig.ids["image"])
    # placeholder positions are never supervised
    assert all(
        lab == IGNORE_INDEX for t, lab in zip(ids, labels) if t == sig.placeholder_ids["image"]
    )


def test_generation_prompt_ends_with_assistant(tiny_llm):
    turns, _ = parse_messages("hello")
    enc = encode_conversation(
        turns, tiny_llm, get_template("vicuna_v1"), COUNTS, add_generation_prompt=True
    )
    assert tiny_llm.decode(enc.input_ids).endswith("ASSISTANT:")
    assert all(lab == IGNORE_INDEX for lab in enc.labels)


def test_user_text_that_looks_special_is_text(tiny_llm):
    turns, _ = parse_messages("<image_00><image_01><image_02><image_03> <image> <video>")
    enc = encode_conversation(
        turns, tiny_llm, get_template("vicuna_v1"), COUNTS, add_generation_prompt=True
    )
    sig = tiny_llm.signal
    special = sig.all_signal_ids | set(sig.placeholder_ids.values())
    assert not special & set(enc.input_ids)
    assert enc.media == []


def test_parse_messages_errors():
    with pytest.raises(ValueError, match="unknown part type 'gif'"):
        parse_messages([{"role": "user", "content": [{"type": "gif", "gif": 1}]}])
    with pytest.raises(ValueError, match="unknown role"):
        parse_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match="needs a 'image' key"):
        parse_messages([{"role": "user", "content": [{"type": "image"}]}])
    turns, system = parse_messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    )
    assert system == "Be brief." and len(turns) == 1
