"""How much memory each part of a NExT-GPT needs, worked out from configs without loading weights.

Parameter counts come from building each part on PyTorch's meta device from its config: the
config on disk (a local directory or the Hugging Face cache) when there is one, else the published
architecture of a known public checkpoint (`PUBLIC_LLMS`, `PUBLIC_DECODERS`). Bytes per precision
are arithmetic. Activations are a rough allowance per part (`ACTIVATION_FACTOR`, plus the LLM's KV
cache), so read a "fits" verdict as a guide with a margin, not a promise. The reference code loads
every part in fp32-or-fp16 at once and is killed on 16 GB machines; `plans` lists the cheaper ways.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from nextgpt.config import MODALITIES, LLMConfig, NextGPTConfig
from nextgpt.sources import locate

GIB = 1024**3
PRECISIONS = ("fp32", "bf16", "8bit", "4bit")
BYTES = {"fp32": 4.0, "bf16": 2.0}
INT8_BYTES = 1.0  # LLM.int8 weight (its per-row scale is negligible)
NF4_BYTES = 0.5 + 4 / 64  # NF4 weight plus one fp32 absmax per block of 64 (no double quant)
KV_CONTEXT = 2048  # tokens of KV cache the LLM's working memory allows for
# working memory of one forward / one generation at the configured output size, as a fraction of
# the part's 16-bit weights (Zeroscope's card: 7.9 GB for 30 frames of 576x320 at fp16)
ACTIVATION_FACTOR = {
    "encoder": 0.1,
    "llm": 0.05,
    "projectors": 0.1,
    "image": 0.5,
    "audio": 0.5,
    "video": 1.2,
}

# Architectures of the public LLMs the presets name, for sizing before anything is downloaded.
_LLAMA_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
PUBLIC_LLMS: dict[str, dict] = {
    "lmsys/vicuna-7b-v1.5": {**_LLAMA_7B, "max_position_embeddings": 4096},
    "lmsys/vicuna-7b-v1.3": {**_LLAMA_7B, "max_position_embeddings": 2048},
}
# Parameters per pipeline component of the public decoders, computed by building each published
# component config on the meta device (SD-1.5's UNet 859,520,964, VAE 83,653,863 and CLIP text
# encoder 123,060,480 match the published counts).
_SD_VAE = 83_653_863
_OPENCLIP_H_TEXT = 340_387_840
_SD15 = {
    "unet": 859_520_964,
    "vae": _SD_VAE,
    "text_encoder": 123_060_480,
    "safety_checker": 303_981_588,
}
PUBLIC_DECODERS: dict[str, dict[str, int]] = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": _SD15,
    "runwayml/stable-diffusion-v1-5": _SD15,
    "stabilityai/stable-diffusion-2-1": {
        "unet": 865_910_724,
        "vae": _SD_VAE,
        "text_encoder": _OPENCLIP_H_TEXT,
    },
    "cerspense/zeroscope_v2_576w": {
        "unet": 1_411_233_860,
        "vae": _SD_VAE,
        "text_encoder": _OPENCLIP_H_TEXT,
    },
    "cvssp/audioldm-l-full": {
        "unet": 739_139_080,
        "vae": 55_376_873,
        "text_encoder": 125_302_016,
        "vocoder": 55_264_897,
    },
}


@dataclass
class Part:
    name: str
    params: int
    quantizable: int = 0  # weights of the Linear layers bitsandbytes quantizes (the LLM's)


@dataclass
class ComponentSize:
    """The size of one component; `parts` is empty when no config for it could be found."""

    component: str  # encoder | llm | projectors | image | audio | video
    source: str  # what was sized: a path, a hub id, or how it is built
    basis: str  # where the architecture came from
    parts: list[Part] = field(default_factory=list)
    kv_bytes_per_token: int = 0  # the LLM's KV cache in 16 bits

    @property
    def known(self) -> bool:
        return bool(self.parts)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts)

    def weight_bytes(self, precision: str) -> float | None:
        """Bytes of the weights at `precision`; None where the part cannot be quantized so."""
        if precision in BYTES:
            return self.params * BYTES[precision]
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
        quantizable = sum(p.quantizable for p in self.parts)
        if not quantizable:
            return None
        per = INT8_BYTES if precision == "8bit" else NF4_BYTES
        return quantizable * per + (self.params - quantizable) * BYTES["bf16"]

    def peak_bytes(self, precision: str, offload: bool = False) -> float:
        """Weights on the GPU plus working memory; with CPU offload one part is resident at once."""
        weights = self.weight_bytes(precision)
        if weights is None:
            raise ValueError(f"{self.component} cannot be loaded in {precision}")
        if offload and self.params:
            weights *= max(p.params for p in self.parts) / self.params
        working = ACTIVATION_FACTOR[self.component] * self.params * BYTES["bf16"]
        return weights + working + self.kv_bytes_per_token * KV_CONTEXT


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- sizing each component -----------------------------------------------------------------------
def size_encoder(config: NextGPTConfig) -> ComponentSize:
    """ImageBind as `EncoderConfig` builds it (only the trunks it builds), one part per trunk."""
    from nextgpt.encoders.imagebind import ImageBindEncoder

    with torch.device("meta"):
        encoder = ImageBindEncoder(config.encoder)
    parts = []
    for trunk in encoder.trunk_names:
        n = sum(
            p.numel()
            for name, p in encoder.named_parameters()
            if name.split(".")[1] == trunk  # modality_<group>.<trunk>.*
        )
        parts.append(Part(trunk, n))
    source = config.encoder.pretrained or "random (built here)"
    return ComponentSize("encoder", source, "EncoderConfig", parts)


def _llm_architecture(config: LLMConfig):
    """(transformers config, where it came from), or (None, why not)."""
    from transformers import AutoConfig, LlamaConfig

    if config.pretrained is None:
        fields = {
            "hidden_size": config.hidden_size,
            "intermediate_size": config.intermediate_size,
            "num_hidden_layers": config.num_layers,
            "num_attention_heads": config.num_heads,
            "vocab_size": config.vocab_size,
            "tie_word_embeddings": False,
        }
        return LlamaConfig(**fields), "LLMConfig fields (random tiny LLaMA)"
    where = locate(config.pretrained)
    if where.path is not None and (where.path / "config.json").is_file():
        return AutoConfig.from_pretrained(where.path), f"{where.path / 'config.json'}"
    if config.pretrained in PUBLIC_LLMS:
        return LlamaConfig(**PUBLIC_LLMS[config.pretrained]), "published architecture"
    return None, f"no config.json found in {where.looked_in}"


def _lora_targets(name: str, targets: str | tuple[str, ...]) -> bool:
    if targets == "all-linear":
        return True
    names = (targets,) if isinstance(targets, str) else targets
    return name.rsplit(".", 1)[-1] in names


def size_llm(config: NextGPTConfig) -> ComponentSize:
    """The causal LM (quantizable Linear weights counted apart) and its LoRA, if configured."""
    from transformers import AutoModelForCausalLM

    cfg = config.llm
    source = cfg.pretrained or "random (built here)"
    arch, basis = _llm_architecture(cfg)
    if arch is None:
        return ComponentSize("llm", source, basis)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(arch)
    head = model.get_output_embeddings()
    linears = [
        (name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
    ]
    parts = [Part("transformer", count(model), sum(m.weight.numel() for _, m in linears))]
    if cfg.lora is not None:
        r = cfg.lora.r
        lora = sum(
            r * (m.in_features + m.out_features)
            for name, m in linears
            if _lora_targets(name, cfg.lora.target_modules)
        )
        parts.append(Part("lora", lora))
    text = arch.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    kv = 2 * text.num_hidden_layers * kv_heads * head_dim * 2
    return ComponentSize("llm", source, basis, parts, kv_bytes_per_token=kv)


def _pipeline_parts(root: Path) -> list[Part]:
    """One part per model in a diffusers pipeline directory, built from its config on meta."""
    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text())
    parts = []
    for name, spec in index.items():
        if (
            not isinstance(spec, list)
            or None in spec
            or not (root / name / "config.json").is_file()
        ):
            continue
        library, class_name = spec
        module = importlib.import_module(
            library
            if library in ("diffusers", "transformers")
            else f"diffusers.pipelines.{library}"
        )
        cls = getattr(module, class_name)
        with torch.device("meta"):
            if issubclass(cls, transformers.PreTrainedModel):
                model = cls(cls.config_class.from_pretrained(root / name))
            elif issubclass(cls, diffusers.ModelMixin):
                model = cls.from_config(cls.load_config(root / name))
            else:
                continue
        parts.append(Part(name, count(model)))
    return parts


def size_decoder(config: NextGPTConfig, modality: str) -> ComponentSize:
    """Every model of the modality's diffusers pipeline (UNet, VAE, text encoder, ...)."""
    decoder = config.decoders[modality]
    if decoder.pretrained is None:
        from nextgpt.decoders.tiny import build_tiny_pipeline

        pipe = build_tiny_pipeline(modality, decoder.tiny)
        parts = [
            Part(name, count(m)) for name, m in pipe.components.items() if isinstance(m, nn.Module)
        ]
        return ComponentSize(modality, "random tiny pipeline", "TinyDecoderArch", parts)
    where = locate(decoder.pretrained)
    if where.path is not None and (where.path / "model_index.json").is_file():
        parts = _pipeline_parts(where.path)
        return ComponentSize(modality, decoder.pretrained, str(where.path), parts)
    if decoder.pretrained in PUBLIC_DECODERS:
        parts = [Part(n, p) for n, p in PUBLIC_DECODERS[decoder.pretrained].items()]
        return ComponentSize(modality, decoder.pretrained, "published architecture", parts)
    return ComponentSize(
        modality, decoder.pretrained, f"no model_index.json found in {where.looked_in}"
    )


