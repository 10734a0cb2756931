"""Configs: presets, YAML round trip, and errors that name the offending field."""

from __future__ import annotations

import pytest

from nextgpt.config import PRESETS, NextGPTConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_yaml(name, tmp_path):
    config = NextGPTConfig.from_name(name)
    path = tmp_path / "c.yaml"
    config.to_yaml(path)
    assert NextGPTConfig.from_yaml(path) == config
    assert NextGPTConfig.from_yaml_text(config.to_yaml()) == config


def test_paper_sizes_in_the_7b_preset():
    c = NextGPTConfig.from_name("nextgpt-7b")
    assert c.encoder.embed_dim == 1024 and c.encoder.vision_width == 1280
    assert (c.signal_tokens.image, c.signal_tokens.video, c.signal_tokens.audio) == (4, 24, 8)
    assert c.input_projector.concept_tokens == (64, 8) and c.input_projector.depths == (6, 3, 3)
    assert c.output_projector.hidden_dim == 512 and c.output_projector.encoder_layers == 4
    assert c.llm.pretrained == "lmsys/vicuna-7b-v1.5"
    # no decoder shape is hard-coded: each is read from the decoder's own config when built
    assert all(d.cond_len is None and d.cond_dim is None for d in c.decoders.values())


def test_tiny_preset_builds_nothing_pretrained():
    c = NextGPTConfig.from_name("tiny")
    assert c.encoder.pretrained is None and c.llm.pretrained is None
    assert all(d.pretrained is None for d in c.decoders.values())
    assert c.output_modalities == ("image", "audio", "video")


def test_errors_name_the_field(tmp_path):
    text = NextGPTConfig.from_name("tiny").to_yaml()
    with pytest.raises(ValueError, match=r"config\.encoder: unknown field\(s\) \['widht'\]"):
        NextGPTConfig.from_yaml_text(text.replace("  embed_dim: 32", "  widht: 32"))
    with pytest.raises(ValueError, match=r"config\.llm\.hidden_size: expected int"):
        NextGPTConfig.from_yaml_text(text.replace("hidden_size: 64", "hidden_size: big"))
    with pytest.raises(ValueError, match="expected a mapping"):
        NextGPTConfig.from_yaml_text("- just\n- a list\n")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        NextGPTConfig.from_yaml(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        NextGPTConfig.from_name("huge")


def test_exponent_floats_without_a_dot():
    """`lr: 3e-2` is a string to YAML 1.1; a float field still takes it as a number."""
    text = NextGPTConfig.from_name("tiny").to_yaml().replace("init_tau: 0.1", "init_tau: 1e-1")
    assert NextGPTConfig.from_yaml_text(text).input_projector.init_tau == 0.1
    with pytest.raises(ValueError, match="init_tau: expected a number, got 'warm'"):
        NextGPTConfig.from_yaml_text(text.replace("init_tau: 1e-1", "init_tau: warm"))
