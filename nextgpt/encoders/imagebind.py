"""ImageBind in plain PyTorch, laid out so that the official `imagebind_huge.pth` loads strictly.

The parameter and buffer names follow the official model (facebookresearch/ImageBind):
`modality_preprocessors / modality_trunks / modality_heads / modality_postprocessors`, each keyed by
`vision | text | audio | depth | thermal | imu`. Some containers hold parameter-free modules only
to keep the official indices (a head's linear layer is `.2`, not `.1`). Sizes come from
`EncoderConfig`.

Unlike the official forward, which returns one pooled vector per input (and which NExT-GPT's
reference code fed to its "grouping" projector as a single token), `encode` also returns every
patch-level token through the head's norm and projection. Drop path (used by the official code
only while training the audio / IMU trunks) is left out: this encoder is used frozen.
The official weights are licensed CC-BY-NC-SA 4.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nextgpt.config import EncoderConfig
from nextgpt.weights import realign

ENCODED_MODALITIES = ("image", "video", "audio", "text")
CORE_TRUNKS = ("vision", "text", "audio")
EXTRA_TRUNKS = ("depth", "thermal", "imu")

# Fixed by the official architecture (not configurable there either).
TEMPORAL_KERNEL = 2  # vision Conv3d kernel (2, patch, patch); an image is repeated to 2 frames
DEPTH_THERMAL_PATCH = 16
IMU_CHANNELS, IMU_LENGTH, IMU_KERNEL = 6, 2000, 8
LN_EPS = 1e-6
# Fixed logit scales of the official postprocessors; text's is learned (init 1/0.07).
LOGIT_SCALES = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
TEXT_LOGIT_SCALE_INIT = 1 / 0.07
MAX_LOGIT_SCALE = 100.0


@dataclass
class EncoderOutput:
    """What the encoder gives for a batch of one modality.

    `tokens` (B, N, embed_dim): every trunk output token (CLS first) through the head's LayerNorm
    and projection, without token selection or L2 norm; the clips of a video / audio input are
    concatenated along N. `pooled` (B, embed_dim): ImageBind's own embedding (head and
    postprocessor, clip embeddings averaged as the official code does). Like the official output,
    it is unit-norm for images and video, and carries the logit scale for audio (x20) and text.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor


