"""Precomputed caption embeddings: each decoder's own text-encoder output for every caption, once.

Stage 2 aligns the output projection with the decoder's text embedding of the caption. Computing
it every step runs the decoders' text encoders (CLIP, CLAP) on every batch; computing it once and
reading it back is what NExT-GPT does. The store is a folder of safetensors shards,
`<modality>-<n>.safetensors`, each a map from `caption_key(caption)` to an (L, D) tensor, with the
decoder and the shape in its metadata. Shards are only ever added, each written atomically, so an
interrupted precompute keeps what it finished and a rerun computes only what is missing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nextgpt.data.formats import DataError


def caption_key(caption: str) -> str:
    """The key of a caption in the store: a hash, so any text is a valid, fixed-length key."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


class CaptionEmbeddingStore:
    """Read and extend a folder of caption-embedding shards."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._index: dict[str, dict[str, Path]] | None = None
        self._meta: dict[str, dict[str, str]] = {}

    def _shards(self, modality: str) -> list[Path]:
        return sorted(self.directory.glob(f"{modality}-*.safetensors"))

    @property
    def index(self) -> dict[str, dict[str, Path]]:
        """modality -> caption key -> shard file (headers only are read)."""
        if self._index is None:
            index: dict[str, dict[str, Path]] = {}
            for shard in sorted(self.directory.glob("*-*.safetensors")):
                modality = shard.name.split("-", 1)[0]
                with safe_open(shard, "pt") as f:
                    self._meta.setdefault(modality, f.metadata() or {})
                    for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                        index.setdefault(modality, {})[key] = shard
            self._index = index
        return self._index

    def metadata(self, modality: str) -> dict[str, str]:
        """The decoder and shape the embeddings of `modality` were computed with."""
        self.index  # noqa: B018 (reads the headers)
        return self._meta.get(modality, {})

    def get(self, modality: str, caption: str) -> torch.Tensor | None:
        shard = self.index.get(modality, {}).get(caption_key(caption))
        if shard is None:
            return None
        with safe_open(shard, "pt") as f:
            return f.get_tensor(caption_key(caption)).float()

    def missing(self, modality: str, captions: Iterable[str]) -> list[str]:
        """Distinct captions without an embedding, in first-seen order."""
        have = self.index.get(modality, {})
        out = dict.fromkeys(c for c in captions if caption_key(c) not in have)
        return list(out)

    def add(self, modality: str, embeddings: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
        """Write one new shard atomically; `embeddings` maps captions to (L, D) tensors."""
        self.directory.mkdir(parents=True, exist_ok=True)
        number = len(self._shards(modality))
        path = self.directory / f"{modality}-{number:05d}.safetensors"
        state = {caption_key(c): e.contiguous() for c, e in embeddings.items()}
        tmp = path.with_name(path.name + ".tmp")
        save_file(state, tmp, metadata={"modality": modality, **meta})
        os.replace(tmp, path)
        self._index = None
        return path

    def check(self, modality: str, shape: tuple[int, int]) -> None:
        """Fail when stored embeddings do not fit the decoder the model uses."""
        stored = self.metadata(modality).get("shape")
        if stored is not None and stored != f"{shape[0]}x{shape[1]}":
            raise DataError(
                f"{self.directory}: {modality} caption embeddings are {stored} but the model's "
                f"{modality} decoder takes {shape[0]}x{shape[1]}; recompute them for this decoder"
            )


def precompute(
    store: CaptionEmbeddingStore,
    decoders: dict,
    captions: dict[str, list[str]],
    batch_size: int = 64,
    shard_size: int = 4096,
    dtype: torch.dtype = torch.float32,
    progress=None,
) -> dict[str, int]:
    """Embed every caption the store lacks with its modality's decoder; returns counts computed."""
    done: dict[str, int] = {}
    for modality, texts in captions.items():
        decoder = decoders[modality]
        shape = decoder.conditioning_shape()
        store.check(modality, shape)
        todo = store.missing(modality, texts)
        meta = {"decoder": decoder.source, "shape": f"{shape[0]}x{shape[1]}"}
        for start in range(0, len(todo), shard_size):
            chunk = todo[start : start + shard_size]
            shard: dict[str, torch.Tensor] = {}
            for b in range(0, len(chunk), batch_size):
                batch = chunk[b : b + batch_size]
                for caption, emb in zip(batch, decoder.encode_text(batch)):
                    shard[caption] = emb.to(dtype)
                if progress is not None:
                    progress(len(batch))
            store.add(modality, shard, meta)
        done[modality] = len(todo)
    return done


def load_embedding_file(path: Path) -> torch.Tensor:
    """A record's own caption embedding file: `.npy` (no pickles) or a one-tensor safetensors."""
    if path.suffix not in (".npy", ".safetensors"):
        raise DataError(f"{path}: caption embeddings must be .npy or .safetensors")
    try:  # a broken file is a bad record (named, skippable), not a crash
        if path.suffix == ".npy":
            tensor = torch.from_numpy(np.load(path, allow_pickle=False)).float()
        else:
            with safe_open(path, "pt") as f:
                keys = list(f.keys())
                tensor = f.get_tensor(keys[0]).float() if len(keys) == 1 else None
    except (OSError, ValueError, TypeError, SafetensorError) as e:
        raise DataError(f"{path}: cannot read caption embeddings ({e})") from e
    if tensor is None:
        raise DataError(f"{path}: expected one tensor, found {len(keys)}")
    # the reference code stores (1, L, D) for SD and (D,) for AudioLDM: make both (L, D)
    if tensor.dim() == 3 and tensor.shape[0] == 1:
        tensor = tensor[0]
    return tensor if tensor.dim() == 2 else tensor.reshape(1, -1)
