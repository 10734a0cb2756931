"""Put nextgpt-mini together: its model config from the pretrained parts, and the shipped package.

The miniature is an ordinary NExT-GPT model directory: the same `NextGPTConfig` fields as the
full-size model, with the encoder, the LLM and the three diffusion pipelines pointing at what the
build pretrained. The stages train it with `nextgpt train` like any other model; `package_model`
then copies every part into one self-contained folder, in float16 where the tensors are floats,
so that it can ship inside the Python package.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextgpt.config import (
    DecoderConfig,
    EncoderConfig,
    InputProjectorConfig,
    LLMConfig,
    NextGPTConfig,
    OutputProjectorConfig,
    SignalTokenConfig,
    TinyDecoderArch,
)

MINI_NAME = "nextgpt-mini"
# Sampling settings of the miniature's decoders: 20 DDIM steps with guidance 4 is what the decoder
# pretraining judged its generations with.
DECODER_STEPS = 20
DECODER_GUIDANCE = 4.0


def conditioning_shape(modality: str, arch: TinyDecoderArch) -> tuple[int, int]:
    """What a mini decoder is conditioned on: CLIP token states (image, video) or CLAP's
    projected sentence vector (audio). Recorded in the config so that the output projectors can
    be built before the decoders exist (stage 1 runs while they still train)."""
    if modality == "audio":
        return 1, arch.projection_dim
    return arch.text_max_length, arch.text_width


def mini_output_projector() -> OutputProjectorConfig:
    """The miniature's output projectors: small, and centring their inputs (without it the
    stage-2 projector read video direction and audio timbre at chance: docs/mini-design.md §8)."""
    return OutputProjectorConfig(
        hidden_dim=64,
        num_heads=2,
        encoder_layers=1,
        decoder_layers=1,
        ff_dim=128,
        centre_inputs=True,
    )


def mini_input_projector(kind: str) -> InputProjectorConfig:
    """The miniature's input projector of either kind. The grouping one assigns softly: the mini
    encoder's tokens of one input are nearly alike, their hard assignments flip as training moves,
    and stage 1 learned nothing with the paper's hard rule (`GroupingProjector`,
    docs/mini-design.md section 8)."""
    if kind == "grouping":
        return InputProjectorConfig(
            kind="grouping",
            hidden_dim=64,
            depths=(1, 1, 1),
            num_heads=2,
            concept_tokens=(8, 4),
            assignment="soft",
        )
    if kind == "linear":
        return InputProjectorConfig(kind="linear")
    raise ValueError(f"unknown input projector {kind!r}; use grouping or linear")


def mini_config(
    encoder: EncoderConfig,
    llm_dir: str,
    decoders: dict[str, tuple[str, TinyDecoderArch]],
    projector: str = "grouping",
) -> NextGPTConfig:
    """The miniature's model config. `decoders` maps a modality to (pipeline dir, its arch)."""
    decoder_configs = {}
    for modality, (path, arch) in decoders.items():
        cond_len, cond_dim = conditioning_shape(modality, arch)
        decoder_configs[modality] = DecoderConfig(
            modality,
            path,
            cond_len=cond_len,
            cond_dim=cond_dim,
            steps=DECODER_STEPS,
            guidance=DECODER_GUIDANCE,
            height=arch.sample_size if modality != "audio" else None,
            width=arch.sample_size if modality != "audio" else None,
            num_frames=8,
            audio_seconds=1.0,
            tiny=arch,
        )
    return NextGPTConfig(
        name=MINI_NAME,
        encoder=encoder,
        input_projector=mini_input_projector(projector),
        llm=LLMConfig(pretrained=llm_dir, template="vicuna_v1"),
        signal_tokens=SignalTokenConfig(image=4, audio=4, video=8),
        output_projector=mini_output_projector(),
        decoders=decoder_configs,
    )


def half_safetensors(src: Path, dst: Path) -> None:
    """Copy a safetensors file with float32 tensors stored as float16 (metadata kept). Loaders
    cast back to the model's dtype: transformers and diffusers by their `dtype`, the encoder and
    `load_state_dict` by copying into float32 parameters."""
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            t = f.get_tensor(key)
            tensors[key] = t.half() if t.dtype == torch.float32 else t
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst), metadata=metadata)


def _copy_tree(src: Path, dst: Path, half: bool) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_dir():
            continue
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if half and path.suffix == ".safetensors":
            half_safetensors(path, target)
        else:
            shutil.copy2(path, target)


def package_model(
    run: Path,
    judges: Path,
    out: Path,
    half: bool = True,
    decoders: dict[str, Path] | None = None,
) -> dict[str, float]:
    """Copy a trained mini model (a training run or model directory) with every frozen part and
    the judges into one relocatable folder; returns the size of each part in MB. `decoders`
    names pipelines to package in place of those the run's config points at (the build trains
    the stages on the decoders' text encoders before their UNets are done)."""
    from nextgpt.model import CONFIG_FILE, LATEST_FILE, TRAINABLE_FILE

    run = Path(run)
    if (run / LATEST_FILE).is_file():
        run = run / (run / LATEST_FILE).read_text().strip()
    config = NextGPTConfig.from_yaml(run / CONFIG_FILE)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if config.encoder.pretrained is None or config.llm.pretrained is None:
        raise ValueError(f"{run}: the mini model's encoder and LLM must be pretrained files")
    copy = half_safetensors if half else lambda s, d: shutil.copy2(s, d)
    copy(_resolve(config.encoder.pretrained, run), out / "encoder.safetensors")
    _copy_tree(_resolve(config.llm.pretrained, run), out / "llm", half)
    unknown = set(decoders or ()) - set(config.decoders)
    if unknown:
        raise ValueError(f"{run}: no {', '.join(sorted(unknown))} decoder in its config to replace")
    packaged_decoders = {}
    for modality, d in config.decoders.items():
        source = (decoders or {}).get(modality)
        if source is None:
            if d.pretrained is None:
                raise ValueError(f"{run}: the {modality} decoder has no pretrained pipeline")
            source = _resolve(d.pretrained, run)
        _copy_tree(Path(source), out / "decoders" / modality, half)
        packaged_decoders[modality] = replace(d, pretrained=f"decoders/{modality}")
    copy(run / TRAINABLE_FILE, out / TRAINABLE_FILE)
    for path in sorted(judges.glob("*_judge.*")):  # the judges only, not the build's records
        target = out / "judges" / path.name
        target.parent.mkdir(exist_ok=True)
        if half and path.suffix == ".safetensors":
            half_safetensors(path, target)
        else:
            shutil.copy2(path, target)
    packaged = replace(
        config,
        encoder=replace(config.encoder, pretrained="encoder.safetensors"),
        llm=replace(config.llm, pretrained="llm"),
        decoders=packaged_decoders,
    )
    packaged.to_yaml(out / CONFIG_FILE)
    sizes = {
        part.name: round(sum(f.stat().st_size for f in part.rglob("*") if f.is_file()) / 1e6, 2)
        if part.is_dir()
        else round(part.stat().st_size / 1e6, 2)
        for part in sorted(out.iterdir())
    }
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    return sizes


def _resolve(path: str, base: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p