# ---- building blocks -------------------------------------------------------------------------
class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (official `BlockWithMasking` without layer scale)."""

    def __init__(self, width: int, heads: int, bias_kv: bool) -> None:
        super().__init__()
        # nn.MultiheadAttention has the official parameter names (in_proj_*, out_proj, bias_k/v).
        self.attn = nn.MultiheadAttention(width, heads, add_bias_kv=bias_kv, batch_first=True)
        self.norm_1 = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = Mlp(width)
        self.norm_2 = nn.LayerNorm(width, eps=LN_EPS)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, attn_mask=attn_mask, need_weights=False)[0]
        return x + self.mlp(self.norm_2(x))


class Trunk(nn.Module):
    """Official `SimpleTransformer`: optional LayerNorm, then blocks (batch-first here)."""

    def __init__(self, width: int, layers: int, heads: int, pre_ln: bool, bias_kv: bool) -> None:
        super().__init__()
        if pre_ln:  # official: Sequential(LayerNorm, rearrange) -> keys `pre_transformer_layer.0.*`
            self.pre_transformer_layer = nn.Sequential(nn.LayerNorm(width, eps=LN_EPS))
        self.blocks = nn.ModuleList(Block(width, heads, bias_kv) for _ in range(layers))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hasattr(self, "pre_transformer_layer"):
            x = self.pre_transformer_layer(x)
        for block in self.blocks:
            x = block(x, attn_mask)
        return x


class RepeatFrames(nn.Module):
    """Official `PadIm2Video(repeat, 2)`: an image (B,C,H,W) becomes a clip of identical frames."""

    def __init__(self, frames: int) -> None:
        super().__init__()
        self.frames = frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.unsqueeze(2)
        if x.shape[2] == 1:
            x = x.expand(-1, -1, self.frames, -1, -1)
        return x


class PatchStem(nn.Module):
    """Patchify with `proj`, flatten to (B, N, D), then an optional LayerNorm (`norm_layer`)."""

    def __init__(self, proj: nn.Module, norm_width: int | None) -> None:
        super().__init__()
        self.proj = proj
        if norm_width is not None:
            self.norm_layer = nn.LayerNorm(norm_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm_layer(x) if hasattr(self, "norm_layer") else x


class PosEmbedding(nn.Module):
    """Holds the learnable position table (official `SpatioTemporalPosEmbeddingHelper`)."""

    def __init__(self, num_tokens: int, width: int) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * width**-0.5)


class PatchPreprocessor(nn.Module):
    """Stem + CLS token + position embedding (official `RGBDTPreprocessor` and subclasses).

    `stem_name` is the official attribute: `rgbt_stem` (vision, audio, thermal) or `depth_stem`.
    """

    def __init__(self, stem: PatchStem, stem_name: str, num_patches: int, width: int) -> None:
        super().__init__()
        self.stem_name = stem_name
        self.add_module(stem_name, stem)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.pos_embedding_helper = PosEmbedding(1 + num_patches, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = getattr(self, self.stem_name)(x)
        tokens = torch.cat([self.cls_token.expand(len(patches), -1, -1), patches], dim=1)
        # An image through a multi-frame vision stem has fewer patches than the table: like the
        # official interpolation, it uses the CLS entry and the first temporal slice.
        return tokens + self.pos_embedding_helper.pos_embed[:, : tokens.shape[1]]


class TextPreprocessor(nn.Module):
    """Token + position embeddings and the causal mask buffer (a key of the official file)."""

    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.pos_embed = nn.Parameter(torch.randn(1, context, width) * 0.01)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.register_buffer("mask", torch.full((context, context), float("-inf")).triu(1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.pos_embed


class IMUPreprocessor(nn.Module):
    """Parameters of the official IMU preprocessor; built only to load the checkpoint strictly."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.imu_stem = PatchStem(nn.Linear(IMU_CHANNELS * IMU_KERNEL, width, bias=False), width)
        self.pos_embed = nn.Parameter(torch.randn(1, IMU_LENGTH // IMU_KERNEL + 1, width) * 0.01)
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)


class TextHead(nn.Module):
    """Official `SelectEOSAndProject`: the projection lives under `proj` (LayerNorm, Linear)."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(width, eps=LN_EPS), nn.Linear(width, out_dim, bias=False)
        )


def _cls_head(width: int, out_dim: int, dropout: bool = False) -> nn.Sequential:
    """LayerNorm, (selection), [Dropout], Linear. `encode` applies norm and linear to every token
    and selects the CLS token itself, so index 1 (the official SelectElement) is an Identity."""
    mid = [nn.Identity(), nn.Dropout(0.5)] if dropout else [nn.Identity()]
    return nn.Sequential(
        nn.LayerNorm(width, eps=LN_EPS), *mid, nn.Linear(width, out_dim, bias=False)
    )


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


class LogitScale(nn.Module):
    """Multiplies by exp(log_logit_scale), capped at 100; a buffer when not learnable."""

    def __init__(self, init: float, learnable: bool) -> None:
        super().__init__()
        value = torch.tensor(math.log(init))
        if learnable:
            self.log_logit_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_logit_scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE) * x


# ---- the encoder -----------------------------------------------------------------------------
class ImageBindEncoder(nn.Module):
    """ImageBind with `encode(modality, inputs)` returning patch tokens and the pooled embedding.

    Inputs are what `nextgpt.encoders.preprocess` returns, batched: image (B,3,S,S), video
    (B, clips, 3, frames, S, S), audio (B, clips, 1, mel_bins, target_len), text (B, context) ids.
    """

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        c = config
        if c.video_frames_per_clip < TEMPORAL_KERNEL or c.video_frames_per_clip % TEMPORAL_KERNEL:
            raise ValueError(
                f"video_frames_per_clip={c.video_frames_per_clip}: expected a positive multiple "
                f"of the vision stem's temporal kernel ({TEMPORAL_KERNEL})"
            )
        if c.image_size < c.patch_size or c.audio_mel_bins < c.audio_patch:
            raise ValueError("image_size / audio_mel_bins must be at least one patch")
        self.config = c
        self.trunk_names = CORE_TRUNKS + (EXTRA_TRUNKS if c.all_modalities else ())
        grid = c.image_size // c.patch_size
        self._image_patches = grid * grid
        self._clip_patches = (c.video_frames_per_clip // TEMPORAL_KERNEL) * grid * grid
        self._audio_grid = (
            (c.audio_mel_bins - c.audio_patch) // c.audio_stride + 1,
            (c.audio_target_len - c.audio_patch) // c.audio_stride + 1,
        )
        audio_patches = self._audio_grid[0] * self._audio_grid[1]
        dt_patches = (c.image_size // DEPTH_THERMAL_PATCH) ** 2

        kernel = (TEMPORAL_KERNEL, c.patch_size, c.patch_size)
        vision_proj = nn.Sequential(
            RepeatFrames(TEMPORAL_KERNEL),
            nn.Conv3d(3, c.vision_width, kernel, stride=kernel, bias=False),
        )
        audio_proj = nn.Conv2d(1, c.audio_width, c.audio_patch, stride=c.audio_stride, bias=False)
        pre: dict[str, nn.Module] = {
            "vision": PatchPreprocessor(
                PatchStem(vision_proj, None), "rgbt_stem", self._clip_patches, c.vision_width
            ),
            "text": TextPreprocessor(c.text_vocab, c.text_context, c.text_width),
            "audio": PatchPreprocessor(
                PatchStem(audio_proj, c.audio_width), "rgbt_stem", audio_patches, c.audio_width
            ),
        }
        trunks: dict[str, nn.Module] = {
            "vision": Trunk(c.vision_width, c.vision_layers, c.vision_heads, True, False),
            "text": Trunk(c.text_width, c.text_layers, c.text_heads, False, False),
            "audio": Trunk(c.audio_width, c.audio_layers, c.audio_heads, False, True),
        }
        heads: dict[str, nn.Module] = {
            "vision": _cls_head(c.vision_width, c.embed_dim),
            "text": TextHead(c.text_width, c.embed_dim),
            "audio": _cls_head(c.audio_width, c.embed_dim),
        }
        post: dict[str, nn.Module] = {
            "vision": L2Normalize(),
            "text": nn.Sequential(L2Normalize(), LogitScale(TEXT_LOGIT_SCALE_INIT, True)),
            "audio": nn.Sequential(L2Normalize(), LogitScale(LOGIT_SCALES["audio"], False)),
        }
        if c.all_modalities:
            for name, width, layers, heads_n, stem_name in (
                ("depth", c.depth_width, c.depth_layers, c.depth_heads, "depth_stem"),
                ("thermal", c.thermal_width, c.thermal_layers, c.thermal_heads, "rgbt_stem"),
            ):
                proj = nn.Conv2d(
                    1, width, DEPTH_THERMAL_PATCH, stride=DEPTH_THERMAL_PATCH, bias=False
                )
                pre[name] = PatchPreprocessor(PatchStem(proj, width), stem_name, dt_patches, width)
                trunks[name] = Trunk(width, layers, heads_n, False, True)
                heads[name] = _cls_head(width, c.embed_dim)
            pre["imu"] = IMUPreprocessor(c.imu_width)
            trunks["imu"] = Trunk(c.imu_width, c.imu_layers, c.imu_heads, False, True)
            heads["imu"] = _cls_head(c.imu_width, c.embed_dim, dropout=True)
            for name in EXTRA_TRUNKS:
                post[name] = nn.Sequential(L2Normalize(), LogitScale(LOGIT_SCALES[name], False))

        self.modality_preprocessors = nn.ModuleDict(pre)
        self.modality_trunks = nn.ModuleDict(trunks)
        self.modality_heads = nn.ModuleDict(heads)
        self.modality_postprocessors = nn.ModuleDict(post)

    # ---- shapes ------------------------------------------------------------------------------
    def num_tokens(self, modality: str) -> int:
        """Tokens `encode` returns for one item of `modality` (CLS included, clips concatenated)."""
        c = self.config
        if modality == "image":
            return 1 + self._image_patches
        if modality == "video":
            return c.video_clips * (1 + self._clip_patches)
        if modality == "audio":
            return c.audio_clips * (1 + self._audio_grid[0] * self._audio_grid[1])
        if modality == "text":
            return c.text_context
        raise ValueError(f"unknown modality {modality!r}; expected one of {ENCODED_MODALITIES}")

    def _expected_shape(self, modality: str) -> tuple[int, ...]:
        c = self.config
        s = c.image_size
        return {
            "image": (3, s, s),
            "video": (c.video_clips, 3, c.video_frames_per_clip, s, s),
            "audio": (c.audio_clips, 1, c.audio_mel_bins, c.audio_target_len),
            "text": (c.text_context,),
        }[modality]

    # ---- forward -----------------------------------------------------------------------------
    def encode(self, modality: str, inputs: torch.Tensor) -> EncoderOutput:
        """Encode a batch of one modality (image | video | audio | text); see `EncoderOutput`."""
        if modality not in ENCODED_MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; expected one of {ENCODED_MODALITIES}")
        expected = self._expected_shape(modality)
        if inputs.ndim != len(expected) + 1 or tuple(inputs.shape[1:]) != expected:
            raise ValueError(
                f"{modality} input of shape {tuple(inputs.shape)}: expected (B, "
                f"{', '.join(map(str, expected))}) for this EncoderConfig"
            )
        weight = next(iter(self.parameters()))
        if modality == "text":
            return self._encode_text(inputs.to(device=weight.device, dtype=torch.long))

        batch = inputs.shape[0]
        x = inputs.to(device=weight.device, dtype=weight.dtype)
        clips = 1 if modality == "image" else x.shape[1]
        if modality != "image":
            x = x.flatten(0, 1)  # (B*clips, ...)
        trunk = "audio" if modality == "audio" else "vision"
        hidden = self.modality_trunks[trunk](self.modality_preprocessors[trunk](x))
        head = self.modality_heads[trunk]
        tokens = head[-1](head[0](hidden))  # (B*clips, n, D)
        pooled = self.modality_postprocessors[trunk](tokens[:, 0])
        return EncoderOutput(
            tokens=tokens.reshape(batch, clips * tokens.shape[1], -1),
            pooled=pooled.reshape(batch, clips, -1).mean(dim=1),
        )

    def _encode_text(self, ids: torch.Tensor) -> EncoderOutput:
        pre = self.modality_preprocessors["text"]
        hidden = self.modality_trunks["text"](pre(ids), attn_mask=pre.mask)
        tokens = self.modality_heads["text"].proj(hidden)
        # The end-of-text token has the largest id (CLIP BPE), so argmax finds it, as officially.
        eos = tokens[torch.arange(len(ids), device=ids.device), ids.argmax(dim=-1)]
        return EncoderOutput(tokens=tokens, pooled=self.modality_postprocessors["text"](eos))

    # ---- weights -----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: EncoderConfig) -> ImageBindEncoder:
        """Random weights when `config.pretrained` is None, else load them strictly.

        `pretrained` is the official `imagebind_huge.pth` (or any torch file holding that state
        dict, possibly under a "model" / "state_dict" key) or a `.safetensors` written by `save`.
        With `all_modalities=False`, depth / thermal / IMU weights in the file are skipped.
        """
        if config.pretrained is None:
            return cls(config)
        path = Path(config.pretrained)
        state = _read_state_dict(path)
        if not config.all_modalities:
            skipped = tuple(f"{group}.{m}." for group in _GROUPS for m in EXTRA_TRUNKS)
            state = {k: v for k, v in state.items() if not k.startswith(skipped)}
        with torch.device("meta"):  # no random init of ~1.2B parameters that are overwritten
            model = cls(config)
        _check_state_dict(model, state, path)
        model.load_state_dict(state, strict=True, assign=True)
        # the encoder runs in float32: weights shipped in half precision (nextgpt-mini) are upcast
        # here, as transformers and diffusers do for their parts
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
            model = model.float()
        return realign(model)

    def save(self, path: str | Path) -> None:
        """Write the weights (official key names) as safetensors."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt", "model": "imagebind"})


_GROUPS = (
    "modality_preprocessors",
    "modality_trunks",
    "modality_heads",
    "modality_postprocessors",
)
_WRAPPER_KEYS = ("model", "state_dict", "module")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"ImageBind weights not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format; older pickles load without it
        obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in _WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict of tensors (ImageBind weights)")
    return obj


def _check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Raise one readable error listing the first missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape (file vs model)", shapes),
    ):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            parts.append(f"{label}: {', '.join(items[:5])}{more}")
    raise ValueError(
        f"{path} does not match the ImageBind built from its EncoderConfig "
        f"(sizes, all_modalities): " + "; ".join(parts)
    )
