"""The frozen diffusion decoder behind one output modality, driven by projected embeddings.

NExT-GPT conditions each diffusers pipeline on `prompt_embeds` from its output projector instead
of the pipeline's own text encoder. The text encoder still matters: it gives the alignment target
(the decoder's own embedding of a caption) and the negative (empty-prompt) embedding. Every
dimension is read from the decoder's own config, never assumed (SD-1.5 is 77x768, SD-2 77x1024).
Pipelines load lazily and can be released, so only the decoders in use take memory.
"""

from __future__ import annotations

import abc
import gc
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import RemoteEntryNotFoundError

from nextgpt.config import DecoderConfig
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.weights import realign, torch_dtype


def diffusion_target(
    prediction_type: str, latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """What a denoiser is trained to output for `latents` noised with `noise` at cumulative
    alpha `alpha_bar` (broadcastable), by the scheduler's `prediction_type`: one definition for
    NExT-GPT's decoder loss and the miniature's decoder pretraining, so they cannot disagree."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


class Decoder(abc.ABC):
    """One frozen diffusion pipeline; `pipeline` builds or loads it on first use."""

    modality: ClassVar[str]
    pipeline_class: ClassVar[type[DiffusionPipeline]]
    size_keys: ClassVar[tuple[str, ...]]  # keyword arguments `generate` accepts for the output size

    def __init__(
        self, config: DecoderConfig, seed: int = 0, *, device: str | torch.device | None = None
    ) -> None:
        if config.modality != self.modality:
            raise ValueError(
                f"{type(self).__name__} needs modality {self.modality!r}, got {config}"
            )
        torch_dtype(config.dtype, "decoder dtype")  # fail at construction, not at first use
        self.config = config
        self.seed = seed
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._pipeline: DiffusionPipeline | None = None
        self._shape: tuple[int, int] | None = None
        self._negative: torch.Tensor | None = None

    @classmethod
    def from_pipeline(
        cls, config: DecoderConfig, pipeline: DiffusionPipeline, device: str | None = None
    ) -> Decoder:
        """A decoder around a pipeline already in memory, e.g. one being pretrained, so that
        training targets come from the very code NExT-GPT later runs on it."""
        decoder = cls(config, device=device)
        decoder._pipeline = pipeline
        return decoder

    # ---- loading ----------------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self.config.pretrained or f"tiny random (seed {self.seed})"

    @property
    def is_loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def pipeline(self) -> Any:
        """The frozen diffusers pipeline, loaded (or built, when tiny) on first use."""
        if self._pipeline is None:
            self.conditioning_shape()  # fail on a shape mismatch before loading any weights
            self._pipeline = self._load()
        return self._pipeline

    def _load(self) -> DiffusionPipeline:
        dtype = torch_dtype(self.config.dtype)
        if self.config.pretrained is None:
            pipe = build_tiny_pipeline(self.modality, self.config.tiny, self.seed)
            if dtype != torch.float32:
                pipe.to(dtype=dtype)
        else:
            if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") == "1":  # the CLI sets it
                diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."
            pipe = self.pipeline_class.from_pretrained(self.config.pretrained, dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False).eval()
        if self.config.attention_slicing:
            pipe.enable_attention_slicing()
        if self.config.cpu_offload:
            if self.device.type == "cpu":
                raise ValueError("cpu_offload moves each model to a GPU as it runs: no GPU here")
            pipe.enable_model_cpu_offload(device=self.device)
        else:
            pipe.to(self.device)
            if self.device.type == "cpu":
                _align_weights(pipe)
        return pipe

    def release(self) -> None:
        """Drop the pipeline and free its memory; the next use loads it again."""
        self._pipeline = None
        self._negative = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def save(self, directory: str | Path) -> None:
        """Save in diffusers' layout, loadable again with `pretrained=directory`."""
        self.pipeline.save_pretrained(str(directory))

    def _read_json(self, subfolder: str, filename: str = "config.json") -> dict[str, Any] | None:
        """One JSON file of a pretrained pipeline (local dir or hub id) without loading weights."""
        root = self.config.pretrained
        assert root is not None
        if Path(root).is_dir():
            path = Path(root, subfolder, filename)
            if not path.is_file():
                return None
        else:
            try:
                path = Path(hf_hub_download(root, filename, subfolder=subfolder))
            except RemoteEntryNotFoundError:  # absent from the repo (not merely uncached)
                return None
        return json.loads(path.read_text())

    def _require_json(self, subfolder: str, filename: str = "config.json") -> dict[str, Any]:
        data = self._read_json(subfolder, filename)
        if data is None:
            raise FileNotFoundError(f"{self.source}: no {subfolder}/{filename}")
        return data

    # ---- conditioning -----------------------------------------------------------------------
    def conditioning_shape(self) -> tuple[int, int]:
        """(L, D) of the embeddings that condition one item, from the decoder's own config."""
        if self._shape is None:
            shape = (
                self._tiny_shape() if self.config.pretrained is None else self._pretrained_shape()
            )
            for name, want, got in (
                ("cond_len", self.config.cond_len, shape[0]),
                ("cond_dim", self.config.cond_dim, shape[1]),
            ):
                if want is not None and want != got:
                    raise ValueError(
                        f"{self.modality} decoder {self.source}: the config says {name}={want} but "
                        f"the decoder's own config gives {got} (conditioning shape {shape}); "
                        f"set {name} to {got} or to None, or use the decoder it was made for"
                    )
            self._shape = shape
        return self._shape

    @abc.abstractmethod
    def _tiny_shape(self) -> tuple[int, int]: ...

    @abc.abstractmethod
    def _pretrained_shape(self) -> tuple[int, int]: ...

    def _check_cond(self, cond: torch.Tensor) -> torch.Tensor:
        shape = self.conditioning_shape()
        if cond.dim() != 3 or tuple(cond.shape[1:]) != shape:
            raise ValueError(
                f"{self.modality} decoder expects conditioning (B, {shape[0]}, {shape[1]}), "
                f"got {tuple(cond.shape)}"
            )
        return cond

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The decoder's own text embedding of each caption, (B, L, D) float32 on the CPU."""
        if isinstance(captions, str):
            raise TypeError("encode_text takes a list of captions")
        pipe = self.pipeline
        return self._encode(pipe, list(captions)).float().cpu()

    @abc.abstractmethod
    def _encode(self, pipe: Any, captions: list[str]) -> torch.Tensor: ...

    def negative_embeddings(self, batch: int = 1) -> torch.Tensor:
        """The encoding of the empty prompt (classifier-free guidance), (B, L, D); cached."""
        if self._negative is None:
            self._negative = self.encode_text([""])
        return self._negative.expand(batch, -1, -1).clone()

    # ---- generation -------------------------------------------------------------------------
    def generate(
        self,
        cond: torch.Tensor,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        **size: Any,
    ) -> list:
        """Sample one output per conditioning row; None arguments take the config's defaults."""
        unknown = sorted(set(size) - set(self.size_keys))
        if unknown:
            raise TypeError(f"{self.modality} decoder: unknown size argument(s) {unknown}")
        cond = self._check_cond(cond).detach()
        pipe = self.pipeline
        device, dtype = pipe._execution_device, pipe.unet.dtype
        negative = self.negative_embeddings(cond.shape[0])
        generator = torch.Generator("cpu").manual_seed(self.seed if seed is None else seed)
        return self._sample(
            pipe,
            prompt_embeds=cond.to(device, dtype),
            negative_prompt_embeds=negative.to(device, dtype),
            num_inference_steps=self.config.steps if steps is None else steps,
            guidance_scale=self.config.guidance if guidance is None else guidance,
            generator=generator,
            **size,
        )

    @abc.abstractmethod
    def _sample(self, pipe: Any, **kwargs: Any) -> list: ...

    # ---- training signal --------------------------------------------------------------------
    def denoising_loss(
        self,
        cond: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Noise-prediction MSE of the frozen model on `targets`, conditioned on `cond`.

        Gradients reach `cond` only: the VAE encoding runs without grad and every pipeline
        parameter is frozen. The regression target follows the scheduler's `prediction_type`.
        Noise, timesteps and VAE samples come from `generator` (a CPU generator), or from torch's
        global RNG when it is None.
        """
        cond = self._check_cond(cond)
        if targets.shape[0] != cond.shape[0]:
            raise ValueError(f"{cond.shape[0]} conditionings but {targets.shape[0]} targets")
        pipe = self.pipeline
        device, dtype = pipe._execution_device, pipe.unet.dtype
        with torch.no_grad():
            latents = self._latents(pipe, targets, generator).float()
        scheduler = pipe.scheduler
        batch = latents.shape[0]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        alpha_bar = scheduler.alphas_cumprod.to(device, torch.float32)[t.to(device)]
        alpha_bar = alpha_bar.view(batch, *([1] * (latents.dim() - 1)))
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        target = diffusion_target(scheduler.config.prediction_type, latents, noise, alpha_bar)
        pred = self._predict(pipe, noisy.to(dtype), t.to(device), cond.to(device, dtype))
        return F.mse_loss(pred.float(), target)

    @abc.abstractmethod
    def _latents(
        self, pipe: Any, targets: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Scaled VAE latents of the targets, in the layout the denoiser takes."""

    @abc.abstractmethod
    def _predict(
        self, pipe: Any, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """The denoiser's output for `noisy` latents at timesteps `t` given `cond`."""


def _align_weights(pipe: DiffusionPipeline) -> None:
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            realign(module)


def vae_latents(pipe: Any, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Sampled, scaled VAE latents of (N, C, H, W) inputs."""
    vae = pipe.vae
    x = pixels.to(pipe._execution_device, vae.dtype)
    return vae.encode(x).latent_dist.sample(generator) * vae.config.scaling_factor


class CrossAttentionDecoder(Decoder):
    """Image and video: CLIP last hidden states padded to the tokenizer's maximum length."""

    def _tiny_shape(self) -> tuple[int, int]:
        return self.config.tiny.text_max_length, self.config.tiny.text_width

    def _pretrained_shape(self) -> tuple[int, int]:
        unet = self._require_json("unet")
        width = unet["cross_attention_dim"]
        if isinstance(width, list):
            if len(set(width)) != 1:
                raise ValueError(f"{self.source}: per-block cross_attention_dim {width}")
            width = width[0]
        tokenizer = self._read_json("tokenizer", "tokenizer_config.json") or {}
        length = tokenizer.get("model_max_length")
        if length is None or length > 1_000_000:  # transformers' "no limit" sentinel
            length = self._require_json("text_encoder")["max_position_embeddings"]
        return int(length), int(width)

    def _encode(self, pipe: Any, captions: list[str]) -> torch.Tensor:
        embeds, _ = pipe.encode_prompt(captions, pipe._execution_device, 1, False)
        return embeds

    def _predict(
        self, pipe: Any, noisy: torch.Tensor, t: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        return pipe.unet(noisy, t, encoder_hidden_states=cond).sample
