"""NExT-GPT: encoder -> input projector -> LLM -> output projectors -> decoders, as one model.

`forward(batch)` returns NExT-GPT's training losses as separate terms; `generate(messages)` answers
a multi-turn, mixed-media conversation with text plus generated media. The hidden states that drive
the output projectors are taken from the same KV-cached decoding pass that produced the signal
tokens, at the same positions training uses (the output at each signal token), so training and
inference agree.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from nextgpt import media as media_io
from nextgpt.batch import Batch
from nextgpt.config import MODALITIES, EncoderConfig, NextGPTConfig
from nextgpt.conversation import (
    IGNORE_INDEX,
    encode_conversation,
    get_template,
    parse_messages,
)
from nextgpt.decoders import Decoder, build_decoder
from nextgpt.decoding import SamplingOptions, SignalGuide
from nextgpt.encoders.imagebind import ImageBindEncoder
from nextgpt.encoders.preprocess import preprocess_audio, preprocess_image, preprocess_video
from nextgpt.llm import LanguageModel
from nextgpt.projectors import build_input_projector, build_output_projector

LOSS_TERMS = ("text", "align", "diffusion")
CONFIG_FILE = "config.yaml"
TRAINABLE_FILE = "trainable.safetensors"
ENCODER_FILE = "encoder.safetensors"
LLM_DIR = "llm"
LATEST_FILE = "latest"  # in a training run directory: the newest checkpoint's name


@dataclass
class ModelOutput:
    loss: torch.Tensor
    terms: dict[str, torch.Tensor]  # "text", "align/<modality>", "diffusion/<modality>"
    # Logged beside the terms, never part of the loss. "align_row_max/<modality>": the largest
    # mean squared error of one conditioning row (token position), over the batch. An output
    # projector can leave one attribute's row at the midpoint of its values for thousands of
    # steps while every other row fits; the align term divides that row's error by the row
    # count (0.17 of 16 rows), this shows it whole (2.7).
    diagnostics: dict[str, torch.Tensor] = field(default_factory=dict)


@torch.no_grad()
def _worst_row(cond: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The largest per-row mean squared error of (N, rows, ...) conditionings; (N, D) is one row.
    It recomputes the squared error apart from the align term's F.mse_loss (a few thousand
    numbers a batch) rather than deriving that term from it, so the loss keeps the arithmetic
    the shipped build's stages were trained with and a rebuild can still reproduce them."""
    error = (cond.float() - target.float()).pow(2)
    rows = error.shape[1] if error.ndim > 2 else 1
    return error.reshape(error.shape[0], rows, -1).mean(dim=(0, 2)).max()


@dataclass
class GeneratedMedia:
    modality: str
    data: Any  # PIL image | uint8 frames (F,H,W,3) | (waveform float32, sample_rate)
    conditioning: torch.Tensor  # what the output projector gave the decoder


@dataclass
class TextDelta:
    text: str


@dataclass
class Reply:
    text: str
    media: list[GeneratedMedia] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def of(self, modality: str) -> list[Any]:
        return [m.data for m in self.media if m.modality == modality]

    @property
    def images(self) -> list[Image.Image]:
        return self.of("image")

    @property
    def audios(self) -> list[tuple[np.ndarray, int]]:
        return self.of("audio")

    @property
    def videos(self) -> list[np.ndarray]:
        return self.of("video")


