"""The whole NExT-GPT on tiny components: losses, generation, signal states, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from nextgpt.batch import OutputTarget, collate
from nextgpt.config import MODALITIES
from nextgpt.conversation import Part, Turn, encode_conversation
from nextgpt.model import NextGPT, Reply, TextDelta


def sample_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))


def sample_audio(seconds: float = 1.0, rate: int = 22050) -> tuple[np.ndarray, int]:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate


def sample_video(frames: int = 12, fps: float = 8.0) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 255, (frames, 36, 36, 3), dtype=np.uint8), fps


def encode(model: NextGPT, turns: list[Turn]):
    counts = {m: model.num_media_tokens(m) for m in MODALITIES}
    return encode_conversation(turns, model.llm, model.template, counts)


def make_batch(model: NextGPT):
    turns_a = [
        Turn("user", [Part("image", sample_image()), Part("text", "Describe it.")]),
        Turn("assistant", [Part("text", "A noisy picture.")]),
    ]
    turns_b = [
        Turn("user", [Part("text", "Make a picture and a sound of a red ball.")]),
        Turn(
            "assistant",
            [
                Part("text", "Sure!"),
                Part("image", OutputTarget(caption="a red ball")),
                Part("audio", OutputTarget(caption="a bouncing ball")),
            ],
        ),
    ]
    items = [encode(model, turns_a), encode(model, turns_b)]
    return collate(items, model.llm.tokenizer.pad_token_id, model.prepare_media)


def test_media_token_counts_match_the_projector(tiny_model):
    cfg = tiny_model.config.input_projector
    for m in MODALITIES:
        assert tiny_model.num_media_tokens(m) == cfg.concept_tokens[-1]
    feats = tiny_model.encode_media(
        "image", tiny_model.prepare_media("image", sample_image())[None]
    )
    assert feats.shape == (1, cfg.concept_tokens[-1], tiny_model.llm.hidden_size)


def test_forward_returns_each_loss_term(tiny_model):
    batch = make_batch(tiny_model)
    out = tiny_model(batch, losses=("text", "align"))
    assert set(out.terms) == {"text", "align/image", "align/audio"}
    assert all(torch.isfinite(v) for v in out.terms.values())
    torch.testing.assert_close(out.loss, sum(out.terms.values()))
    text_only = tiny_model(batch, losses=("text",))
    assert set(text_only.terms) == {"text"}
    torch.testing.assert_close(text_only.terms["text"], out.terms["text"])
    with pytest.raises(ValueError, match="unknown loss terms"):
        tiny_model(batch, losses=("bleu",))


def test_align_row_max_shows_one_stuck_row_whole(tiny_model, monkeypatch):
    batch = make_batch(tiny_model)
    del batch.targets["audio"]
    n = len(batch.targets["image"])
    rows, width = tiny_model.decoders["image"].conditioning_shape()
    target = torch.zeros(n, rows, width)
    target[:, 1] = 2.0  # every row fits but one, which is 2 off everywhere: its error is 4
    monkeypatch.setattr(tiny_model, "project_signal", lambda *a: torch.zeros(n, rows, width))
    monkeypatch.setattr(tiny_model, "caption_targets", lambda *a: target)
    out = tiny_model(batch, losses=("align",))
    assert out.terms["align/image"].item() == pytest.approx(4 / rows)
    assert out.diagnostics == {"align_row_max/image": pytest.approx(torch.tensor(4.0))}
    torch.testing.assert_close(out.loss, out.terms["align/image"])  # never part of the loss


def test_align_target_is_the_decoders_own_caption_embedding(tiny_model):
    batch = make_batch(tiny_model)
    target = tiny_model.caption_targets("image", ["a red ball"], [None])
    own = tiny_model.decoders["image"].encode_text(["a red ball"])
    torch.testing.assert_close(target, own)
    # a precomputed embedding is used as given
    batch.targets["image"].embeddings = [own[0]]
    batch.targets["audio"].embeddings = [tiny_model.decoders["audio"].encode_text(["x"])[0]]
    out = tiny_model(batch, losses=("align",))
    assert torch.isfinite(out.loss)


def test_diffusion_loss_reaches_output_projector(tiny_model):
    model = tiny_model
    batch = make_batch(model)
    h = w = model.decoders["image"].pipeline.unet.config.sample_size * 2 ** (
        len(model.decoders["image"].pipeline.vae.config.block_out_channels) - 1
    )
    batch.targets["image"].media = [torch.rand(3, h, w) * 2 - 1]
    del batch.targets["audio"]
    model.zero_grad()
    out = model(batch, losses=("diffusion",))
    assert set(out.terms) == {"diffusion/image"}
    out.loss.backward()
    grads = [p.grad for p in model.output_projectors["image"].parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    unet = model.decoders["image"].pipeline.unet
    assert all(p.grad is None for p in unet.parameters())
    model.zero_grad()


def test_gradients_reach_projectors_not_encoder(tiny_model):
    model = tiny_model
    model.zero_grad()
    model(make_batch(model), losses=("text", "align")).loss.backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    for name, module in (
        ("input", model.input_projector),
        ("image", model.output_projectors["image"]),
    ):
        total = sum(p.grad.abs().sum() for p in module.parameters() if p.grad is not None)
        assert total > 0, f"no gradient reached the {name} projector"
    model.zero_grad()


@pytest.mark.parametrize("want", [["image"], ["audio"], ["video"]])
def test_generate_each_output_modality_from_text(tiny_model, want):
    reply = tiny_model.generate("Make one for me.", modalities=want, max_new_tokens=8)
    assert [m.modality for m in reply.media] == want
    data = reply.media[0].data
    if want == ["image"]:
        assert isinstance(data, Image.Image) and data.size[0] > 0
        assert np.asarray(data).std() > 0
    elif want == ["audio"]:
        wave, rate = data
        assert rate > 0 and wave.ndim == 1 and len(wave) >= rate * 0.5
        assert np.isfinite(wave).all() and wave.std() > 0
    else:
        assert data.dtype == np.uint8 and data.ndim == 4 and data.shape[-1] == 3
        assert data.shape[0] == tiny_model.config.decoders["video"].num_frames
        assert data.std() > 0


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image", "image": sample_image()},
        {"type": "audio", "audio": sample_audio()},
        {"type": "video", "video": sample_video()},
    ],
    ids=["image", "audio", "video"],
)
def test_generate_from_each_input_modality(tiny_model, part):
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "Describe it."}]}]
    reply = tiny_model.generate(messages, modalities=["image", "audio", "video"], max_new_tokens=6)
    assert sorted(m.modality for m in reply.media) == ["audio", "image", "video"]
    # the input medium changes the reply: the media tokens really reach the LLM
    other = tiny_model.generate("Describe it.", modalities=["image"], max_new_tokens=6)
    assert not torch.equal(reply.media[0].conditioning, other.media[0].conditioning) or (
        reply.token_ids != other.token_ids
    )


def test_typed_signal_tokens_produce_no_media(tiny_model):
    sig = "".join(f"<image_{i:02d}>" for i in range(4)) + " <audio_00> <video> <image>"
    reply = tiny_model.generate(f"repeat after me: {sig}", max_new_tokens=12)
    assert reply.media == []
    special = tiny_model.llm.signal.all_signal_ids
    assert not special & set(reply.token_ids)


def test_generation_matches_reference_greedy_decoding(tiny_model):
    """Our KV-cached loop picks the same tokens as transformers' own greedy `generate`."""
    from nextgpt.conversation import parse_messages

    model = tiny_model
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": sample_image(3)},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    turns, _ = parse_messages(messages)
    counts = {m: model.num_media_tokens(m) for m in MODALITIES}
    enc = encode_conversation(turns, model.llm, model.template, counts, add_generation_prompt=True)
    ids = torch.tensor([enc.input_ids])
    media = {"image": model.prepare_media("image", sample_image(3))[None]}
    with torch.no_grad():
        embeds = model.embed_inputs(ids, media)
        ref = model.llm.base_model.generate(
            inputs_embeds=embeds,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=model.llm.eos_token_id,
        )[0].tolist()
    if model.llm.eos_token_id in ref:
        ref = ref[: ref.index(model.llm.eos_token_id)]
    assert len(ref) > 3
    assert not set(ref) & model.llm.signal.all_signal_ids, "pick a prompt without signal tokens"
    reply = model.generate(messages, max_new_tokens=20)
    assert reply.token_ids == ref


