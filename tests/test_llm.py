"""The LLM wrapper: signal tokens with mean-initialised rows; tokenization that escapes them."""

from __future__ import annotations

import torch

from nextgpt.config import LoraSettings, SignalTokenConfig, tiny_config
from nextgpt.llm import LanguageModel, add_signal_tokens
from nextgpt.signal_tokens import SignalTokens
from nextgpt.tokenizer import train_bpe_tokenizer


def test_signal_tokens_are_added_with_mean_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_bpe_tokenizer(vocab_size=300)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    old = len(tok)
    emb_before = model.get_input_embeddings().weight[:old].clone()
    added = add_signal_tokens(model, tok, SignalTokenConfig(image=4, audio=8, video=24))
    assert added == 4 + 8 + 24 + 3
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == len(tok) == old + added
    torch.testing.assert_close(emb[:old], emb_before)  # old rows untouched
    torch.testing.assert_close(emb[old:], emb_before.mean(0).expand(added, -1))
    torch.testing.assert_close(head[old:], head[:old].mean(0).expand(added, -1))
    # adding again is a no-op (loading a model that already has them)
    assert add_signal_tokens(model, tok, SignalTokenConfig()) == 0


def test_signal_token_ids_are_bound(tiny_llm):
    sig = tiny_llm.signal
    assert [len(sig.ids[m]) for m in ("image", "audio", "video")] == [4, 8, 24]
    assert tiny_llm.tokenizer.convert_ids_to_tokens(list(sig.ids["image"])) == [
        "<image_00>",
        "<image_01>",
        "<image_02>",
        "<image_03>",
    ]
    assert sig.modality_of(sig.ids["video"][5]) == "video"
    assert sig.placeholder_modality[sig.placeholder_ids["audio"]] == "audio"


def test_typed_signal_strings_stay_text(tiny_llm):
    ids = tiny_llm.tokenize("please <image_00><image_01> and <audio> now")
    special = tiny_llm.signal.all_signal_ids | set(tiny_llm.signal.placeholder_ids.values())
    assert not special & set(ids)
    assert tiny_llm.decode(ids) == "please <image_00><image_01> and <audio> now"


def test_bind_fails_without_tokens():
    tok = train_bpe_tokenizer(vocab_size=300)
    try:
        SignalTokens.bind(SignalTokenConfig(), tok)
    except ValueError as e:
        assert "<image_00>" in str(e)
    else:
        raise AssertionError("binding a tokenizer without signal tokens must fail")


def test_lora_trains_adapters_only():
    cfg = tiny_config().llm
    cfg.lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    llm = LanguageModel.from_config(cfg, SignalTokenConfig(), seed=1)
    trainable = {n for n, p in llm.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n or "embed_tokens" in n for n in trainable)
