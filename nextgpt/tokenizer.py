"""Tokenizers trained locally, for LLMs that are built here rather than downloaded.

A byte-level BPE can encode any text a user types, so a tiny model never meets an unknown character.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

# A small English corpus so the tiny tokenizer has ordinary word pieces; the miniature world trains
# its own tokenizer on its own captions and dialogues.
TINY_CORPUS = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: Describe this picture. ASSISTANT: A red circle on a blue background.",
    "USER: Make an image of a green square. ASSISTANT: Sure! Here is a green square.",
    "USER: What do you hear? ASSISTANT: A low tone that repeats slowly.",
    "USER: Show me a video of a yellow triangle moving left. ASSISTANT: Here it is.",
    "draw a picture make a sound and a video of it then tell me what you see",
    "the quick brown fox jumps over the lazy dog while a bird sings in the tree",
    "small large bright dark left right up down red green blue yellow purple white black",
)


def train_bpe_tokenizer(
    corpus: Iterable[str] = TINY_CORPUS, vocab_size: int = 512, repeats: int = 4
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with `<unk> <s> </s> <pad>` and wrap it for transformers."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = list(corpus)
    tok.train_from_iterator(texts * repeats, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_input_names=["input_ids", "attention_mask"],
    )
