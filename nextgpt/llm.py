"""The language model: any Hugging Face causal LM plus NExT-GPT's signal tokens.

Nothing here is LLaMA-specific: the model is loaded through the Auto classes and used only through
`get_input_embeddings`, `forward(inputs_embeds=...)` and its KV cache.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from nextgpt.config import LLMConfig, LoraSettings, SignalTokenConfig
from nextgpt.signal_tokens import SignalTokens
from nextgpt.tokenizer import train_bpe_tokenizer
from nextgpt.weights import realign, torch_dtype


class LanguageModel(nn.Module):
    """A causal LM and its tokenizer, with signal tokens and media placeholders added."""

    def __init__(self, model: PreTrainedModel, tokenizer, signal: SignalTokens):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.signal = signal
        params = inspect.signature(self.base_model.forward).parameters
        # transformers 5 names the KV cache `cache`; older releases `past_key_values`
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        config: LLMConfig,
        signal_config: SignalTokenConfig,
        seed: int = 0,
        path: str | None = None,
    ) -> LanguageModel:
        """Load `path or config.pretrained` (dir or hub id), or build a random tiny LLaMA."""
        source = path or config.pretrained
        dtype = torch_dtype(config.dtype)
        if source is None:
            tokenizer = train_bpe_tokenizer(vocab_size=config.vocab_size)
            model = random_llama(tokenizer, config, seed).to(dtype)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source)
            kwargs: dict = {"dtype": dtype}
            if config.device_map is not None:
                kwargs["device_map"] = config.device_map
            if config.quantization is not None:
                kwargs["quantization_config"] = quantization_config(config.quantization)
            model = realign(AutoModelForCausalLM.from_pretrained(source, **kwargs))
            if config.base_rows is not None:
                load_base_rows(model, config.base_rows)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
        add_signal_tokens(model, tokenizer, signal_config)
        model.eval()
        llm = cls(model, tokenizer, SignalTokens.bind(signal_config, tokenizer))
        if config.lora is not None:
            llm.apply_lora(config.lora)
        return llm

    def apply_lora(self, settings: LoraSettings) -> None:
        """Wrap the LLM in peft LoRA adapters (lm_head and embeddings are never LoRA targets)."""
        from peft import LoraConfig, get_peft_model

        target = settings.target_modules
        lora = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=target if isinstance(target, str) else list(target),
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(self.model, lora)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the LLM's activations in backward (non-reentrant: fine with frozen weights)."""
        self.base_model.gradient_checkpointing_enable({"use_reentrant": False})

    @property
    def has_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def base_model(self) -> PreTrainedModel:
        """The transformers model under any peft wrapper."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def save_base(self, directory: str | Path) -> None:
        """Save the base model (signal rows included, LoRA left out) and the tokenizer."""
        directory = Path(directory)
        if self.has_lora:
            import copy

            copy.deepcopy(self.model).unload().save_pretrained(directory)
        else:
            self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    def save_merged(self, directory: str | Path) -> None:
        """Export a plain transformers model with LoRA merged in (for serving elsewhere)."""
        directory = Path(directory)
        if self.has_lora:
            import copy

            copy.deepcopy(self.model).merge_and_unload().save_pretrained(directory)
        else:
            self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @property
    def special_ids(self) -> list[int]:
        """Ids of every signal token and placeholder: the rows NExT-GPT trains."""
        return special_token_ids(self.signal)

    def adapted_state_dict(self) -> dict[str, torch.Tensor]:
        """What NExT-GPT changes in the LLM: signal-token rows (embedding, lm_head) and LoRA."""
        ids = torch.tensor(self.special_ids)
        base = self.base_model
        state = {"signal_embed": base.get_input_embeddings().weight[ids]}
        head = base.get_output_embeddings()
        if (
            head is not None
            and head.weight.data_ptr() != base.get_input_embeddings().weight.data_ptr()
        ):
            state["signal_lm_head"] = head.weight[ids]
        if self.has_lora:
            from peft import get_peft_model_state_dict

            # the signal rows above are all NExT-GPT changes in the embeddings: without this,
            # peft saves both full matrices (1 GB at 7B) because the vocabulary was resized
            lora = get_peft_model_state_dict(self.model, save_embedding_layers=False)
            state.update({f"lora.{k}": v for k, v in lora.items()})
        return state

    def load_adapted_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        ids = torch.tensor(self.special_ids)
        base = self.base_model
        with torch.no_grad():
            emb = base.get_input_embeddings().weight
            emb[ids] = state["signal_embed"].to(emb.dtype)
            if "signal_lm_head" in state:
                head = base.get_output_embeddings().weight
                head[ids] = state["signal_lm_head"].to(head.dtype)
        lora = {k[5:]: v for k, v in state.items() if k.startswith("lora.")}
        if lora:
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, lora)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise ValueError(f"unexpected LoRA keys {unexpected[:5]}")

    # ---- use -----------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.base_model.config.hidden_size

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_model.get_input_embeddings()(input_ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache=None,
        output_hidden_states: bool = False,
    ):
        """One forward pass; returns (logits, last hidden states or None, cache)."""
        kwargs = {self._cache_arg: cache} if cache is not None else {}
        out = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            use_cache=cache is not None,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden = out.hidden_states[-1] if output_hidden_states else None
        new_cache = getattr(out, self._cache_arg, None) if cache is not None else None
        return out.logits, hidden, new_cache

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.base_model.config)

    def tokenize(self, text: str) -> list[int]:
        """Tokenize user or model text; special-token strings in it stay plain text."""
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def add_signal_tokens(model: PreTrainedModel, tokenizer, config: SignalTokenConfig) -> int:
    """Add missing signal tokens and placeholders; new embedding and lm_head rows start at the mean.

    Returns the number of tokens added (0 when loading a model that already has them).
    """
    added = register_signal_tokens(tokenizer, config)
    old = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > old:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            emb = model.get_input_embeddings().weight
            emb[old:] = emb[:old].mean(0, keepdim=True)
            head = model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != emb.data_ptr():
                head.weight[old:] = head.weight[:old].mean(0, keepdim=True)
                if getattr(head, "bias", None) is not None:
                    head.bias[old:] = head.bias[:old].mean()
    return added


def register_signal_tokens(tokenizer, config: SignalTokenConfig) -> int:
    """Add the signal tokens and placeholders `tokenizer` lacks; returns how many were added."""
    vocab = tokenizer.get_vocab()
    missing = [n for n in SignalTokens.names(config) if n not in vocab]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return len(missing)


def special_token_ids(signal: SignalTokens) -> list[int]:
    """The order of the rows in `signal_embed` / `signal_lm_head`: ascending token id."""
    return sorted(signal.all_signal_ids | set(signal.placeholder_ids.values()))


def load_base_rows(model: PreTrainedModel, path: str | Path) -> None:
    """Replace the pretrained embedding and lm_head rows with those saved in `path`.

    The file holds `embed_tokens` (and `lm_head` unless the model ties them), one row per token of
    the base vocabulary, as `nextgpt convert` writes them from the released NExT-GPT checkpoint.
    """
    rows = load_file(str(path))
    emb = model.get_input_embeddings().weight
    targets = {"embed_tokens": emb}
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        targets["lm_head"] = head.weight
    if set(rows) != set(targets):
        raise ValueError(f"{path}: expected tensors {sorted(targets)}, found {sorted(rows)}")
    with torch.no_grad():
        for name, weight in targets.items():
            if rows[name].shape != weight.shape:
                raise ValueError(
                    f"{path}: {name} rows {tuple(rows[name].shape)} do not match the model's "
                    f"{tuple(weight.shape)}: they were made for another base LLM"
                )
            weight.copy_(rows[name].to(weight.device, weight.dtype))


QUANTIZATIONS = ("8bit", "4bit")


def quantization_config(kind: str):
    """bitsandbytes 8-bit / 4-bit loading; needs a CUDA GPU and the bitsandbytes package.

    Linear layers are quantized (lm_head and embeddings stay in `dtype`); 4-bit is NF4 with bf16
    compute. The weights land on the GPU as they load.
    """
    if kind not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {kind!r}; use '8bit' or '4bit'")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{kind} loading needs a CUDA GPU (bitsandbytes) and none is available here; "
            "set llm.quantization to null (and llm.dtype to bfloat16 to halve memory)"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError(f"{kind} loading needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if kind == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )


def random_llama(
    tokenizer: PreTrainedTokenizerBase, config: LLMConfig, seed: int
) -> LlamaForCausalLM:
    """A randomly initialised LLaMA with `config`'s architecture, sized to `tokenizer` (the tiny
    preset's LLM, and nextgpt-mini's before its pretraining)."""
    torch.manual_seed(seed)
    llama = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_position,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(llama)
