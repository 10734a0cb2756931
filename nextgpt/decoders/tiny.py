"""Tiny random diffusion pipelines with the real pipelines' structure, built offline.

They stand in for SD-1.5, Zeroscope and AudioLDM in tests and in the miniature: the same diffusers
pipeline classes and component types, only small and randomly initialised (deterministically per
seed). The tokenizers are byte-level BPEs without merges, i.e. character-level, so every caption
tokenizes without a downloaded vocabulary; `TinyDecoderArch.text_words` adds merges (CLIP's, or
CLAP's RoBERTa ones for audio) that keep those words whole.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from diffusers import (
    AudioLDMPipeline,
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    ClapTextConfig,
    ClapTextModelWithProjection,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
)

from nextgpt.config import TinyDecoderArch


def _clip_byte_vocab() -> dict[str, int]:
    """CLIP's special tokens and the 256 byte symbols, each also in its word-final (`</w>`) form."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for s in sorted(ByteLevel.alphabet()):
            vocab[s + suffix] = len(vocab)
    return vocab


def clip_char_tokenizer(max_length: int) -> CLIPTokenizer:
    """CLIP tokenizer over the byte symbols alone (no merges): character-level."""
    return CLIPTokenizer(vocab=_clip_byte_vocab(), merges=[], model_max_length=max_length)