class NextGPT(nn.Module):
    def __init__(
        self,
        config: NextGPTConfig,
        encoder: ImageBindEncoder,
        input_projector: nn.Module,
        llm: LanguageModel,
        output_projectors: nn.ModuleDict,
        decoders: dict[str, Decoder],
    ):
        super().__init__()
        self.config = config
        self.encoder = encoder.eval().requires_grad_(False)
        self.input_projector = input_projector
        self.llm = llm
        self.output_projectors = output_projectors
        self.decoders = decoders  # not a submodule: loaded lazily, frozen, saved on their own
        self.template = get_template(config.llm.template)

    def train(self, mode: bool = True) -> NextGPT:
        """Train mode everywhere but the encoder, which is frozen and always runs in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: NextGPTConfig) -> NextGPT:
        """Build every part from `config`: pretrained weights where named, else random (seeded)."""
        config = copy.deepcopy(config)
        torch.manual_seed(config.seed)
        encoder = ImageBindEncoder.from_config(config.encoder)
        llm = LanguageModel.from_config(config.llm, config.signal_tokens, seed=config.seed + 1)
        torch.manual_seed(config.seed + 2)
        in_dim = config.encoder.embed_dim
        input_projector = build_input_projector(config.input_projector, in_dim, llm.hidden_size)
        decoders = {}
        projectors = {}
        for m in config.output_modalities:
            dec_cfg = config.decoders[m]
            decoder = build_decoder(dec_cfg, seed=config.seed + 3)
            if dec_cfg.cond_len is not None and dec_cfg.cond_dim is not None:
                # a recorded shape builds the projector without reading the decoder, which may not
                # exist yet (nextgpt-mini's stage 1 trains while its decoders pretrain); the
                # decoder checks it against its own config when it first loads
                cond_len, cond_dim = dec_cfg.cond_len, dec_cfg.cond_dim
            else:
                cond_len, cond_dim = decoder.conditioning_shape()
            dec_cfg.cond_len, dec_cfg.cond_dim = cond_len, cond_dim
            decoders[m] = decoder
            torch.manual_seed(config.seed + 10 + MODALITIES.index(m))
            projectors[m] = build_output_projector(
                config.output_projector,
                llm.hidden_size,
                getattr(config.signal_tokens, m),
                cond_len,
                cond_dim,
            )
        # everything the LLM touches lives on the LLM's (first) device; on a GPU machine an LLM
        # loaded without a device map is moved there (quantized / mapped LLMs are placed already)
        device = llm.base_model.get_input_embeddings().weight.device
        placed = config.llm.device_map is not None or config.llm.quantization is not None
        if device.type == "cpu" and torch.cuda.is_available() and not placed:
            llm.to("cuda")
            device = torch.device("cuda")
        modules = (encoder, input_projector, nn.ModuleDict(projectors))
        encoder, input_projector, output_projectors = (m.to(device) for m in modules)
        return cls(config, encoder, input_projector, llm, output_projectors, decoders)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path) -> NextGPT:
        """A preset name (`tiny`, ...), a directory written by `save_pretrained` (or a training
        run directory, whose latest checkpoint is taken), or a model config YAML file."""
        from nextgpt.config import PRESETS
        from nextgpt.shipped import SHIPPED_MODELS, shipped_model_dir

        if str(name_or_dir) in PRESETS:
            return cls.from_config(NextGPTConfig.from_name(str(name_or_dir)))
        directory = shipped_model_dir(str(name_or_dir)) or Path(name_or_dir)
        if directory.suffix in (".yaml", ".yml") and directory.is_file():
            return cls.from_config(NextGPTConfig.from_yaml(directory))
        if (directory / LATEST_FILE).is_file():  # a training run: its latest checkpoint
            directory = directory / (directory / LATEST_FILE).read_text().strip()
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(
                f"{name_or_dir}: not a preset ({', '.join(PRESETS)}), a shipped model "
                f"({', '.join(SHIPPED_MODELS)}), a model directory "
                f"with {CONFIG_FILE}, a training run, nor a model config YAML file"
            )
        config = NextGPTConfig.from_yaml(directory / CONFIG_FILE)
        config = _resolve_paths(config, directory)
        model = cls.from_config(config)
        trainable = directory / TRAINABLE_FILE
        if not trainable.is_file():
            raise FileNotFoundError(f"{directory}: missing {TRAINABLE_FILE}")
        model.load_trainable(load_file(trainable))
        return model.eval()

    def save_pretrained(self, directory: str | Path) -> None:
        """Write `config.yaml` and `trainable.safetensors`, plus frozen parts built in memory.

        `trainable.safetensors` holds everything NExT-GPT adapts: both projectors, the signal-token
        embedding and lm_head rows, and LoRA weights. Frozen parts that came from a path or a hub id
        are referenced in the config, never copied; parts built here (random or pretrained in this
        process, `pretrained: null`) are saved beside it so the directory is self-contained.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.config)
        if config.encoder.pretrained is None:
            self.encoder.save(directory / ENCODER_FILE)
            config.encoder.pretrained = ENCODER_FILE
        if config.llm.pretrained is None:
            self.llm.save_base(directory / LLM_DIR)
            config.llm.pretrained = LLM_DIR
        for m, decoder in self.decoders.items():
            if config.decoders[m].pretrained is None:
                decoder.save(directory / "decoders" / m)
                config.decoders[m].pretrained = f"decoders/{m}"
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        _atomic_save(state, directory / TRAINABLE_FILE)
        config.to_yaml(directory / CONFIG_FILE)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Every adapted weight, keyed `input_projector.*`, `output_projectors.*`, `llm.*`."""
        state = {f"input_projector.{k}": v for k, v in self.input_projector.state_dict().items()}
        state.update(
            {f"output_projectors.{k}": v for k, v in self.output_projectors.state_dict().items()}
        )
        state.update({f"llm.{k}": v for k, v in self.llm.adapted_state_dict().items()})
        return state

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        """Load adapted weights; every expected key must be present and no unknown key may be."""
        expected = set(self.trainable_state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(
                f"trainable weights do not match this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        groups = {
            "input_projector": self.input_projector,
            "output_projectors": self.output_projectors,
        }
        for prefix, module in groups.items():
            sub = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
            module.load_state_dict(sub, strict=True)
        self.llm.load_adapted_state_dict(
            {k[4:]: v for k, v in state.items() if k.startswith("llm.")}
        )

    # ---- inputs ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the LLM's input embeddings."""
        return self.llm.base_model.get_input_embeddings().weight.device

    def num_media_tokens(self, modality: str) -> int:
        """How many LLM positions one input item of `modality` occupies."""
        n_in = (
            1
            if self.config.input_projector.source == "pooled"
            else self.encoder.num_tokens(modality)
        )
        return self.input_projector.num_output_tokens(n_in)

    def prepare_media(self, modality: str, value: Any) -> torch.Tensor:
        """A file path, PIL image, array or (waveform, rate) -> the encoder's input tensor."""
        return encoder_input(modality, value, self.config.encoder)

    def encode_media(self, modality: str, inputs: torch.Tensor) -> torch.Tensor:
        """Encoder (frozen) then input projector: (n, ...) -> (n, K, llm hidden)."""
        with torch.no_grad():
            out = self.encoder.encode(modality, inputs.to(self.device, torch.float32))
        feats = (
            out.pooled[:, None] if self.config.input_projector.source == "pooled" else out.tokens
        )
        return self.input_projector(feats)

    def embed_inputs(self, input_ids: torch.Tensor, media: dict[str, torch.Tensor]) -> torch.Tensor:
        """Token embeddings with every placeholder run replaced by its projected media tokens."""
        embeds = self.llm.embed(input_ids)
        for modality, inputs in media.items():
            feats = self.encode_media(modality, inputs).to(embeds.dtype)
            slots = input_ids == self.llm.signal.placeholder_ids[modality]
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError(
                    f"{modality}: {int(slots.sum())} placeholder positions for {feats.shape[0]} "
                    f"item(s) of {feats.shape[1]} tokens"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
        return embeds

    # ---- training -------------------------------------------------------------------------------
    def signal_groups(self, input_ids: torch.Tensor, modality: str) -> torch.Tensor:
        """(n, S) flat positions of each complete signal group of `modality`, in order."""
        ids = torch.tensor(self.llm.signal.ids[modality], device=input_ids.device)
        flat = input_ids.reshape(-1)
        starts = (flat == ids[0]).nonzero().squeeze(-1)
        positions = starts[:, None] + torch.arange(len(ids), device=flat.device)
        if positions.numel() and (
            positions.max() >= flat.numel() or not (flat[positions] == ids).all()
        ):
            raise ValueError(f"a {modality} signal-token group in the batch is incomplete")
        return positions

    def forward(self, batch: Batch, losses: tuple[str, ...] = ("text", "align")) -> ModelOutput:
        """NExT-GPT's losses as separately switchable terms; `loss` is their sum."""
        unknown = set(losses) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown loss terms {sorted(unknown)}; use {LOSS_TERMS}")
        embeds = self.embed_inputs(batch.input_ids, batch.media)
        need_hidden = bool({"align", "diffusion"} & set(losses)) and bool(batch.targets)
        logits, hidden, _ = self.llm(
            embeds, attention_mask=batch.attention_mask, output_hidden_states=need_hidden
        )
        terms: dict[str, torch.Tensor] = {}
        diagnostics: dict[str, torch.Tensor] = {}
        if "text" in losses:
            terms["text"] = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                batch.labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )
        if need_hidden:
            for modality, targets in batch.targets.items():
                cond = self.project_signal(modality, batch.input_ids, hidden, embeds)
                if cond.shape[0] != len(targets):
                    raise ValueError(
                        f"{modality}: {cond.shape[0]} signal groups but {len(targets)} targets"
                    )
                if "align" in losses:
                    target = self.caption_targets(modality, targets.captions, targets.embeddings)
                    if target is not None:
                        terms[f"align/{modality}"] = F.mse_loss(cond.float(), target.float())
                        diagnostics[f"align_row_max/{modality}"] = _worst_row(cond, target)
                if "diffusion" in losses and all(x is not None for x in targets.media):
                    media = torch.stack(targets.media).to(cond.device)
                    decoder = self.decoders[modality]
                    terms[f"diffusion/{modality}"] = decoder.denoising_loss(cond, media)
        if not terms:
            raise ValueError(f"no loss term could be computed for {losses} on this batch")
        return ModelOutput(sum(terms.values()), terms, diagnostics)

    def project_signal(
        self, modality: str, input_ids: torch.Tensor, hidden: torch.Tensor, embeds: torch.Tensor
    ) -> torch.Tensor:
        positions = self.signal_groups(input_ids, modality)
        width = hidden.shape[-1]
        h = hidden.reshape(-1, width)[positions]
        e = embeds.reshape(-1, width)[positions]
        return self.output_projectors[modality](h.float(), e.float())

    def caption_targets(
        self, modality: str, captions: list[str | None], embeddings: list[torch.Tensor | None]
    ) -> torch.Tensor | None:
        """The decoder's own text embedding of each caption (precomputed ones are used as given)."""
        if all(e is not None for e in embeddings):
            return torch.stack(embeddings).to(self.device)
        if any(c is None and e is None for c, e in zip(captions, embeddings)):
            return None
        decoder = self.decoders[modality]
        with torch.no_grad():
            computed = decoder.encode_text([c for c in captions if c is not None] or [""])
        it = iter(computed)
        rows = [e if e is not None else next(it) for e in embeddings]
        return torch.stack([r.to(self.device) for r in rows])

    # ---- generation -----------------------------------------------------------------------------
    def generate(self, messages: list[dict] | str, **kwargs: Any) -> Reply:
        """Answer a conversation; see `stream` for the arguments."""
        reply = None
        for event in self.stream(messages, **kwargs):
            if isinstance(event, Reply):
                reply = event
        assert reply is not None
        return reply

    @torch.no_grad()
    def stream(
        self,
        messages: list[dict] | str,
        modalities: list[str] | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        decoder_options: dict[str, dict[str, Any]] | None = None,
    ) -> Iterator[TextDelta | GeneratedMedia | Reply]:
        """Yield text deltas as they are decoded, then each generated medium, then the Reply.

        `modalities` (like OpenAI's field) names the output modalities the reply must contain;
        "text" is implied. When None, the model's own signal tokens decide, each modality at most
        once. `decoder_options[modality]` passes steps, guidance, height/width, num_frames, seconds.
        """
        required, allowed = self._output_modalities(modalities)
        turns, system = parse_messages(messages)
        if turns[-1].role != "user":
            raise ValueError("the last message must be the user's")
        enc = encode_conversation(
            turns,
            self.llm,
            self.template,
            {m: self.num_media_tokens(m) for m in MODALITIES},
            system=system,
            add_generation_prompt=True,
        )
        media: dict[str, list[torch.Tensor]] = {}
        for modality, value in enc.media:
            media.setdefault(modality, []).append(self.prepare_media(modality, value))
        input_ids = torch.tensor([enc.input_ids], device=self.device)
        embeds = self.embed_inputs(input_ids, {m: torch.stack(x) for m, x in media.items()})

        options = SamplingOptions(max_new_tokens, temperature, top_p, seed)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device="cpu").manual_seed(seed if seed is not None else 0)
        tok = self.llm.tokenizer
        banned = set(self.llm.signal.placeholder_ids.values())
        banned.update(i for i in (tok.bos_token_id, tok.pad_token_id) if i != self.llm.eos_token_id)
        guide = SignalGuide(
            self.llm.signal, allowed, required, {i for i in banned if i is not None}
        )

        cache = self.llm.new_cache()
        logits, _, cache = self.llm(embeds, cache=cache)
        generated: list[int] = []
        text_ids: list[int] = []
        emitted = ""
        signal_states: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        while True:
            token = guide.next_token(
                logits[0, -1].float().cpu(),
                options,
                generator,
                self.llm.eos_token_id,
                len(generated),
            )
            if token is None:
                break
            generated.append(token)
            modality = guide.group_of(token)
            is_signal = modality is not None
            token_embed = self.llm.embed(torch.tensor([[token]], device=self.device))
            logits, hidden, cache = self.llm(
                token_embed, cache=cache, output_hidden_states=is_signal
            )
            if is_signal:
                signal_states.setdefault(modality, []).append((hidden[0, -1], token_embed[0, -1]))
                guide.advance(token)
                continue
            text_ids.append(token)
            text, stopped = visible_text(self.llm.decode(text_ids), self.template.stop)
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                yield TextDelta(text[len(emitted) :])
                emitted = text
            if stopped and not guide.pending:
                break
        text, _ = visible_text(self.llm.decode(text_ids), self.template.stop, final=True)
        if len(text) > len(emitted):
            yield TextDelta(text[len(emitted) :])

        outputs: list[GeneratedMedia] = []
        for modality in guide.produced:
            states = signal_states[modality]
            hidden = torch.stack([h for h, _ in states])[None].float()
            token_embeds = torch.stack([e for _, e in states])[None].float()
            cond = self.output_projectors[modality](hidden, token_embeds)
            opts = dict((decoder_options or {}).get(modality, {}))
            opts.setdefault("seed", seed if seed is not None else 0)
            data = self.decoders[modality].generate(cond, **opts)[0]
            item = GeneratedMedia(modality, data, cond[0].cpu())
            outputs.append(item)
            yield item
        yield Reply(text.strip(), outputs, generated)

    def _output_modalities(self, modalities: list[str] | None) -> tuple[set[str], set[str]]:
        available = set(self.decoders)
        if modalities is None:
            return set(), available
        wanted = set()
        for m in modalities:
            if m == "text":
                continue
            if m not in MODALITIES:
                raise ValueError(
                    f"unknown output modality {m!r}; use text, {', '.join(MODALITIES)}"
                )
            if m not in available:
                raise ValueError(f"this model has no {m} decoder")
            wanted.add(m)
        return wanted, wanted