def test_signal_states_come_from_the_decoding_pass(tiny_model):
    """The states fed to the output projector equal a full forward at the signal positions."""
    model = tiny_model
    reply = model.generate("Draw it.", modalities=["image"], max_new_tokens=5)
    counts = {m: model.num_media_tokens(m) for m in MODALITIES}
    from nextgpt.conversation import parse_messages

    turns, _ = parse_messages("Draw it.")
    enc = encode_conversation(turns, model.llm, model.template, counts, add_generation_prompt=True)
    full = torch.tensor([enc.input_ids + reply.token_ids])
    with torch.no_grad():
        embeds = model.embed_inputs(full, {})
        _, hidden, _ = model.llm(embeds, output_hidden_states=True)
        cond = model.project_signal("image", full, hidden, embeds)
    assert cond.shape[0] == 1
    torch.testing.assert_close(cond[0], reply.media[0].conditioning, atol=1e-4, rtol=1e-4)


def test_streaming_yields_text_then_media(tiny_model):
    events = list(tiny_model.stream("Say something.", modalities=["image"], max_new_tokens=8))
    reply = events[-1]
    assert isinstance(reply, Reply)
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.strip() == reply.text
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("GeneratedMedia") > max(
        (i for i, k in enumerate(kinds) if k == "TextDelta"), default=-1
    )


