"""`nextgpt convert`: the released NExT-GPT delta becomes a model that `nextgpt generate` runs.

The delta is synthetic but has every key of the public `7b_tiva_v0/pytorch_model.pt` (checked at
full size on the meta device); at toy width it is converted, loaded, and compared with the
reference computations (merged LoRA, `TextFcLayer`, `llama_proj`) restated in `public_layouts`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from public_layouts import (
    DeltaSizes,
    TextFcLayer,
    reference_delta,
    write_delta,
    write_imagebind_pth,
    write_pipeline,
    write_vicuna_v0,
)
from transformers import LlamaForCausalLM

from nextgpt.cli import main
from nextgpt.config import MODALITIES, tiny_config
from nextgpt.convert import (
    ConversionError,
    _check_projector,
    convert_lora,
    convert_nextgpt_delta,
    convert_output_projector,
    reference_added_tokens,
)
from nextgpt.model import NextGPT

TOY = DeltaSizes(
    hidden=64,
    layers=2,
    base_vocab=320,
    imagebind_dim=32,
    rank=4,
    projector_hidden=32,
    cond={"image": (48, 32), "video": (48, 32), "audio": (1, 24)},
)
# the restated reference projector is a pre-norm nn.Transformer, which warns about nested tensors
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor")
PROJECTOR_KEYS = {"image": "gen_text_hidden_fcs.0.", "video": "gen_text_hidden_fcs_video.0."}
PROJECTOR_KEYS["audio"] = "gen_text_hidden_fcs_audio.0."


@dataclasses.dataclass
class Release:
    vicuna: Path
    delta: Path
    imagebind: Path
    decoders: dict[str, str]
    out: Path


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
    root = tmp_path_factory.mktemp("release")
    vicuna = write_vicuna_v0(root / "vicuna-7b-v0", TOY.hidden, TOY.layers)
    delta = write_delta(root / "nextgpt_7b_tiva_v0", TOY, vicuna)
    imagebind = write_imagebind_pth(root / "imagebind_huge.pth", tiny_config().encoder)
    decoders = {m: str(write_pipeline(root / m, m)) for m in MODALITIES}
    out = root / "converted"
    encoder = dataclasses.replace(tiny_config().encoder, pretrained=str(imagebind))
    convert_nextgpt_delta(
        delta,
        vicuna,
        out,
        encoder=encoder,
        decoders=decoders,
        dtype="float32",
        decoder_dtype="float32",
        lora_alpha=16,
    )
    return Release(vicuna, delta, imagebind, decoders, out)


@pytest.fixture(scope="module")
def converted(release) -> NextGPT:
    return NextGPT.from_pretrained(release.out)


@pytest.fixture(scope="module")
def delta(release) -> dict[str, torch.Tensor]:
    return torch.load(release.delta / "pytorch_model.pt", weights_only=True)


def test_the_public_key_layout_converts_at_full_size():
    with torch.device("meta"):
        state = reference_delta(DeltaSizes())
    llm = "llama_model.base_model.model."
    assert state["llama_proj.weight"].shape == (4096, 1024)
    assert state[f"{llm}model.embed_tokens.weight"].shape == (32038, 4096)
    assert state[f"{llm}lm_head.weight"].shape == (32038, 4096)
    assert state[f"{llm}model.layers.31.self_attn.o_proj.lora_A.default.weight"].shape == (32, 4096)
    assert state[f"{llm}model.layers.0.self_attn.q_proj.lora_B.default.weight"].shape == (4096, 32)
    widths = {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}
    for m, prefix in PROJECTOR_KEYS.items():
        assert state[prefix + "fc.weight"].shape == (512, 4096)
        assert state[prefix + "query_embs"].shape == (1, widths[m][0], 512)
        assert state[prefix + "model.weight"].shape == (widths[m][1], 512)
        ref = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        config, ours = convert_output_projector(ref, 4, m)
        assert (config.hidden_dim, config.encoder_layers, config.decoder_layers) == (512, 4, 4)
        assert config.ff_dim == 2048 and config.num_heads == 4
        _check_projector(config, ours, 4096, m)  # loads strictly into our OutputProjector
    lora = {k[len(llm) :]: v for k, v in state.items() if k.startswith(llm) and "lora" in k}
    converted, rank, targets = convert_lora(lora, 32)
    assert rank == 32 and targets == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert len(converted) == 32 * 4 * 2
    assert len(state) == 2 + 32 * 4 * 2 + 2 + 3 * len(ref)
    assert reference_added_tokens()[:3] == ["<Img>", "</Img>", "[IMG0]"]


def test_converted_config_references_the_public_parts(release):
    config = yaml.safe_load((release.out / "config.yaml").read_text())
    assert config["llm"]["pretrained"] == str(release.vicuna.resolve())
    assert config["llm"]["template"] == "nextgpt_v0"
    assert config["llm"]["lora"] == {
        "r": 4,
        "alpha": 16,
        "dropout": 0.1,
        "target_modules": ["k_proj", "o_proj", "q_proj", "v_proj"],
    }
    assert config["input_projector"]["kind"] == "linear"
    assert config["input_projector"]["source"] == "pooled"
    assert config["encoder"]["pretrained"] == str(release.imagebind)
    assert (config["signal_tokens"]) == {"image": 4, "audio": 8, "video": 24}
    assert config["decoders"]["audio"]["cond_len"] == 1
    assert config["decoders"]["audio"]["cond_dim"] == 24
    assert (release.out / "base_rows.safetensors").is_file()
    assert config["llm"]["base_rows"] == "base_rows.safetensors"  # moves with the directory


def test_output_projectors_compute_what_the_reference_computes(converted, delta):
    torch.manual_seed(0)
    for m, prefix in PROJECTOR_KEYS.items():
        length, width = TOY.cond[m]
        reference = TextFcLayer(TOY.hidden, width, length, TOY.projector_hidden)
        reference.load_state_dict(
            {k[len(prefix) :]: v.float() for k, v in delta.items() if k.startswith(prefix)}
        )
        signal = converted.llm.signal.counts[m]
        hidden, embeds = torch.randn(2, signal, TOY.hidden), torch.randn(2, signal, TOY.hidden)
        ours = converted.output_projectors[m](hidden, embeds)
        assert ours.shape == (2, length, width)
        torch.testing.assert_close(ours, reference.eval()(hidden, embeds), atol=1e-5, rtol=1e-4)


def test_input_projection_is_llama_proj_on_the_pooled_vector(converted, delta):
    pooled = torch.randn(3, 1, TOY.imagebind_dim)
    expected = pooled @ delta["llama_proj.weight"].float().T + delta["llama_proj.bias"].float()
    torch.testing.assert_close(converted.input_projector(pooled), expected)
    assert converted.num_media_tokens("image") == 1


def test_llm_matches_vicuna_with_the_delta_merged(release, converted, delta):
    """Logits equal the reference LLM: delta rows in place, LoRA merged (alpha / r scaling)."""
    base, added = TOY.base_vocab, reference_added_tokens()
    reference = LlamaForCausalLM.from_pretrained(release.vicuna, dtype=torch.float32)
    reference.resize_token_embeddings(base + len(added))
    prefix = "llama_model.base_model.model."
    with torch.no_grad():
        reference.model.embed_tokens.weight.copy_(delta[f"{prefix}model.embed_tokens.weight"])
        reference.lm_head.weight.copy_(delta[f"{prefix}lm_head.weight"])
        for i, layer in enumerate(reference.model.layers):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                key = f"{prefix}model.layers.{i}.self_attn.{name}"
                a = delta[f"{key}.lora_A.default.weight"].float()
                b = delta[f"{key}.lora_B.default.weight"].float()
                getattr(layer.self_attn, name).weight += 16 / TOY.rank * b @ a
    theirs = [base + added.index(f"[IMG{i}]") for i in range(4)]
    ours = list(converted.llm.signal.ids["image"])
    text = [1, 40, 41, 42, 100, 7]
    with torch.no_grad():
        expected = reference(torch.tensor([text + theirs])).logits[0]
        embeds = converted.llm.embed(torch.tensor([text + ours]))
        got = converted.llm(embeds)[0][0]
    torch.testing.assert_close(got[:, :base], expected[:, :base], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[:, ours], expected[:, theirs], atol=1e-4, rtol=1e-4)


def test_generate_runs_on_the_converted_model(release, tmp_path, capsys):
    out = tmp_path / "reply"
    code = main(
        [
            "generate",
            "Draw a red ball and let me hear it.",
            "--model",
            str(release.out),
            "--image",
            str(Path(__file__).parents[1] / "nextgpt" / "assets" / "example.png"),
            "--want",
            "image",
            "--steps",
            "2",
            "--max-new-tokens",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    names = sorted(Path(p).name for p in capsys.readouterr().out.split())
    assert names == ["image_0.png", "reply.txt"]


def test_cli_convert_writes_a_model_directory(release, tmp_path, capsys):
    """The CLI names ImageBind-huge: a delta whose input projection reads 1024-d vectors."""
    delta = write_delta(
        tmp_path / "delta", dataclasses.replace(TOY, imagebind_dim=1024), release.vicuna
    )
    out = tmp_path / "converted"
    args = ["convert", str(delta), "--vicuna", str(release.vicuna), "--out", str(out)]
    args += ["--imagebind", str(release.imagebind), "--quantization", "4bit", "--cpu-offload"]
    for m, path in release.decoders.items():
        args += [f"--{m}-decoder", path]
    assert main(args) == 0
    assert f"nextgpt generate --model {out}" in capsys.readouterr().out
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["llm"]["quantization"] == "4bit" and config["llm"]["dtype"] == "bfloat16"
    assert all(d["cpu_offload"] for d in config["decoders"].values())
    assert config["encoder"]["pretrained"] == str(release.imagebind)
    assert config["encoder"]["vision_width"] == 1280  # ImageBind-huge
    assert {d["dtype"] for d in config["decoders"].values()} == {"float16"}
    assert config["decoders"]["image"]["guidance"] == 7.5  # the reference's defaults


def test_wrong_inputs_fail_with_one_line(release, tmp_path, capsys):
    args = ["convert", str(tmp_path / "nothing"), "--vicuna", str(release.vicuna)]
    assert main([*args, "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    other = write_vicuna_v0(tmp_path / "llama", hidden=TOY.hidden, layers=3)
    with pytest.raises(ConversionError, match="LoRA tensors"):
        convert_nextgpt_delta(release.delta, other, tmp_path / "o")
