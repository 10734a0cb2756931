"""Signal-group rules: groups complete in order, no repeats, required ones forced, others banned."""

from __future__ import annotations

import torch

from nextgpt.decoding import SamplingOptions, SignalGuide, choose_token


def run(guide: SignalGuide, prefer: list[int], eos: int, vocab: int, max_new: int = 50):
    """Decode with a fake model that always prefers the given tokens in order (then EOS)."""
    out: list[int] = []
    queue = list(prefer)
    options = SamplingOptions(max_new_tokens=max_new)
    while len(out) < 200:
        logits = torch.zeros(vocab)
        logits[queue[0] if queue else eos] = 10.0
        token = guide.next_token(logits, options, None, eos, len(out))
        if token is None:
            break
        if queue and token == queue[0]:
            queue.pop(0)
        out.append(token)
        guide.advance(token)
    return out


def test_started_group_completes_in_order(tiny_llm):
    sig = tiny_llm.signal
    img = list(sig.ids["image"])
    eos = tiny_llm.eos_token_id
    vocab = len(tiny_llm.tokenizer)
    # the model tries to stop right after the first image token: the group is completed anyway
    guide = SignalGuide(sig, allowed={"image", "audio", "video"})
    out = run(guide, [img[0]], eos, vocab)
    assert out == img and guide.produced == ["image"]


def test_no_repeated_or_partial_groups(tiny_llm):
    sig = tiny_llm.signal
    img = list(sig.ids["image"])
    eos = tiny_llm.eos_token_id
    vocab = len(tiny_llm.tokenizer)
    # a degenerate model that wants endless image groups and stray mid-group tokens
    guide = SignalGuide(sig, allowed={"image"})
    out = run(guide, img + img + [img[3]] * 5, eos, vocab)
    assert out.count(img[0]) == 1 and out[:4] == img
    assert guide.produced == ["image"]


def test_disallowed_modality_is_never_started(tiny_llm):
    sig = tiny_llm.signal
    guide = SignalGuide(sig, allowed={"image"})
    out = run(guide, [sig.ids["video"][0]], tiny_llm.eos_token_id, len(tiny_llm.tokenizer))
    assert not set(out) & set(sig.ids["video"])


def test_required_modalities_are_forced_before_stop(tiny_llm):
    sig = tiny_llm.signal
    guide = SignalGuide(sig, allowed={"audio", "video"}, required={"audio", "video"})
    out = run(guide, [], tiny_llm.eos_token_id, len(tiny_llm.tokenizer))
    assert sorted(guide.produced) == ["audio", "video"]
    assert out == list(sig.ids["audio"]) + list(sig.ids["video"])


def test_required_groups_fit_the_token_budget(tiny_llm):
    sig = tiny_llm.signal
    text_token = 50
    guide = SignalGuide(sig, allowed={"image"}, required={"image"})
    out = run(guide, [text_token] * 100, tiny_llm.eos_token_id, len(tiny_llm.tokenizer), max_new=10)
    assert len(out) == 10 and out[-4:] == list(sig.ids["image"])


def test_nucleus_sampling_respects_top_p():
    logits = torch.tensor([5.0, 4.9, -10.0, -10.0])
    g = torch.Generator().manual_seed(0)
    draws = {
        choose_token(logits, SamplingOptions(temperature=1.0, top_p=0.5), g) for _ in range(50)
    }
    assert draws == {0}
    draws = {
        choose_token(logits, SamplingOptions(temperature=1.0, top_p=1.0), g) for _ in range(200)
    }
    assert draws == {0, 1}