def test_generate_rejects_bad_requests(tiny_model):
    with pytest.raises(ValueError, match="unknown output modality 'smell'"):
        tiny_model.generate("hi", modalities=["smell"])
    with pytest.raises(ValueError, match="last message must be the user's"):
        tiny_model.generate(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        )


def test_sampling_is_seeded(tiny_model):
    a = tiny_model.generate("Tell me.", temperature=1.0, seed=3, max_new_tokens=10)
    b = tiny_model.generate("Tell me.", temperature=1.0, seed=3, max_new_tokens=10)
    assert a.token_ids == b.token_ids


def test_save_load_round_trip_is_identical(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = NextGPT.from_pretrained(tmp_path / "m").eval()
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": sample_image(5)},
                {"type": "text", "text": "Draw and describe."},
            ],
        }
    ]
    a = tiny_model.generate(messages, modalities=["image", "audio"], max_new_tokens=8, seed=1)
    b = loaded.generate(messages, modalities=["image", "audio"], max_new_tokens=8, seed=1)
    assert a.token_ids == b.token_ids and a.text == b.text
    for x, y in zip(a.media, b.media):
        torch.testing.assert_close(x.conditioning, y.conditioning)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    np.testing.assert_array_equal(a.audios[0][0], b.audios[0][0])