def size_projectors(config: NextGPTConfig, llm: ComponentSize) -> ComponentSize:
    """What NExT-GPT trains besides LoRA: the input projector and one output projector a modality.

    Needs the LLM's width (from its sized architecture) and each decoder's recorded conditioning
    shape; a modality whose shape is not recorded yet is left out.
    """
    from nextgpt.projectors import build_input_projector, build_output_projector

    hidden = _llm_hidden(config)
    if hidden is None or not llm.known:
        return ComponentSize("projectors", "trained", "needs the LLM's width", [])
    with torch.device("meta"):
        parts = [
            Part(
                "input",
                count(
                    build_input_projector(config.input_projector, config.encoder.embed_dim, hidden)
                ),
            )
        ]
        for m in config.output_modalities:
            d = config.decoders[m]
            if d.cond_len is None or d.cond_dim is None:
                continue
            signal = getattr(config.signal_tokens, m)
            projector = build_output_projector(
                config.output_projector, hidden, signal, d.cond_len, d.cond_dim
            )
            parts.append(Part(f"output/{m}", count(projector)))
    return ComponentSize("projectors", "trained", "config", parts)


def _llm_hidden(config: NextGPTConfig) -> int | None:
    arch, _ = _llm_architecture(config.llm)
    return None if arch is None else arch.get_text_config().hidden_size


