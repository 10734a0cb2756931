"""Configuration of a NExT-GPT model: one dataclass per component, composed into `NextGPTConfig`.

The data path is encoder -> input projector -> LLM -> output projectors -> decoders; each stage has
its own dataclass here so that a YAML file, the Python API and the CLI all speak the same fields.
Dimensions that belong to a decoder (its conditioning length and width) are *not* fixed here: they
are read from the decoder's own config when the model is built (see `nextgpt.decoders`), and only
recorded in `DecoderConfig.cond_len` / `cond_dim` so that a saved checkpoint can be checked against
the decoder it is loaded with.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODALITIES: tuple[str, ...] = ("image", "audio", "video")


@dataclass
class EncoderConfig:
    """ImageBind-architecture encoder. Defaults are ImageBind-huge; `pretrained` points at weights.

    `pretrained` is a path to the official `imagebind_huge.pth` or to our own `encoder.safetensors`;
    `None` builds the architecture with random weights (tests, or before pretraining the miniature).
    NExT-GPT only encodes images, video, audio (and text); the depth / thermal / IMU trunks exist
    only so that the official checkpoint loads strictly. With `all_modalities=False` they are not
    built and their weights in a checkpoint are skipped (128M of the 1.2B parameters).
    The official weights are licensed CC-BY-NC-SA 4.0.
    """

    pretrained: str | None = None
    embed_dim: int = 1024  # the shared embedding space; patch tokens are returned at this width
    # vision trunk (images, and video as 2-frame temporal patches)
    image_size: int = 224
    patch_size: int = 14
    video_frames_per_clip: int = 2
    vision_width: int = 1280
    vision_layers: int = 32
    vision_heads: int = 16
    # text trunk
    text_width: int = 1024
    text_layers: int = 24
    text_heads: int = 16
    text_context: int = 77
    text_vocab: int = 49408
    # audio trunk: Kaldi-style fbank of 16 kHz audio cut into clips
    audio_width: int = 768
    audio_layers: int = 12
    audio_heads: int = 12
    audio_mel_bins: int = 128
    audio_target_len: int = 204
    audio_patch: int = 16
    audio_stride: int = 10
    audio_sample_rate: int = 16000
    audio_clip_seconds: float = 2.0
    audio_clips: int = 3
    # video sampling
    video_clip_seconds: float = 2.0
    video_clips: int = 5
    # build the depth / thermal / IMU trunks too, so the official checkpoint loads with strict=True
    all_modalities: bool = False
    depth_width: int = 384
    depth_layers: int = 12
    depth_heads: int = 8
    thermal_width: int = 768
    thermal_layers: int = 12
    thermal_heads: int = 12
    imu_width: int = 512
    imu_layers: int = 6
    imu_heads: int = 8


@dataclass
class InputProjectorConfig:
    """Projects encoder tokens into the LLM's embedding space.

    `linear`: one linear layer per token (on the patch tokens, or on the pooled vector when
    `source="pooled"`, which is what the released NExT-GPT checkpoint uses).
    `grouping`: the ICML concept-token grouping (GroupViT-like) with learnable temperature.
    """

    kind: str = "grouping"  # "linear" | "grouping"
    source: str = "tokens"  # "tokens" (patch-level) | "pooled"
    hidden_dim: int = 512
    depths: tuple[int, ...] = (6, 3, 3)  # transformer layers per stage; len = len(concept_tokens)+1
    num_heads: int = 8
    concept_tokens: tuple[int, ...] = (64, 8)  # concept tokens of each grouping stage
    mlp_ratio: float = 4.0  # feed-forward width / hidden_dim in the transformer and merge MLPs
    # initial temperature of the similarity logits (learned as log tau, one per stage); at 1 the
    # Gumbel noise decides most assignments, at 0.1 the similarity does
    init_tau: float = 0.1
    # scale of the Gumbel noise added to the cosine similarities in training (paper: 1; 0: none)
    gumbel_scale: float = 1.0
    # "hard": one-hot argmax with the straight-through trick (the paper); "soft": merge with the
    # Gumbel-softmax weights, for encoders whose tokens of one input are nearly alike (see
    # GroupingProjector)
    assignment: str = "hard"
    dropout: float = 0.0


@dataclass
class LoraSettings:
    """LoRA on the LLM through peft (stage 3). `target_modules="all-linear"` skips lm_head."""

    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"


@dataclass
class LLMConfig:
    """Any Hugging Face causal LM; `pretrained=None` builds a random tiny LLaMA from the fields.

    `pretrained` is a local directory or a hub id (Vicuna-7B v0 / v1.5, LLaMA-2/3, Mistral, Qwen2,
    ...) in transformers' layout. `device_map` is passed to `from_pretrained` ("auto", "cuda", ...)
    so that weights go straight to the GPU instead of through CPU memory; 8-bit / 4-bit loading
    implies it. `base_rows` is a safetensors file of `embed_tokens` / `lm_head` rows that replace
    the pretrained rows of the base vocabulary (the released NExT-GPT checkpoint retrains them).
    """

    pretrained: str | None = "lmsys/vicuna-7b-v1.5"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    quantization: str | None = None  # None | "8bit" | "4bit" (bitsandbytes, GPU only)
    device_map: str | None = None
    base_rows: str | None = None
    template: str = "vicuna_v1"
    lora: LoraSettings | None = None
    # architecture of a randomly initialised LLM (only when pretrained is None)
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vocab_size: int = 512
    max_position: int = 1024


@dataclass
class SignalTokenConfig:
    """Signal tokens the LLM emits per output modality (paper: 4 image, 24 video, 8 audio)."""

    image: int = 4
    audio: int = 8
    video: int = 24


@dataclass
class OutputProjectorConfig:
    """Signal-token hidden states -> decoder conditioning, one projector per output modality.

    `transformer` (the paper's): Linear(llm -> hidden) -> Transformer encoder-decoder with
    learnable queries -> Linear(hidden -> decoder width); the number of queries and the output
    width come from the decoder. `linear`: one linear map from the flattened signal states to the
    whole conditioning (only the input fields below apply; see `nextgpt.projectors.output`).
    """

    kind: str = "transformer"  # transformer | linear
    hidden_dim: int = 512
    num_heads: int = 4
    encoder_layers: int = 4
    decoder_layers: int = 4
    ff_dim: int = 2048
    dropout: float = 0.0
    add_input_embeddings: bool = True  # reference code adds the signal tokens' input embeddings
    # Subtract the running mean input per signal position (off in the reference; see
    # OutputProjector for why the miniature uses it), updated by this fraction per training batch
    centre_inputs: bool = False
    centre_momentum: float = 0.05


@dataclass
class TinyDecoderArch:
    """Architecture of a randomly initialised diffusion decoder (tests, the miniature).

    The text encoders are character-level (byte-level BPE without merges), so any English caption
    tokenizes; `text_max_length` is then counted in characters (in tokens where `text_words` gives
    the tokenizer whole words) and is the conditioning length of the image and video
    decoders, whose conditioning width is `text_width`. The audio decoder
    conditions on the CLAP text projection, `projection_dim` wide.
    """

    block_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    # GroupNorm groups in the autoencoder and UNet (diffusers' default 32). On 32 channels, 32
    # groups normalise each channel alone and wash out colour: 8 kept it (docs/mini-design.md)
    norm_groups: int = 32
    sample_size: int = 32  # pixels (image, video); audio length is set by the vocoder's hop
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_max_length: int = 48
    text_vocab: int = 1000  # at least the 514 character tokens of the tiny CLIP tokenizer
    # Words the text tokenizer (CLIP's, or CLAP's RoBERTa one for audio) keeps whole (BPE merges
    # learned for them; any other text still tokenizes by characters). Empty: character-level.
    # Real CLIP's and CLAP's BPEs keep common words whole, and a character-level encoder trained
    # on few word combinations fuses them (docs/mini-design.md)
    text_words: tuple[str, ...] = ()
    num_train_timesteps: int = 1000
    # SD's schedule ends at a signal-to-noise ratio above zero, so the trained denoiser can read
    # coarse layout (a video's trajectory) out of the "pure" noise it starts from and ignore the
    # caption for it. True rescales the schedule to zero terminal SNR, which needs v-prediction and
    # trailing timesteps (Lin et al. 2024, "Common diffusion noise schedules ... are flawed")
    zero_terminal_snr: bool = False
    # audio (AudioLDM): CLAP projection width, log-mel bins, vocoder sample rate and upsampling
    projection_dim: int = 24
    mel_bins: int = 32
    sample_rate: int = 16000
    vocoder_upsample_rates: tuple[int, ...] = (8, 5, 4)  # product = hop = 10 ms at 16 kHz


@dataclass
class DecoderConfig:
    """A frozen diffusers pipeline for one output modality, loaded only when first needed.

    `pretrained` is a hub id or local directory in diffusers' layout; `None` builds a random tiny
    pipeline from `tiny`. `cond_len` / `cond_dim` are filled from the decoder's own config.
    """

    modality: str = "image"
    pretrained: str | None = None
    cond_len: int | None = None
    cond_dim: int | None = None
    dtype: str = "float32"
    steps: int = 50
    guidance: float = 7.5
    height: int | None = None  # None: the decoder's native size
    width: int | None = None
    num_frames: int = 16  # video
    audio_seconds: float = 5.0  # audio
    cpu_offload: bool = False
    attention_slicing: bool = False
    tiny: TinyDecoderArch = field(default_factory=TinyDecoderArch)


def _default_decoders() -> dict[str, DecoderConfig]:
    return {
        # SD-1.5's current home (the runwayml/stable-diffusion-v1-5 repo was taken down in 2024)
        # conditioning shapes (SD-1.5 77x768, AudioLDM 1x512, Zeroscope 77x1024) are read from
        # each decoder's own config, so swapping in SD-2 (77x1024) needs no other change
        "image": DecoderConfig("image", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
        "audio": DecoderConfig("audio", "cvssp/audioldm-l-full", steps=200, guidance=2.5),
        "video": DecoderConfig(
            "video", "cerspense/zeroscope_v2_576w", height=320, width=576, num_frames=24
        ),
    }


@dataclass
class NextGPTConfig:
    """The whole model. Defaults are the paper's `nextgpt-7b`; see `PRESETS` for named variants."""

    name: str = "nextgpt-7b"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    input_projector: InputProjectorConfig = field(default_factory=InputProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    signal_tokens: SignalTokenConfig = field(default_factory=SignalTokenConfig)
    output_projector: OutputProjectorConfig = field(default_factory=OutputProjectorConfig)
    decoders: dict[str, DecoderConfig] = field(default_factory=_default_decoders)
    seed: int = 0  # seeds every randomly initialised part

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NextGPTConfig:
        return _from_plain(cls, data, "config")

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> NextGPTConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        return cls.from_yaml_text(path.read_text(), where=str(path))

    @classmethod
    def from_yaml_text(cls, text: str, where: str = "config") -> NextGPTConfig:
        data = yaml.safe_load(text)
        if not isinstance(data, dict):
            raise ValueError(
                f"{where}: expected a mapping of config fields, got {type(data).__name__}"
            )
        return _from_plain(cls, data, where)

    @classmethod
    def from_name(cls, name: str) -> NextGPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()

    @property
    def output_modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.decoders)


def tiny_config() -> NextGPTConfig:
    """Random tiny components: every part of the real architecture, small enough for a unit test."""
    return NextGPTConfig(
        name="tiny",
        encoder=EncoderConfig(
            embed_dim=32,
            image_size=32,
            patch_size=8,
            vision_width=32,
            vision_layers=2,
            vision_heads=2,
            text_width=32,
            text_layers=2,
            text_heads=2,
            text_context=16,
            text_vocab=512,
            audio_width=32,
            audio_layers=2,
            audio_heads=2,
            audio_mel_bins=32,
            audio_target_len=64,
            audio_clip_seconds=0.64,
            audio_clips=2,
            video_clip_seconds=0.5,
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
        ),
        input_projector=InputProjectorConfig(
            kind="grouping", hidden_dim=32, depths=(1, 1, 1), num_heads=2, concept_tokens=(8, 4)
        ),
        llm=LLMConfig(pretrained=None),
        signal_tokens=SignalTokenConfig(image=4, audio=8, video=24),
        output_projector=OutputProjectorConfig(
            hidden_dim=32, num_heads=2, encoder_layers=1, decoder_layers=1, ff_dim=64
        ),
        decoders={
            "image": DecoderConfig("image", None, steps=4, guidance=2.0),
            "audio": DecoderConfig("audio", None, steps=4, guidance=2.0, audio_seconds=1.0),
            "video": DecoderConfig("video", None, steps=4, guidance=2.0, num_frames=8),
        },
    )


IMAGEBIND_ENV = "NEXTGPT_IMAGEBIND"


def default_imagebind_path() -> str:
    """Where the full-size presets look for `imagebind_huge.pth` (it is not on the HF hub).

    `$NEXTGPT_IMAGEBIND` when set, else `~/.cache/nextgpt/imagebind_huge.pth`; a model directory's
    config.yaml can name any other path.
    """
    env = os.environ.get(IMAGEBIND_ENV)
    if env:
        return env
    return str(Path("~/.cache/nextgpt/imagebind_huge.pth").expanduser())


def nextgpt_7b_config() -> NextGPTConfig:
    """The paper's sizes: ImageBind-huge, Vicuna-7B, SD-1.5, AudioLDM l-full, Zeroscope v2 576w.

    Built for a GPU: the LLM in bf16 and the decoders in fp16. Only the ImageBind trunks NExT-GPT
    uses are built (the depth / thermal / IMU weights in the official file are skipped).
    """
    decoders = _default_decoders()
    for decoder in decoders.values():
        decoder.dtype = "float16"
    return NextGPTConfig(
        name="nextgpt-7b",
        encoder=EncoderConfig(pretrained=default_imagebind_path(), all_modalities=False),
        llm=LLMConfig(pretrained="lmsys/vicuna-7b-v1.5", dtype="bfloat16"),
        decoders=decoders,
    )


PRESETS: dict[str, typing.Callable[[], NextGPTConfig]] = {
    "tiny": tiny_config,
    "nextgpt-7b": nextgpt_7b_config,
}


# ---- plain-data conversion (YAML has no tuples or dataclasses) ------------------------------
def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _from_plain(tp: Any, value: Any, where: str) -> Any:
    """Build `tp` from YAML data, naming the offending key on any mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} for {tp.__name__}")
        kwargs = {k: _from_plain(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _from_plain(arg, value, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: {value!r} does not match {tp}: {'; '.join(errors)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (arg, *_rest) = typing.get_args(tp)
        return tuple(_from_plain(arg, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        _, vt = typing.get_args(tp)
        return {k: _from_plain(vt, v, f"{where}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads exponent notation without a dot (`3e-2`) as a string
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"{where}: unsupported config type {tp}")
