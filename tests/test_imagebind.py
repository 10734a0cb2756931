"""ImageBind encoder: shapes, token counts, official checkpoint layout, loading and saving.

`official_shapes` restates, from the official source (facebookresearch/ImageBind,
`imagebind_model.py`, `multimodal_preprocessors.py`, `transformer.py`, `helpers.py`), the names and
shapes of the official state dict for any sizes. It is checked against
`fixtures/imagebind_huge_keys.txt` (made by running the official constructor), and used to write
reduced-width checkpoints in the official layout. `fixtures/imagebind_reference_outputs.json` holds
the official forward's outputs for such a checkpoint (`reference_weights`) and `reference_inputs`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nextgpt.config import EncoderConfig, tiny_config
from nextgpt.encoders.imagebind import ImageBindEncoder

FIXTURES = Path(__file__).parent / "fixtures"

# Sizes of the reference checkpoint: the official defaults for everything the official
# constructor hard-codes (224 px images, 77-token text, 128x204 fbank), small widths elsewhere.
REFERENCE = EncoderConfig(
    embed_dim=16,
    vision_width=32,
    vision_layers=2,
    vision_heads=2,
    text_width=32,
    text_layers=2,
    text_heads=4,
    audio_width=24,
    audio_layers=2,
    audio_heads=2,
    audio_clips=2,
    video_clips=2,
    depth_width=16,
    depth_layers=1,
    depth_heads=2,
    thermal_width=16,
    thermal_layers=1,
    thermal_heads=2,
    imu_width=16,
    imu_layers=1,
    imu_heads=2,
    all_modalities=True,
)


def official_shapes(c: EncoderConfig) -> dict[str, tuple[int, ...]]:
    """The official state dict's names and shapes for the sizes in `c`."""
    s: dict[str, tuple[int, ...]] = {}
    pre, e = "modality_preprocessors.", c.embed_dim
    grid = c.image_size // c.patch_size
    w = c.vision_width
    s[pre + "vision.cls_token"] = (1, 1, w)
    s[pre + "vision.rgbt_stem.proj.1.weight"] = (w, 3, 2, c.patch_size, c.patch_size)
    vision_tokens = 1 + c.video_frames_per_clip // 2 * grid * grid
    s[pre + "vision.pos_embedding_helper.pos_embed"] = (1, vision_tokens, w)
    s[pre + "text.pos_embed"] = (1, c.text_context, c.text_width)
    s[pre + "text.mask"] = (c.text_context, c.text_context)
    s[pre + "text.token_embedding.weight"] = (c.text_vocab, c.text_width)

    def patch_pre(name: str, stem: str, width: int, kernel: int, in_ch: int, patches: int) -> None:
        s[f"{pre}{name}.cls_token"] = (1, 1, width)
        s[f"{pre}{name}.{stem}.proj.weight"] = (width, in_ch, kernel, kernel)
        s[f"{pre}{name}.{stem}.norm_layer.weight"] = (width,)
        s[f"{pre}{name}.{stem}.norm_layer.bias"] = (width,)
        s[f"{pre}{name}.pos_embedding_helper.pos_embed"] = (1, 1 + patches, width)

    audio_patches = ((c.audio_mel_bins - c.audio_patch) // c.audio_stride + 1) * (
        (c.audio_target_len - c.audio_patch) // c.audio_stride + 1
    )
    patch_pre("audio", "rgbt_stem", c.audio_width, c.audio_patch, 1, audio_patches)

    def trunk(name: str, width: int, layers: int, pre_ln: bool, bias_kv: bool) -> None:
        t = f"modality_trunks.{name}."
        if pre_ln:
            s[t + "pre_transformer_layer.0.weight"] = (width,)
            s[t + "pre_transformer_layer.0.bias"] = (width,)
        for i in range(layers):
            b = f"{t}blocks.{i}."
            s[b + "attn.in_proj_weight"] = (3 * width, width)
            s[b + "attn.in_proj_bias"] = (3 * width,)
            if bias_kv:
                s[b + "attn.bias_k"] = (1, 1, width)
                s[b + "attn.bias_v"] = (1, 1, width)
            s[b + "attn.out_proj.weight"] = (width, width)
            s[b + "attn.out_proj.bias"] = (width,)
            for norm in ("norm_1", "norm_2"):
                s[f"{b}{norm}.weight"] = (width,)
                s[f"{b}{norm}.bias"] = (width,)
            s[b + "mlp.fc1.weight"] = (4 * width, width)
            s[b + "mlp.fc1.bias"] = (4 * width,)
            s[b + "mlp.fc2.weight"] = (width, 4 * width)
            s[b + "mlp.fc2.bias"] = (width,)

    def head(name: str, width: int, linear_index: int = 2) -> None:
        s[f"modality_heads.{name}.0.weight"] = (width,)
        s[f"modality_heads.{name}.0.bias"] = (width,)
        s[f"modality_heads.{name}.{linear_index}.weight"] = (e, width)

    trunk("vision", w, c.vision_layers, True, False)
    trunk("text", c.text_width, c.text_layers, False, False)
    trunk("audio", c.audio_width, c.audio_layers, False, True)
    head("vision", w)
    s["modality_heads.text.proj.0.weight"] = (c.text_width,)
    s["modality_heads.text.proj.0.bias"] = (c.text_width,)
    s["modality_heads.text.proj.1.weight"] = (e, c.text_width)
    head("audio", c.audio_width)
    scaled = ["text", "audio"]
    if c.all_modalities:
        dt_patches = (c.image_size // 16) ** 2
        patch_pre("depth", "depth_stem", c.depth_width, 16, 1, dt_patches)
        patch_pre("thermal", "rgbt_stem", c.thermal_width, 16, 1, dt_patches)
        s[pre + "imu.pos_embed"] = (1, 2000 // 8 + 1, c.imu_width)
        s[pre + "imu.cls_token"] = (1, 1, c.imu_width)
        s[pre + "imu.imu_stem.proj.weight"] = (c.imu_width, 48)
        s[pre + "imu.imu_stem.norm_layer.weight"] = (c.imu_width,)
        s[pre + "imu.imu_stem.norm_layer.bias"] = (c.imu_width,)
        trunk("depth", c.depth_width, c.depth_layers, False, True)
        trunk("thermal", c.thermal_width, c.thermal_layers, False, True)
        trunk("imu", c.imu_width, c.imu_layers, False, True)
        head("depth", c.depth_width)
        head("thermal", c.thermal_width)
        head("imu", c.imu_width, linear_index=3)
        scaled += ["depth", "thermal", "imu"]
    for name in scaled:
        s[f"modality_postprocessors.{name}.1.log_logit_scale"] = ()
    return s


def reference_weights(c: EncoderConfig) -> dict[str, torch.Tensor]:
    """Deterministic weights in the official layout (LayerNorm weights near 1, the causal mask)."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for name, shape in sorted(official_shapes(c).items()):
        t = torch.randn(shape, generator=g) * 0.05
        state[name] = t + 1.0 if name.endswith(".weight") and len(shape) == 1 else t
    n = c.text_context
    state["modality_preprocessors.text.mask"] = torch.full((n, n), float("-inf")).triu(1)
    return state


def reference_inputs(c: EncoderConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    s = c.image_size
    text = torch.randint(1, 49000, (2, c.text_context), generator=g)
    for row, eot in enumerate((5, 9)):  # <start> ... <end> then zero padding, as the tokenizer
        text[row, eot] = 49407
        text[row, eot + 1 :] = 0
    return {
        "image": torch.randn(2, 3, s, s, generator=g),
        "video": torch.randn(1, c.video_clips, 3, c.video_frames_per_clip, s, s, generator=g),
        "audio": torch.randn(
            2, c.audio_clips, 1, c.audio_mel_bins, c.audio_target_len, generator=g
        ),
        "text": text,
    }


def read_key_fixture() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in (FIXTURES / "imagebind_huge_keys.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, shape = line.split()
            inner = shape.strip("()")
            shapes[name] = tuple(int(d) for d in inner.split(",")) if inner else ()
    return shapes


def shapes_of(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(scope="module")
def tiny() -> ImageBindEncoder:
    torch.manual_seed(0)
    return ImageBindEncoder.from_config(tiny_config().encoder).eval()


def tiny_inputs(c: EncoderConfig, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    s = c.image_size
    return {
        "image": torch.randn(batch, 3, s, s, generator=g),
        "video": torch.randn(batch, c.video_clips, 3, c.video_frames_per_clip, s, s, generator=g),
        "audio": torch.randn(
            batch, c.audio_clips, 1, c.audio_mel_bins, c.audio_target_len, generator=g
        ),
        "text": torch.randint(0, c.text_vocab, (batch, c.text_context), generator=g),
    }


# ---- shapes and token counts -----------------------------------------------------------------
def test_tiny_shapes_and_exact_token_counts(tiny: ImageBindEncoder) -> None:
    c = tiny.config
    # image 32 px / patch 8 -> 4x4 patches + CLS; video: 2 clips of that; audio: fbank 32x64 with
    # 16x16 patches, stride 10 -> 2x5 patches + CLS, 2 clips; text: the context.
    expected = {"image": 17, "video": 34, "audio": 22, "text": 16}
    inputs = tiny_inputs(c)
    with torch.no_grad():
        for modality, n in expected.items():
            assert tiny.num_tokens(modality) == n, modality
            out = tiny.encode(modality, inputs[modality])
            assert out.tokens.shape == (2, n, c.embed_dim), modality
            assert out.pooled.shape == (2, c.embed_dim), modality
            assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def test_pooled_is_the_official_reduction_of_the_tokens(tiny: ImageBindEncoder) -> None:
    c = tiny.config
    inputs = tiny_inputs(c)
    per_clip = tiny.num_tokens("image")
    with torch.no_grad():
        image = tiny.encode("image", inputs["image"])
        video = tiny.encode("video", inputs["video"])
        audio = tiny.encode("audio", inputs["audio"])
    torch.testing.assert_close(image.pooled, F.normalize(image.tokens[:, 0], dim=-1))
    assert torch.allclose(image.pooled.norm(dim=-1), torch.ones(2))
    cls = video.tokens[:, ::per_clip]  # the CLS token of each clip
    assert cls.shape[1] == c.video_clips
    torch.testing.assert_close(video.pooled, F.normalize(cls, dim=-1).mean(dim=1))
    audio_cls = audio.tokens[:, :: tiny.num_tokens("audio") // c.audio_clips]
    torch.testing.assert_close(audio.pooled, 20.0 * F.normalize(audio_cls, dim=-1).mean(dim=1))


def test_an_image_is_a_clip_of_two_identical_frames(tiny: ImageBindEncoder) -> None:
    c = tiny.config
    image = tiny_inputs(c)["image"]
    clip = image[:, None, :, None].expand(-1, c.video_clips, -1, c.video_frames_per_clip, -1, -1)
    with torch.no_grad():
        a = tiny.encode("image", image)
        b = tiny.encode("video", clip)
    n = tiny.num_tokens("image")
    torch.testing.assert_close(b.tokens[:, :n], a.tokens)
    torch.testing.assert_close(b.tokens[:, n:], a.tokens)
    torch.testing.assert_close(b.pooled, a.pooled)


def test_text_is_causal_and_pooled_at_the_end_token(tiny: ImageBindEncoder) -> None:
    ids = tiny_inputs(tiny.config)["text"][:1].clone()
    ids[0, :] = 3
    ids[0, 6] = 500  # the highest id marks the end of the text
    changed = ids.clone()
    changed[0, 10] = 7
    with torch.no_grad():
        a, b = tiny.encode("text", ids), tiny.encode("text", changed)
    torch.testing.assert_close(a.tokens[:, :10], b.tokens[:, :10])
    assert not torch.allclose(a.tokens[:, 10], b.tokens[:, 10])
    torch.testing.assert_close(a.pooled, b.pooled)  # position 10 comes after the end token
    scale = tiny.modality_postprocessors["text"][1].log_logit_scale.exp()
    torch.testing.assert_close(a.pooled, scale * F.normalize(a.tokens[:, 6], dim=-1))


def test_eval_encode_is_deterministic_and_batch_independent(tiny: ImageBindEncoder) -> None:
    inputs = tiny_inputs(tiny.config, batch=3)
    with torch.no_grad():
        for modality, x in inputs.items():
            first, again = tiny.encode(modality, x), tiny.encode(modality, x)
            assert torch.equal(first.tokens, again.tokens) and torch.equal(
                first.pooled, again.pooled
            )
            alone = tiny.encode(modality, x[1:2])
            torch.testing.assert_close(alone.tokens, first.tokens[1:2], atol=1e-5, rtol=1e-4)


def test_wrong_input_shape_and_modality_are_rejected(tiny: ImageBindEncoder) -> None:
    c = tiny.config
    bad_clips = torch.zeros(1, c.video_clips + 1, 3, 2, c.image_size, c.image_size)
    with pytest.raises(ValueError, match=r"video input of shape .*expected \(B, 2, 3, 2, 32, 32\)"):
        tiny.encode("video", bad_clips)
    with pytest.raises(ValueError, match="image input"):
        tiny.encode("image", torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="unknown modality 'depth'"):
        tiny.encode("depth", torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="video_frames_per_clip=3"):
        ImageBindEncoder(dataclasses.replace(c, video_frames_per_clip=3))


# ---- save / load -----------------------------------------------------------------------------
def test_save_load_round_trip(tiny: ImageBindEncoder, tmp_path: Path) -> None:
    path = tmp_path / "enc" / "encoder.safetensors"
    tiny.save(path)
    loaded = ImageBindEncoder.from_config(dataclasses.replace(tiny.config, pretrained=str(path)))
    loaded.eval()
    assert shapes_of(loaded.state_dict()) == shapes_of(tiny.state_dict())
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = tiny_inputs(tiny.config)["audio"]
    with torch.no_grad():
        assert torch.equal(loaded.encode("audio", x).tokens, tiny.encode("audio", x).tokens)


@pytest.mark.parametrize(
    ("drift", "message"),
    [
        ("rename", r"missing: modality_trunks\.audio\.blocks\.0\.norm_1\.weight.*unexpected: "),
        ("drop", r"missing: modality_heads\.vision\.2\.weight"),
        (
            "shape",
            r"shape \(file vs model\): modality_preprocessors\.vision\.cls_token \(1, 1, 8\)",
        ),
    ],
)
def test_drifted_checkpoint_fails_with_a_clear_message(
    tiny: ImageBindEncoder, tmp_path: Path, drift: str, message: str
) -> None:
    state = dict(tiny.state_dict())
    if drift == "rename":
        state["modality_trunks.audio.blocks.0.norm1.weight"] = state.pop(
            "modality_trunks.audio.blocks.0.norm_1.weight"
        )
    elif drift == "drop":
        del state["modality_heads.vision.2.weight"]
    else:
        state["modality_preprocessors.vision.cls_token"] = torch.zeros(1, 1, 8)
    path = tmp_path / "drifted.pth"
    torch.save(state, path)
    config = dataclasses.replace(tiny.config, pretrained=str(path))
    with pytest.raises(ValueError, match=message) as err:
        ImageBindEncoder.from_config(config)
    assert "drifted.pth does not match" in str(err.value)


def test_missing_or_foreign_file_is_reported(tmp_path: Path) -> None:
    config = dataclasses.replace(tiny_config().encoder, pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        ImageBindEncoder.from_config(config)
    torch.save({"epoch": 3}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="other.pth: expected a state dict"):
        ImageBindEncoder.from_config(
            dataclasses.replace(config, pretrained=str(tmp_path / "other.pth"))
        )


# ---- the official layout ---------------------------------------------------------------------
def test_huge_model_has_exactly_the_official_keys_and_shapes() -> None:
    official = read_key_fixture()
    assert len(official) == 1311
    assert official_shapes(EncoderConfig(all_modalities=True)) == official
    with torch.device("meta"):
        huge = ImageBindEncoder(EncoderConfig(all_modalities=True))
    ours = shapes_of(huge.state_dict())
    assert sorted(set(ours) ^ set(official)) == []
    assert ours == official
    params = sum(p.numel() for p in huge.parameters())
    assert 1.1e9 < params < 1.3e9  # "1.2B parameters"


def test_core_model_is_the_official_layout_without_depth_thermal_imu() -> None:
    with torch.device("meta"):
        core = ImageBindEncoder(EncoderConfig())
    assert shapes_of(core.state_dict()) == official_shapes(EncoderConfig())
    assert not any(k.split(".")[1] in {"depth", "thermal", "imu"} for k in core.state_dict())


def test_official_layout_checkpoint_reproduces_the_official_forward(tmp_path: Path) -> None:
    """A reduced-width .pth in the official layout loads strictly and gives the outputs of the
    official code (fixture) for the same weights and inputs."""
    expected = json.loads((FIXTURES / "imagebind_reference_outputs.json").read_text())
    path = tmp_path / "imagebind_small.pth"
    torch.save(reference_weights(REFERENCE), path)
    inputs = reference_inputs(REFERENCE)
    for wrapped, all_modalities in ((False, True), (True, False)):
        if wrapped:  # a checkpoint that nests the state dict, loaded without the extra trunks
            torch.save({"model": torch.load(path, weights_only=True)}, path)
        config = dataclasses.replace(REFERENCE, pretrained=str(path), all_modalities=all_modalities)
        model = ImageBindEncoder.from_config(config).eval()
        assert ("depth" in model.modality_trunks) == all_modalities
        with torch.no_grad():
            for modality, x in inputs.items():
                out = model.encode(modality, x)
                ref = expected[modality]
                assert out.tokens.shape[1] == ref["num_tokens"] == model.num_tokens(modality)
                torch.testing.assert_close(
                    out.pooled, torch.tensor(ref["pooled"]), atol=2e-5, rtol=1e-4
                )
                torch.testing.assert_close(
                    out.tokens[:, :3], torch.tensor(ref["tokens_first3"]), atol=2e-5, rtol=1e-4
                )
                torch.testing.assert_close(
                    out.tokens[:, -2:], torch.tensor(ref["tokens_last2"]), atol=2e-5, rtol=1e-4
                )
