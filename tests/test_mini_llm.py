"""The miniature's LLM: dialogues laid out as stages 1-3 lay them out; a short training lowers the
held-out loss; the saved model and tokenizer load as a `LanguageModel`."""

from __future__ import annotations

import pytest
import torch

from nextgpt.config import LLMConfig, SignalTokenConfig
from nextgpt.conversation import IGNORE_INDEX, Part, Turn, encode_conversation, get_template
from nextgpt.llm import LanguageModel
from nextgpt.mini.dialogues import KINDS, PLACEHOLDER, DatasetSizes, make_dialogue, write_dataset
from nextgpt.mini.pretrain_llm import (
    TEMPLATE,
    Encoder,
    LLMTraining,
    layout,
    pretrain_llm,
    read_dialogues,
    save_llm,
)
from nextgpt.mini.world import World


@pytest.fixture(scope="module")
def world() -> World:
    return World()


@pytest.fixture(scope="module")
def data_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("mini-data") / "train"
    sizes = DatasetSizes(comprehension=30, generation=30, instructions=dict.fromkeys(KINDS, 30))
    write_dataset(world, out, "train", sizes)
    return out


@pytest.fixture(scope="module")
def trained(world, data_dir):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return pretrain_llm(world, data_dir, LLMTraining.smoke())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loaded(trained, tmp_path_factory) -> LanguageModel:
    model, tokenizer, _ = trained
    directory = tmp_path_factory.mktemp("mini-llm")
    save_llm(model, tokenizer, directory)
    return LanguageModel.from_config(
        LLMConfig(pretrained=str(directory), template=TEMPLATE), SignalTokenConfig()
    )


def test_reads_every_dialogue_file(data_dir):
    assert len(read_dialogues(data_dir)) == 3 * (30 + 30) + 30 * len(KINDS)


def test_short_training_lowers_heldout_answer_loss(trained):
    _, _, metrics = trained
    before, after = metrics["heldout_answer_loss_before"], metrics["heldout_answer_loss_after"]
    assert after < 0.75 * before, (before, after)


def test_saved_llm_loads_as_language_model(trained, loaded):
    model, tokenizer, _ = trained
    tok = loaded.tokenizer
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(tok, name) == getattr(tokenizer, name)
    ids = torch.tensor([loaded.tokenize("USER: What colour is it? ASSISTANT:")])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = loaded.model(input_ids=ids).logits[..., : expected.shape[-1]]
    torch.testing.assert_close(got, expected)


def _turns(dialogue) -> list[Turn]:
    turns = []
    for speaker, text in dialogue.turns:
        parts = []
        for i, piece in enumerate(PLACEHOLDER.split(text)):
            if i % 2:
                parts.append(Part(piece, None))
            elif piece.strip():
                parts.append(Part("text", piece.strip()))
        turns.append(Turn("user" if speaker == "human" else "assistant", parts))
    return turns


@pytest.mark.parametrize("kind", KINDS)
def test_layout_matches_encode_conversation_without_media(world, loaded, kind):
    """The pretraining text is exactly what stages 1-3 feed the LLM, media tokens removed."""
    template = get_template(TEMPLATE)
    encoder = Encoder(loaded.tokenizer)
    media_ids = set(loaded.special_ids)
    for index in range(3):
        dialogue = make_dialogue(world, kind, "train", index, stream="layout-test")
        enc = encode_conversation(
            _turns(dialogue), loaded, template, dict.fromkeys(("image", "audio", "video"), 2)
        )
        kept = [(i, y) for i, y in zip(enc.input_ids, enc.labels) if i not in media_ids]
        ids, labels = encoder.encode(layout(dialogue.turns, template))
        assert ids == [i for i, _ in kept]
        assert labels == [y for _, y in kept]
        assert any(y != IGNORE_INDEX for y in labels)