def visible_text(text: str, stop: str | None, final: bool = False) -> tuple[str, bool]:
    """Text up to the stop string, and whether it was reached.

    While streaming, a tail that could be the start of the stop string is held back, so a client
    never receives text that is later taken away.
    """
    if not stop:
        return text, False
    if stop in text:
        return text[: text.index(stop)], True
    if not final:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                return text[:-k], False
    return text, False


def _resolve_paths(config: NextGPTConfig, directory: Path) -> NextGPTConfig:
    """Make component paths that are relative to a model directory absolute."""

    def resolve(p: str | None) -> str | None:
        if p is None:
            return None
        candidate = directory / p
        return str(candidate) if candidate.exists() else p

    config.encoder.pretrained = resolve(config.encoder.pretrained)
    config.llm.pretrained = resolve(config.llm.pretrained)
    config.llm.base_rows = resolve(config.llm.base_rows)
    for d in config.decoders.values():
        d.pretrained = resolve(d.pretrained)
    return config


def encoder_input(modality: str, value: Any, config: EncoderConfig) -> torch.Tensor:
    """A file path, PIL image, array or (waveform, rate) -> the encoder's input tensor."""
    if isinstance(value, torch.Tensor):
        return value
    if modality == "image":
        return preprocess_image(media_io.load_image(value), config)
    if modality == "audio":
        wave, rate = media_io.load_audio(value)
        return preprocess_audio(wave, rate, config)
    if modality == "video":
        frames, fps = media_io.load_video(value)
        return preprocess_video(frames, fps, config)
    raise ValueError(f"unknown input modality {modality!r}; use {', '.join(MODALITIES)}")


def _atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write safetensors to a temporary file and rename, so a crash never leaves a broken file."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, tmp)
    os.replace(tmp, path)