def clip_word_tokenizer(words: tuple[str, ...] | list[str], max_length: int) -> CLIPTokenizer:
    """`clip_char_tokenizer` plus BPE merges that rebuild each of `words` as one token, as real
    CLIP's merges do for common words; any other text still falls back to characters.

    The merges are learned on the words themselves (lower-cased, each once) by `_learned_merges`,
    so applying them in rank order, as CLIPTokenizer does, reproduces its segmentation.
    """
    clean = _clean_words(words)
    vocab = _clip_byte_vocab()
    merges = _learned_merges([[*w[:-1], w[-1] + "</w>"] for w in clean], vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def _learned_merges(words: list[list[str]], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges learned on `words` (each a list of its initial symbols, counted once), in rank
    order, until every word is one token; each merged token is added to `vocab`.

    Why not the `tokenizers` BpeTrainer: it breaks ties between equally frequent pairs in an
    order that changes from call to call (30 calls on the video words gave 4 vocabularies), so
    two builds could give a word a different id and its embedding row a different init. Here a
    tie goes to the pair whose symbols came first, initial symbols ranked plain before word-final
    (`</w>`) and then by text, merged tokens in the order they were made: the order the trainer
    itself took in most calls, so the shipped tokenizers are rebuilt exactly. Applying the merges
    in rank order (as CLIPTokenizer and RobertaTokenizer do) reproduces this segmentation.
    """
    seqs = [list(w) for w in words]
    initial = sorted({s for w in seqs for s in w}, key=lambda s: (s.endswith("</w>"), s))
    order = {s: i for i, s in enumerate(initial)}
    merges: list[tuple[str, str]] = []
    while True:
        counts: Counter[tuple[str, str]] = Counter()
        for w in seqs:
            counts.update(zip(w, w[1:]))
        if not counts:
            return merges
        top = max(counts.values())
        tied = [p for p, c in counts.items() if c == top]
        pair = min(tied, key=lambda p: (order[p[0]], order[p[1]]))
        merges.append(pair)
        joined = pair[0] + pair[1]
        order.setdefault(joined, len(order))
        vocab.setdefault(joined, len(vocab))
        for w in seqs:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == pair:
                    w[i : i + 2] = [joined]
                i += 1


def _clean_words(words: tuple[str, ...] | list[str]) -> list[str]:
    """`words` lower-cased, deduplicated and sorted; anything but one ASCII word is refused."""
    clean = sorted({w.lower() for w in words})
    bad = [w for w in clean if not w.isalpha() or not w.isascii()]
    if bad:
        raise ValueError(f"text_words must be ASCII letters only (one word each), got {bad}")
    return clean


def roberta_char_tokenizer(max_length: int) -> RobertaTokenizer:
    """RoBERTa (CLAP) tokenizer over the 256 byte symbols."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for s in sorted(ByteLevel.alphabet()):
        vocab[s] = len(vocab)
    vocab["<mask>"] = len(vocab)
    return RobertaTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def roberta_word_tokenizer(words: tuple[str, ...] | list[str], max_length: int) -> RobertaTokenizer:
    """`roberta_char_tokenizer` plus byte-level BPE merges that rebuild each of `words` as one
    token, both sentence-initial (`word`) and after a space (`Ġword`), as real CLAP's RoBERTa
    merges do for common words; any other text still falls back to characters.

    Why the audio decoder wants them: AudioLDM pools the caption into one CLAP vector, and a
    character-level encoder trained on the train combinations pools held-out ones far from the sum
    of their words (held-out pitch probed at 0.22 to 0.89 on that vector); with whole words every
    held-out attribute reads at 0.67 to 1.00 (`probes/clap_words.py`, docs/mini-design.md
    section 8).
    """
    clean = _clean_words(words)
    vocab = dict(roberta_char_tokenizer(max_length).get_vocab())
    space = "\u0120"  # byte-level BPE's symbol for a space (Ġ)
    merges = _learned_merges([list(w) for w in clean] + [[space, *w] for w in clean], vocab)
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_tiny_pipeline(modality: str, arch: TinyDecoderArch, seed: int = 0) -> DiffusionPipeline:
    """A random pipeline for `modality`; the same seed and arch give the same weights."""
    builders = {"image": _image, "video": _video, "audio": _audio}
    if modality not in builders:
        raise ValueError(f"unknown decoder modality {modality!r}; expected one of {list(builders)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[modality](arch)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _vae_scale(arch: TinyDecoderArch) -> int:
    return 2 ** (len(arch.vae_channels) - 1)


def _vae(arch: TinyDecoderArch, channels: int) -> AutoencoderKL:
    n = len(arch.vae_channels)
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=arch.vae_channels,
        layers_per_block=arch.layers_per_block,
        latent_channels=arch.latent_channels,
        sample_size=arch.sample_size,
        norm_num_groups=arch.norm_groups,
    )


def _scheduler(arch: TinyDecoderArch) -> DDIMScheduler:
    """SD's noise schedule (clip_sample off for latents), or its zero-terminal-SNR rescaling with
    the v-prediction and trailing timesteps that rescaling needs."""
    zero_snr = arch.zero_terminal_snr
    return DDIMScheduler(
        num_train_timesteps=arch.num_train_timesteps,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        rescale_betas_zero_snr=zero_snr,
        prediction_type="v_prediction" if zero_snr else "epsilon",
        timestep_spacing="trailing" if zero_snr else "leading",
    )


def tiny_tokenizer(modality: str, arch: TinyDecoderArch) -> CLIPTokenizer | RobertaTokenizer:
    """The tokenizer a tiny decoder of `modality` gets from `arch`: CLIP's for image and video,
    CLAP's RoBERTa one for audio, by characters or, where `arch.text_words` lists them, whole words.
    The text encoder's `text_vocab` must hold every token."""
    tokenizer: CLIPTokenizer | RobertaTokenizer
    if modality == "audio":
        if arch.text_words:
            tokenizer = roberta_word_tokenizer(arch.text_words, arch.text_max_length)
        else:
            tokenizer = roberta_char_tokenizer(arch.text_max_length)
    elif modality not in ("image", "video"):
        raise ValueError(f"unknown decoder modality {modality!r}; use image, video or audio")
    elif arch.text_words:
        tokenizer = clip_word_tokenizer(arch.text_words, arch.text_max_length)
    else:
        tokenizer = clip_char_tokenizer(arch.text_max_length)
    if arch.text_vocab < len(tokenizer):
        raise ValueError(f"text_vocab {arch.text_vocab} < tokenizer size {len(tokenizer)}")
    return tokenizer


def _clip_text(modality: str, arch: TinyDecoderArch) -> tuple[CLIPTextModel, CLIPTokenizer]:
    tokenizer = tiny_tokenizer(modality, arch)
    config = CLIPTextConfig(
        vocab_size=arch.text_vocab,
        hidden_size=arch.text_width,
        intermediate_size=4 * arch.text_width,
        num_hidden_layers=arch.text_layers,
        num_attention_heads=arch.text_heads,
        max_position_embeddings=arch.text_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval(), tokenizer


def _unet_kwargs(arch: TinyDecoderArch, dims: str) -> dict:
    """A cross-attention UNet's arguments; `dims` is "2D" (images) or "3D" (video)."""
    n = len(arch.block_channels)
    return dict(
        sample_size=arch.sample_size // _vae_scale(arch),
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=(f"CrossAttnDownBlock{dims}",) * (n - 1) + (f"DownBlock{dims}",),
        up_block_types=(f"UpBlock{dims}",) + (f"CrossAttnUpBlock{dims}",) * (n - 1),
        block_out_channels=arch.block_channels,
        layers_per_block=arch.layers_per_block,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.text_heads,
        norm_num_groups=arch.norm_groups,
    )


def _image(arch: TinyDecoderArch) -> StableDiffusionPipeline:
    unet = UNet2DConditionModel(**_unet_kwargs(arch, "2D"))
    text_encoder, tokenizer = _clip_text("image", arch)
    return StableDiffusionPipeline(
        vae=_vae(arch, 3),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(arch),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _video(arch: TinyDecoderArch) -> TextToVideoSDPipeline:
    unet = UNet3DConditionModel(**_unet_kwargs(arch, "3D"))
    text_encoder, tokenizer = _clip_text("video", arch)
    return TextToVideoSDPipeline(
        vae=_vae(arch, 3),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(arch),
    )


def _audio(arch: TinyDecoderArch) -> AudioLDMPipeline:
    """AudioLDM: a mel-spectrogram latent UNet conditioned through its class embedding."""
    n = len(arch.block_channels)
    hop = math.prod(arch.vocoder_upsample_rates)
    unet = UNet2DConditionModel(
        # default length: one second of mel frames, in latents
        sample_size=arch.sample_rate // hop // _vae_scale(arch),
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=arch.block_channels,
        layers_per_block=arch.layers_per_block,
        # AudioLDM passes no encoder states, so these attentions attend to the features themselves
        cross_attention_dim=arch.block_channels,
        attention_head_dim=arch.text_heads,
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=arch.projection_dim,
        class_embeddings_concat=True,
        norm_num_groups=arch.norm_groups,
    )
    tokenizer = tiny_tokenizer("audio", arch)
    text_encoder = ClapTextModelWithProjection(
        ClapTextConfig(
            vocab_size=arch.text_vocab,
            hidden_size=arch.text_width,
            intermediate_size=4 * arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads,
            max_position_embeddings=arch.text_max_length + 2,  # RoBERTa positions start at pad + 1
            projection_dim=arch.projection_dim,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    rates = tuple(arch.vocoder_upsample_rates)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=arch.mel_bins,
            sampling_rate=arch.sample_rate,
            upsample_initial_channel=arch.block_channels[0],
            upsample_rates=rates,
            upsample_kernel_sizes=tuple(2 * r for r in rates),
            resblock_kernel_sizes=(3,),
            resblock_dilation_sizes=((1, 3),),
            normalize_before=False,
            initializer_range=0.1,  # the default 0.01 makes a random vocoder output ~1e-7 silence
        )
    ).eval()
    return AudioLDMPipeline(
        vae=_vae(arch, 1),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_scheduler(arch),
        vocoder=vocoder,
    )