def test_linear_output_projectors_train_save_and_load(tmp_path):
    """The `linear` kind through the whole model: built from the config, reached by the align
    loss's gradient, and saved and loaded with the weights it learned."""
    import dataclasses

    from nextgpt.config import tiny_config
    from nextgpt.projectors import LinearOutputProjector

    config = tiny_config()
    config.output_projector = dataclasses.replace(config.output_projector, kind="linear")
    model = NextGPT.from_config(config)
    assert all(isinstance(p, LinearOutputProjector) for p in model.output_projectors.values())
    batch = make_batch(model)
    model.forward(batch, losses=("align",)).loss.backward()
    for m in ("image", "audio"):  # the two modalities the batch asks for
        grad = model.output_projectors[m].fc.weight.grad
        assert grad is not None and grad.abs().sum() > 0, m
    with torch.no_grad():
        for param in model.output_projectors.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.eval().save_pretrained(tmp_path / "m")
    loaded = NextGPT.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.output_projector.kind == "linear"
    a = model.generate("Draw.", modalities=["image"], max_new_tokens=8, seed=1)
    b = loaded.generate("Draw.", modalities=["image"], max_new_tokens=8, seed=1)
    assert a.token_ids == b.token_ids and len(a.media) == len(b.media) >= 1
    for x, y in zip(a.media, b.media):
        torch.testing.assert_close(x.conditioning, y.conditioning)
        assert x.conditioning.abs().max() > 0  # the learned weights, not the zeros it started at


def test_decoders_load_only_when_first_needed():
    from nextgpt.config import tiny_config

    model = NextGPT.from_config(tiny_config()).eval()
    assert not any(d.is_loaded for d in model.decoders.values())
    model.generate("Just talk.", modalities=["text"], max_new_tokens=4)
    assert not any(d.is_loaded for d in model.decoders.values())
    model.generate("Draw.", modalities=["image"], max_new_tokens=4)
    assert {m for m, d in model.decoders.items() if d.is_loaded} == {"image"}
    model.decoders["image"].release()
    assert not model.decoders["image"].is_loaded


def test_multi_turn_history_with_generated_media(tiny_model):
    first = tiny_model.generate("Draw a ball.", modalities=["image"], max_new_tokens=4)
    history = [
        {"role": "user", "content": "Draw a ball."},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": first.text}, {"type": "image", "image": None}],
        },
        # the generated picture goes back in through the encoder in the next user turn
        {
            "role": "user",
            "content": [
                {"type": "image", "image": first.images[0]},
                {"type": "text", "text": "Now make it a sound."},
            ],
        },
    ]
    reply = tiny_model.generate(history, modalities=["audio"], max_new_tokens=4)
    assert [m.modality for m in reply.media] == ["audio"]
    # the earlier assistant turn is laid out with its image signal group
    from nextgpt.conversation import encode_conversation, parse_messages

    turns, _ = parse_messages(history)
    counts = {m: tiny_model.num_media_tokens(m) for m in MODALITIES}
    enc = encode_conversation(turns, tiny_model.llm, tiny_model.template, counts)
    ids = enc.input_ids
    group = list(tiny_model.llm.signal.ids["image"])
    assert any(ids[i : i + len(group)] == group for i in range(len(ids)))


def test_stop_text_ends_a_reply_and_is_never_streamed():
    from nextgpt.model import visible_text

    assert visible_text("Hi there\n### Human", "\n###") == ("Hi there", True)
    # a tail that may become the stop string is held back while streaming, released at the end
    assert visible_text("Hi there\n#", "\n###") == ("Hi there", False)
    assert visible_text("Hi there\n#", "\n###", final=True) == ("Hi there\n#", False)
    assert visible_text("a # b", None) == ("a # b", False)


def test_template_stop_string_stops_generation(tiny_model, monkeypatch):
    """With a stop string the reply ends at it, and streamed text never contains it."""
    import dataclasses

    free = tiny_model.generate("Tell me.", max_new_tokens=12)
    assert len(free.text) > 3
    stop = free.text[2:4]  # a piece of what the model says anyway
    monkeypatch.setattr(tiny_model, "template", dataclasses.replace(tiny_model.template, stop=stop))
    events = list(tiny_model.stream("Tell me.", max_new_tokens=12))
    reply = events[-1]
    streamed = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert stop not in streamed and stop not in reply.text
    assert len(reply.token_ids) < len(free.token_ids)
    assert free.text.startswith(reply.text)