def estimate(config: NextGPTConfig) -> dict[str, ComponentSize]:
    """Sizes of every component, keyed encoder, llm, projectors, then each output modality."""
    llm = size_llm(config)
    sizes = {"encoder": size_encoder(config), "llm": llm}
    sizes["projectors"] = size_projectors(config, llm)
    for m in config.output_modalities:
        sizes[m] = size_decoder(config, m)
    return sizes


# ---- what fits on a GPU ------------------------------------------------------------------------
@dataclass
class Plan:
    """One way to run the model, the config changes that give it, and its peak GPU memory."""

    name: str
    changes: str
    need_bytes: float | None  # None when a component's size is unknown


def _decoder_precision(config: NextGPTConfig, modality: str) -> str:
    return "fp32" if config.decoders[modality].dtype == "float32" else "bf16"


def plans(config: NextGPTConfig, sizes: dict[str, ComponentSize]) -> list[Plan]:
    """From the configured set-up to the leanest one, each with its estimated peak.

    The encoder and projectors run in fp32 (as the model runs them). Decoders load when first
    needed; releasing one before the next (`Decoder.release`) keeps only one resident.
    """
    decoders = [m for m in MODALITIES if m in sizes and m in config.decoders]
    llm_precision = config.llm.quantization or ("fp32" if config.llm.dtype == "float32" else "bf16")
    if not all(s.known for s in sizes.values()):
        return [Plan("as configured", "none", None)]
    base = sizes["encoder"].peak_bytes("fp32") + sizes["projectors"].peak_bytes("fp32")

    def with_llm(precision: str) -> float:
        return base + sizes["llm"].peak_bytes(precision)

    def one_decoder(offload: bool) -> float:
        return max((sizes[m].peak_bytes("bf16", offload) for m in decoders), default=0.0)

    every = sum(sizes[m].peak_bytes(_decoder_precision(config, m)) for m in decoders)
    out = [
        Plan("as configured, every decoder resident", "none", with_llm(llm_precision) + every),
        Plan(
            "LLM bf16, fp16 decoders one at a time",
            "llm.dtype: bfloat16; decoders.*.dtype: float16; release a decoder after use",
            with_llm("bf16") + one_decoder(False),
        ),
    ]
    if sizes["llm"].weight_bytes("8bit") is not None:
        out += [
            Plan(
                "LLM 8-bit, fp16 decoders one at a time",
                "llm.quantization: 8bit",
                with_llm("8bit") + one_decoder(False),
            ),
            Plan(
                "LLM 4-bit, fp16 decoders one at a time",
                "llm.quantization: 4bit",
                with_llm("4bit") + one_decoder(False),
            ),
            Plan(
                "LLM 4-bit, fp16 decoders with model CPU offload",
                "llm.quantization: 4bit; decoders.*.cpu_offload: true",
                with_llm("4bit") + one_decoder(True),
            ),
        ]
        if len(decoders) > 1:
            # the decoders a user needs: leave out the one that needs the most
            heaviest = max(decoders, key=lambda m: sizes[m].peak_bytes("bf16", True))
            decoders.remove(heaviest)
            out.append(
                Plan(
                    f"as above, without the {heaviest} decoder",
                    "llm.quantization: 4bit; decoders.*.cpu_offload: true; "
                    f"remove decoders.{heaviest}",
                    with_llm("4bit") + one_decoder(True),
                )
            )
    return out


