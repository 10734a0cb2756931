"""`nextgpt convert`: the released NExT-GPT checkpoint (`7b_tiva_v0`) as a nextgpt model directory.

The release is a delta, `pytorch_model.pt`, saved by the reference training code from its
`NextGPTModel.named_parameters()` (stage 3: Vicuna-7B v0 wrapped by peft 0.3). Key by key:

- `llama_proj.{weight,bias}` (4096x1024) -> `input_projector.proj.*`: our `linear` projector on
  the pooled ImageBind vector (`source: pooled`).
- `llama_model.base_model.model.model.layers.N.self_attn.{q,k,v,o}_proj.lora_{A,B}.default.weight`
  (r=32) -> `llm.lora.base_model.model.model.layers.N.self_attn.*.lora_{A,B}.weight`, peft's
  saved layout; alpha (32) is not stored and comes from the reference config.
- `llama_model.base_model.model.model.embed_tokens.weight` and `...lm_head.weight` (32038x4096,
  full matrices): the 32000 base rows -> `base_rows.safetensors` (`llm.base_rows`); the rows of
  `[IMGk]` / `[AUDk]` / `[VIDk]` -> `llm.signal_embed` / `llm.signal_lm_head` at `<image_0k>`...
- `gen_text_hidden_fcs{,_video,_audio}.0.` (image, video, audio; `TextFcLayer` mode
  'transformer') -> `output_projectors.<m>.`: `fc` -> `in_fc`, `tfm.encoder` / `tfm.decoder`
  (a pre-norm nn.Transformer, d=512, 4 heads, 4+4 layers) -> `encoder` / `decoder`, `query_embs`
  (1xLx512) -> `queries`, `model` -> `out_fc`.

The reference projector has no positional embedding over the signal tokens, so `pos_embed` is
zero. The tokenizer rows are those of Vicuna-7B v0 (32000) followed by the tokens the reference
adds in this order: `<Img>`, `</Img>`, `[IMG0..3]`, `[VID0..23]`, `[AUD0..7]` (read from the
checkpoint's `added_tokens.json` when it is there). Only tensors are read (`weights_only=True`).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from nextgpt.config import (
    MODALITIES,
    DecoderConfig,
    EncoderConfig,
    InputProjectorConfig,
    LLMConfig,
    LoraSettings,
    NextGPTConfig,
    OutputProjectorConfig,
    SignalTokenConfig,
    default_imagebind_path,
)
from nextgpt.signal_tokens import SignalTokens, placeholder_name, signal_token_names

DELTA_FILE = "pytorch_model.pt"
BASE_ROWS_FILE = "base_rows.safetensors"
LLM_PREFIX = "llama_model.base_model.model."
# the reference names of each modality's signal tokens and output projector
REFERENCE_SIGNAL = {"image": "IMG", "video": "VID", "audio": "AUD"}
REFERENCE_PROJECTOR = {
    "image": "gen_text_hidden_fcs.0.",
    "video": "gen_text_hidden_fcs_video.0.",
    "audio": "gen_text_hidden_fcs_audio.0.",
}
REFERENCE_COUNTS = {"image": 4, "video": 24, "audio": 8}
REFERENCE_HEADS = 4  # nn.Transformer(nhead=4): not recoverable from the weights
REFERENCE_LORA_ALPHA = 32  # stage_3.yaml; not stored in the checkpoint
REFERENCE_LORA_DROPOUT = 0.1
# the reference code's generation defaults (code/inference.py)
REFERENCE_DECODING = {
    "image": {"steps": 50, "guidance": 7.5},
    "video": {"steps": 50, "guidance": 7.5, "num_frames": 24},
    "audio": {"steps": 50, "guidance": 7.5, "audio_seconds": 9.0},
}
_PROJECTOR_RENAMES = (
    ("fc.", "in_fc."),
    ("model.", "out_fc."),
    ("tfm.encoder.", "encoder."),
    ("tfm.decoder.", "decoder."),
)


class ConversionError(ValueError):
    """The checkpoint is not the released NExT-GPT delta, or does not fit the named base parts."""


def reference_added_tokens(counts: dict[str, int] = REFERENCE_COUNTS) -> list[str]:
    """The tokens the reference adds to Vicuna's tokenizer, in the order it adds them."""
    out = ["<Img>", "</Img>"]
    for m in ("image", "video", "audio"):
        out += [f"[{REFERENCE_SIGNAL[m]}{i}]" for i in range(counts[m])]
    return out


