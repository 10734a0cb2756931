"""Small checkpoints written in the exact on-disk layouts of the public ones (no downloads).

Each writer produces what its public counterpart ships, at toy width: a Vicuna v0 directory
(sentencepiece `tokenizer.model`, `LlamaTokenizer` config, sharded `pytorch_model-*.bin` with an
index), transformers `save_pretrained` LLMs (Mistral, Qwen2), diffusers pipelines, ImageBind's
`imagebind_huge.pth` (a plain state dict with the official names), a Hugging Face cache entry for a
hub id, and NExT-GPT's `7b_tiva_v0` delta (`pytorch_model.pt` + tokenizer files) with every key the
reference code saves. `reference_delta` restates the reference modules (code/model/layers.py
`TextFcLayer` in 'transformer' mode, peft 0.3 LoRA, `llama_proj`) so tests can compare outputs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from collections import OrderedDict
from pathlib import Path

import sentencepiece as spm
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from nextgpt.config import EncoderConfig, TinyDecoderArch
from nextgpt.convert import reference_added_tokens
from nextgpt.decoders.tiny import build_tiny_pipeline
from nextgpt.encoders.imagebind import ImageBindEncoder
from nextgpt.tokenizer import TINY_CORPUS, train_bpe_tokenizer


# ---- LLMs --------------------------------------------------------------------------------------
def write_vicuna_v0(directory: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """A LLaMA in Vicuna-7B v0's layout: sentencepiece tokenizer and two .bin shards."""
    directory.mkdir(parents=True, exist_ok=True)
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(TINY_CORPUS) * 4),
        model_writer=model_file,
        vocab_size=320,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model_file.getvalue())
    tokenizer_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 2048,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    state = LlamaForCausalLM(config).state_dict()
    config.save_pretrained(directory)
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: state[k].half() for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return directory


def write_causal_lm(directory: Path, family: str, seed: int = 0) -> Path:
    """A tiny Mistral or Qwen2 (tied embeddings) with a BPE tokenizer, via save_pretrained."""
    tokenizer = train_bpe_tokenizer()
    common = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if family == "mistral":
        model = MistralForCausalLM(MistralConfig(**common, tie_word_embeddings=False))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True))
    else:
        raise ValueError(family)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---- decoders, encoder, hub cache ----------------------------------------------------------------
def write_pipeline(
    directory: Path, modality: str, arch: TinyDecoderArch | None = None, seed: int = 0
) -> Path:
    """A diffusers pipeline directory (model_index.json + one folder per component)."""
    build_tiny_pipeline(modality, arch or TinyDecoderArch(), seed).save_pretrained(str(directory))
    return directory


SD2_LIKE = TinyDecoderArch(text_width=48, text_heads=3)  # wider conditioning than SD-1.5-like


def write_imagebind_pth(path: Path, config: EncoderConfig, seed: int = 0) -> Path:
    """ImageBind's official file: `torch.save` of the full state dict (all six modalities)."""
    torch.manual_seed(seed)
    encoder = ImageBindEncoder(dataclasses.replace(config, all_modalities=True, pretrained=None))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), path)
    return path


def put_in_hub_cache(cache: Path, repo_id: str, directory: Path) -> Path:
    """Lay `directory` out as the HF cache does for `repo_id` (refs/main -> snapshots/<sha>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(directory, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return repo


# ---- the released NExT-GPT delta -----------------------------------------------------------------
class TextFcLayer(nn.Module):
    """The reference output projector in 'transformer' mode (code/model/layers.py), restated."""

    def __init__(self, in_dim: int, out_dim: int, num_output_tokens: int, hidden: int = 512):
        super().__init__()
        self.fc = nn.Linear(in_dim, hidden)
        self.tfm = nn.Transformer(
            batch_first=True,
            norm_first=True,
            d_model=hidden,
            num_encoder_layers=4,
            num_decoder_layers=4,
            dim_feedforward=hidden * 4,
            dropout=0.0,
            nhead=4,
        )
        self.model = nn.Linear(hidden, out_dim)
        self.query_embs = nn.Parameter(torch.randn(1, num_output_tokens, hidden))

    def forward(self, x: torch.Tensor, input_embs: torch.Tensor) -> torch.Tensor:
        x = self.fc(x + input_embs)
        x = self.tfm(x, self.query_embs.repeat(x.shape[0], 1, 1))
        return self.model(x)


@dataclasses.dataclass
class DeltaSizes:
    """The public checkpoint's sizes by default; tests shrink the widths."""

    hidden: int = 4096
    layers: int = 32
    base_vocab: int = 32000
    imagebind_dim: int = 1024
    rank: int = 32
    projector_hidden: int = 512
    cond: dict[str, tuple[int, int]] = dataclasses.field(
        default_factory=lambda: {"image": (77, 768), "video": (77, 1024), "audio": (1, 512)}
    )


def reference_delta(sizes: DeltaSizes, seed: int = 0) -> OrderedDict[str, torch.Tensor]:
    """Every tensor the reference `save_model` writes at stage 3, as nn.Parameters in fp16."""
    torch.manual_seed(seed)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    proj = nn.Linear(sizes.imagebind_dim, sizes.hidden)
    state["llama_proj.weight"], state["llama_proj.bias"] = proj.weight, proj.bias
    prefix = "llama_model.base_model.model."
    for i in range(sizes.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"{prefix}model.layers.{i}.self_attn.{name}"
            a = torch.randn(sizes.rank, sizes.hidden) * 0.05
            b = torch.randn(sizes.hidden, sizes.rank) * 0.05  # trained: no longer zero
            state[f"{key}.lora_A.default.weight"] = nn.Parameter(a)
            state[f"{key}.lora_B.default.weight"] = nn.Parameter(b)
    rows = sizes.base_vocab + len(reference_added_tokens())
    state[f"{prefix}model.embed_tokens.weight"] = nn.Parameter(torch.randn(rows, sizes.hidden))
    state[f"{prefix}lm_head.weight"] = nn.Parameter(torch.randn(rows, sizes.hidden) * 0.1)
    names = {"image": "gen_text_hidden_fcs", "video": "gen_text_hidden_fcs_video"}
    names["audio"] = "gen_text_hidden_fcs_audio"
    for m, name in names.items():
        length, width = sizes.cond[m]
        layer = TextFcLayer(sizes.hidden, width, length, sizes.projector_hidden)
        for key, value in layer.named_parameters():
            state[f"{name}.0.{key}"] = value
    return OrderedDict((k, nn.Parameter(v.detach().half())) for k, v in state.items())


def write_delta(directory: Path, sizes: DeltaSizes, vicuna: Path, seed: int = 0) -> Path:
    """The HF release's files: pytorch_model.pt and the extended tokenizer (slow LlamaTokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(reference_delta(sizes, seed), directory / "pytorch_model.pt")
    added = {t: sizes.base_vocab + i for i, t in enumerate(reference_added_tokens())}
    (directory / "added_tokens.json").write_text(json.dumps(added))
    for name in ("tokenizer.model", "tokenizer_config.json", "config.json"):
        shutil.copy(vicuna / name, directory / name)
    return directory