def format_gb(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f} GiB"


def format_table(sizes: dict[str, ComponentSize]) -> str:
    """Parameters and weight memory per component and precision (8/4-bit: the LLM only)."""
    header = f"{'component':<11} {'params':>14}  " + "  ".join(f"{p:>9}" for p in PRECISIONS)
    lines = [header, "-" * len(header)]
    totals = dict.fromkeys(PRECISIONS, 0.0)
    for name, size in sizes.items():
        if not size.known:
            lines.append(f"{name:<11} {'?':>14}  ({size.basis})")
            continue
        cells = []
        for p in PRECISIONS:
            b = size.weight_bytes(p)
            totals[p] += b if b is not None else size.weight_bytes("bf16")
            cells.append(f"{'n/a' if b is None else f'{b / GIB:.2f}':>9}")
        lines.append(f"{name:<11} {size.params:>14,}  " + "  ".join(cells))
    total_params = sum(s.params for s in sizes.values())
    cells = "  ".join(f"{totals[p] / GIB:>9.2f}" for p in PRECISIONS)
    lines += ["-" * len(header), f"{'total':<11} {total_params:>14,}  {cells}"]
    lines.append("GiB of weights; 8bit / 4bit quantize the LLM only (the rest counts as 16-bit)")
    return "\n".join(lines)


def format_plans(plan_list: list[Plan], gpu_gb: float | None) -> str:
    """Each plan's estimated peak, and whether it fits a GPU of `gpu_gb` GiB."""
    lines = []
    for plan in plan_list:
        verdict = ""
        if gpu_gb is not None and plan.need_bytes is not None:
            verdict = "fits" if plan.need_bytes <= gpu_gb * GIB else "does not fit"
        lines.append(f"{format_gb(plan.need_bytes):>10}  {verdict:<12} {plan.name}")
    if gpu_gb is not None:
        fitting = [
            p for p in plan_list if p.need_bytes is not None and p.need_bytes <= gpu_gb * GIB
        ]
        if fitting:
            lines.append(
                f"on a {gpu_gb:g} GiB GPU: {fitting[0].name} (change: {fitting[0].changes})"
            )
        else:
            lines.append(f"on a {gpu_gb:g} GiB GPU: no plan fits; use a larger GPU")
    return "\n".join(lines)