def read_delta(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The delta's tensors and its added tokens in id order (a directory or the .pt file)."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    file = path / DELTA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"NExT-GPT checkpoint not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # mmap needs the zip format; older pickles load without it
        state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{file}: expected a state dict of tensors")
    added_file = directory / "added_tokens.json"
    if added_file.is_file():
        added = json.loads(added_file.read_text())
        tokens = sorted(added, key=added.__getitem__)
    else:
        tokens = reference_added_tokens()
    return dict(state), tokens


def _signal_counts(added: list[str]) -> dict[str, int]:
    counts = {}
    for m, tag in REFERENCE_SIGNAL.items():
        counts[m] = sum(1 for t in added if re.fullmatch(rf"\[{tag}\d+\]", t))
        if counts[m] == 0:
            raise ConversionError(f"the checkpoint's tokenizer has no [{tag}0] signal token")
    return counts


def _take(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove and return every tensor under `prefix`, keyed by the rest of its name."""
    keys = [k for k in state if k.startswith(prefix)]
    return {k[len(prefix) :]: state.pop(k) for k in keys}


def _require(state: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ConversionError(f"the checkpoint has no {key}: is it the NExT-GPT 7b_tiva_v0 delta?")
    return state.pop(key)


def convert_output_projector(
    ref: dict[str, torch.Tensor], num_signal_tokens: int, where: str
) -> tuple[OutputProjectorConfig, dict[str, torch.Tensor]]:
    """One reference `TextFcLayer` (mode 'transformer') as our OutputProjector's state dict."""
    if any(k.startswith("Qformer.") for k in ref) or "tfm.encoder.norm.weight" not in ref:
        raise ConversionError(f"{where}: only the reference 'transformer' mode can be converted")
    hidden = ref["fc.weight"].shape[0]
    layers = {
        part: len({k.split(".")[3] for k in ref if k.startswith(f"tfm.{part}.layers.")})
        for part in ("encoder", "decoder")
    }
    config = OutputProjectorConfig(
        hidden_dim=hidden,
        num_heads=REFERENCE_HEADS,
        encoder_layers=layers["encoder"],
        decoder_layers=layers["decoder"],
        ff_dim=ref["tfm.encoder.layers.0.linear1.weight"].shape[0],
        dropout=0.0,
        add_input_embeddings=True,  # TextFcLayer adds the signal tokens' input embeddings
    )
    out: dict[str, torch.Tensor] = {"pos_embed": torch.zeros(num_signal_tokens, hidden)}
    for key, value in ref.items():
        if key == "query_embs":
            out["queries"] = value[0]
            continue
        for old, new in _PROJECTOR_RENAMES:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            raise ConversionError(f"{where}: unexpected tensor {key}")
    return config, {k: v.float().contiguous() for k, v in out.items()}


def _check_projector(
    config: OutputProjectorConfig, state: dict[str, torch.Tensor], llm_dim: int, where: str
) -> None:
    """Load the converted weights into our module (on meta): names and shapes must all match."""
    from nextgpt.projectors import OutputProjector

    cond_len, cond_dim = state["queries"].shape[0], state["out_fc.weight"].shape[0]
    signal = state["pos_embed"].shape[0]
    with torch.device("meta"):
        module = OutputProjector(config, llm_dim, signal, cond_len, cond_dim)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise ConversionError(f"{where}: does not map onto OutputProjector: {e}") from e


def convert_lora(
    ref: dict[str, torch.Tensor], num_layers: int
) -> tuple[dict[str, torch.Tensor], int, tuple[str, ...]]:
    """peft 0.3 keys (`.lora_A.default.weight`) -> saved peft layout, r and the target modules."""
    out: dict[str, torch.Tensor] = {}
    targets: set[str] = set()
    ranks: set[int] = set()
    for key, value in ref.items():
        match = re.fullmatch(
            r"model\.layers\.(\d+)\.(\w+)\.(\w+)\.(lora_[AB])(\.default)?\.weight", key
        )
        if match is None or int(match[1]) >= num_layers:
            raise ConversionError(f"unexpected LLM tensor {LLM_PREFIX}{key}")
        targets.add(match[3])
        ranks.add(value.shape[0] if match[4] == "lora_A" else value.shape[1])
        name = f"base_model.model.model.layers.{match[1]}.{match[2]}.{match[3]}.{match[4]}.weight"
        out[name] = value.float().contiguous()
    if len(ranks) > 1:
        raise ConversionError(f"LoRA ranks differ between layers: {sorted(ranks)}")
    expected = num_layers * len(targets) * 2
    if len(out) != expected:
        raise ConversionError(f"{len(out)} LoRA tensors, expected {expected} (every layer)")
    return out, ranks.pop() if ranks else 0, tuple(sorted(targets))


def _decoder_config(modality: str, source: str, cond_len: int, cond_dim: int) -> DecoderConfig:
    default = NextGPTConfig().decoders[modality]
    config = DecoderConfig(
        modality,
        source,
        cond_len,
        cond_dim,
        **REFERENCE_DECODING[modality],
    )
    if source == default.pretrained:  # the reference renders Zeroscope at 576x320
        config.height, config.width = default.height, default.width
    return config


def convert_nextgpt_delta(
    delta: str | Path,
    vicuna: str | Path,
    out: str | Path,
    *,
    encoder: EncoderConfig | None = None,
    decoders: dict[str, str] | None = None,
    dtype: str = "bfloat16",
    quantization: str | None = None,
    device_map: str | None = None,
    decoder_dtype: str = "float16",
    cpu_offload: bool = False,
    lora_alpha: int = REFERENCE_LORA_ALPHA,
) -> NextGPTConfig:
    """Write `out/config.yaml`, `trainable.safetensors` and `base_rows.safetensors`.

    `vicuna` is Vicuna-7B v0 (a local directory: v0 is itself published as a delta on LLaMA, so it
    must be assembled first) or a hub id; it is read for its tokenizer and config only. `encoder`
    defaults to ImageBind-huge at the default location; `decoders` maps modalities to hub ids or
    local directories (defaults: SD-1.5, AudioLDM l-full, Zeroscope v2 576w, as the reference).
    `lora_alpha` is not stored in the checkpoint; the reference trains with 32.
    """
    from transformers import AutoConfig, AutoTokenizer

    from nextgpt.llm import register_signal_tokens, special_token_ids
    from nextgpt.model import CONFIG_FILE, TRAINABLE_FILE

    state, added = read_delta(delta)
    counts = _signal_counts(added)
    vicuna = str(Path(vicuna).resolve()) if Path(vicuna).exists() else str(vicuna)
    llm_config = AutoConfig.from_pretrained(vicuna)
    hidden, num_layers = llm_config.hidden_size, llm_config.num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(vicuna)
    base = len(tokenizer)

    embed = _require(state, LLM_PREFIX + "model.embed_tokens.weight")
    head = _require(state, LLM_PREFIX + "lm_head.weight")
    if embed.shape != (base + len(added), hidden) or head.shape != embed.shape:
        raise ConversionError(
            f"embedding rows {tuple(embed.shape)} / lm_head {tuple(head.shape)}: expected "
            f"{base} base tokens + {len(added)} added, width {hidden}; is {vicuna} Vicuna-7B v0?"
        )
    row_of = {token: base + i for i, token in enumerate(added)}

    signal_config = SignalTokenConfig(**counts)
    register_signal_tokens(tokenizer, signal_config)
    signal = SignalTokens.bind(signal_config, tokenizer)
    name_of = {i: n for n, i in tokenizer.get_vocab().items()}
    reference_name = {placeholder_name(m): None for m in MODALITIES}
    for m in MODALITIES:
        for i, name in enumerate(signal_token_names(m, counts[m])):
            reference_name[name] = f"[{REFERENCE_SIGNAL[m]}{i}]"
    rows = []
    for token_id in special_token_ids(signal):
        ref = reference_name[name_of[token_id]]
        rows.append(None if ref is None else row_of[ref])
    mean_embed, mean_head = embed[:base].float().mean(0), head[:base].float().mean(0)

    def signal_rows(matrix: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        # placeholders are replaced by media features, never read: they keep the mean row
        return torch.stack([mean if r is None else matrix[r].float() for r in rows])

    trainable = {
        "llm.signal_embed": signal_rows(embed, mean_embed),
        "llm.signal_lm_head": signal_rows(head, mean_head),
        "input_projector.proj.weight": _require(state, "llama_proj.weight").float(),
        "input_projector.proj.bias": _require(state, "llama_proj.bias").float(),
    }
    lora, rank, targets = convert_lora(_take(state, LLM_PREFIX), num_layers)
    trainable.update({f"llm.lora.{k}": v for k, v in lora.items()})

    embed_dim = trainable["input_projector.proj.weight"].shape[1]
    encoder = encoder or EncoderConfig(pretrained=default_imagebind_path())
    if encoder.embed_dim != embed_dim:
        raise ConversionError(
            f"the input projection reads {embed_dim}-d ImageBind vectors, "
            f"the encoder gives {encoder.embed_dim}"
        )

    sources = {m: NextGPTConfig().decoders[m].pretrained for m in MODALITIES}
    sources.update(decoders or {})
    projector_configs = []
    decoder_configs = {}
    for m in MODALITIES:
        ref = _take(state, REFERENCE_PROJECTOR[m])
        if not ref:
            raise ConversionError(f"the checkpoint has no {REFERENCE_PROJECTOR[m]}* projector")
        projector_config, projector = convert_output_projector(ref, counts[m], m)
        _check_projector(projector_config, projector, hidden, m)
        projector_configs.append(projector_config)
        trainable.update({f"output_projectors.{m}.{k}": v for k, v in projector.items()})
        cond_len, cond_dim = projector["queries"].shape[0], projector["out_fc.weight"].shape[0]
        decoder_configs[m] = _decoder_config(m, str(sources[m]), cond_len, cond_dim)
        decoder_configs[m].dtype = decoder_dtype
        decoder_configs[m].cpu_offload = cpu_offload
    if state:
        raise ConversionError(f"tensors this converter does not know: {sorted(state)[:5]}")
    if any(c != projector_configs[0] for c in projector_configs):
        raise ConversionError(f"the output projectors differ in shape: {projector_configs}")

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"embed_tokens": embed[:base].contiguous(), "lm_head": head[:base].contiguous()},
        str(out / BASE_ROWS_FILE),
    )
    config = NextGPTConfig(
        name="nextgpt-7b-tiva-v0",
        encoder=encoder,
        input_projector=InputProjectorConfig(kind="linear", source="pooled"),
        llm=LLMConfig(
            pretrained=vicuna,
            dtype=dtype,
            quantization=quantization,
            device_map=device_map,
            template="nextgpt_v0",
            lora=LoraSettings(rank, lora_alpha, REFERENCE_LORA_DROPOUT, targets),
            base_rows=BASE_ROWS_FILE,  # relative: resolved against the model directory
        ),
        signal_tokens=signal_config,
        output_projector=projector_configs[0],
        decoders=decoder_configs,
    )
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(out / TRAINABLE_FILE))
    config.to_yaml(out / CONFIG_FILE)
    return config


# ---- CLI -----------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "convert",
        help="turn the released NExT-GPT checkpoint (7b_tiva_v0) into a model directory",
        description="Convert the released NExT-GPT delta (pytorch_model.pt) so that "
        "`nextgpt generate --model OUT` runs it.",
    )
    c.add_argument("delta", help="the checkpoint directory (or its pytorch_model.pt)")
    c.add_argument("--vicuna", required=True, help="Vicuna-7B v0 directory (or hub id)")
    c.add_argument("--out", required=True, type=Path, help="model directory to write")
    c.add_argument("--imagebind", default=None, help="imagebind_huge.pth (default location)")
    for m in MODALITIES:
        c.add_argument(f"--{m}-decoder", default=None, help=f"{m} decoder hub id or directory")
    dtypes = ("bfloat16", "float16", "float32")
    c.add_argument("--dtype", default="bfloat16", choices=dtypes, help="LLM dtype")
    c.add_argument("--decoder-dtype", default="float16", choices=dtypes)
    c.add_argument("--quantization", default=None, choices=("8bit", "4bit"))
    c.add_argument("--device-map", default=None, help="LLM placement, e.g. auto or cuda")
    c.add_argument("--cpu-offload", action="store_true", help="decoders: model CPU offload")
    c.add_argument("--lora-alpha", type=int, default=REFERENCE_LORA_ALPHA)
    c.set_defaults(handler=_convert)


def _convert(args: argparse.Namespace) -> int:
    from nextgpt.cli import UsageError

    decoders = {m: getattr(args, f"{m}_decoder") for m in MODALITIES}
    try:
        config = convert_nextgpt_delta(
            args.delta,
            args.vicuna,
            args.out,
            encoder=EncoderConfig(pretrained=args.imagebind) if args.imagebind else None,
            decoders={m: s for m, s in decoders.items() if s is not None},
            dtype=args.dtype,
            quantization=args.quantization,
            device_map=args.device_map,
            decoder_dtype=args.decoder_dtype,
            cpu_offload=args.cpu_offload,
            lora_alpha=args.lora_alpha,
        )
    except (FileNotFoundError, OSError, ConversionError) as e:
        raise UsageError(str(e)) from e
    print(f'wrote {args.out} ({config.name}); run: nextgpt generate --model {args.out} "..."')
    return 0
