"""Sub-commands for training: `train`, `embed-captions`, `toy-data`, `pack-shards`, `merge-lora`.

    nextgpt toy-data data/toy                     # the toy data set the tiny configs use
    nextgpt train nextgpt/configs/train/tiny-stage1.yaml [--key value ...] [--resume]
    nextgpt embed-captions CONFIG.yaml            # precompute stage-2 caption embeddings
    nextgpt pack-shards data.json shards/ --per-shard 1000
    nextgpt merge-lora runs/stage3 exported/      # LoRA merged into the LLM, for export

Multi-GPU: `accelerate launch --config_file nextgpt/configs/accelerate/ddp.yaml -m nextgpt.cli
train CONFIG.yaml` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from nextgpt.cli import UsageError

if TYPE_CHECKING:  # the training stack pulls in torch: import it only when a command runs
    from nextgpt.training.config import DataConfig, DataSource, TrainConfig


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train one of NExT-GPT's three stages from a YAML config")
    t.add_argument("config", type=Path, help="training YAML (see nextgpt/configs/train/)")
    t.add_argument(
        "overrides",
        nargs=argparse.REMAINDER,
        help="--key value pairs overriding the YAML (dots for nested keys), and --resume",
    )
    t.set_defaults(handler=_train)

    e = sub.add_parser("embed-captions", help="precompute the decoders' caption embeddings")
    e.add_argument("config", type=Path, help="the training YAML whose data and model to use")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    e.add_argument("overrides", nargs=argparse.REMAINDER, help="--key value overrides")
    e.set_defaults(handler=_embed)

    d = sub.add_parser("toy-data", help="write the toy data set the tiny training configs use")
    d.add_argument("out", type=Path)
    d.add_argument("--copies", type=int, default=4, help="items per colour / tone")
    d.set_defaults(handler=_toy)

    p = sub.add_parser("pack-shards", help="pack a JSON data file and its media into tar shards")
    p.add_argument("data", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--root", type=Path, default=None, help="media root (default: data's folder)")
    p.add_argument("--per-shard", type=int, default=1000)
    p.set_defaults(handler=_pack)

    m = sub.add_parser("merge-lora", help="export a checkpoint with LoRA merged into the LLM")
    m.add_argument("checkpoint", help="a run or checkpoint directory")
    m.add_argument("out", type=Path)
    m.set_defaults(handler=_merge)


def _load_config(path: Path, overrides: list[str]) -> TrainConfig:
    from nextgpt.training.config import TrainConfig

    try:
        return TrainConfig.load(path, overrides)
    except (ValueError, FileNotFoundError, TypeError) as e:
        raise UsageError(str(e)) from e


def _train(args: argparse.Namespace) -> int:
    from nextgpt.data.formats import DataError
    from nextgpt.training.trainer import train

    config = _load_config(args.config, args.overrides)
    try:
        result = train(config)
    except (DataError, FileNotFoundError) as e:
        raise UsageError(str(e)) from e
    if result.history:
        print(f"final loss {result.history[-1]['loss']:.4f} at step {result.history[-1]['step']}")
    if result.evals:
        print(f"eval loss {result.evals[-1]['eval_loss']:.4f}")
    print(result.checkpoint)
    return 0


def _embed(args: argparse.Namespace) -> int:
    import torch

    from nextgpt.data.embeddings import CaptionEmbeddingStore, precompute
    from nextgpt.data.formats import DataError
    from nextgpt.model import NextGPT

    config = _load_config(args.config, args.overrides)
    if not config.data.caption_embeddings:
        raise UsageError("data.caption_embeddings: name the folder to write the embeddings to")
    try:
        captions = collect_captions(config.data.train + config.data.eval, config.data)
    except DataError as e:
        raise UsageError(str(e)) from e
    model = NextGPT.from_pretrained(config.model)
    unknown = sorted(set(captions) - set(model.decoders))
    if unknown:
        raise UsageError(f"the data has {unknown} outputs but the model has no such decoder")
    store = CaptionEmbeddingStore(config.data.caption_embeddings)
    done = precompute(
        store,
        model.decoders,
        captions,
        batch_size=args.batch_size,
        dtype=getattr(torch, args.dtype),
    )
    for modality, count in done.items():
        total = len(set(captions[modality]))
        print(f"{modality}: {count} new, {total} distinct captions in {store.directory}")
    return 0


def collect_captions(
    sources: tuple[DataSource, ...], data_config: DataConfig
) -> dict[str, list[str]]:
    """Every output caption of the data, per modality, in order of first appearance."""
    from nextgpt.data.formats import DataError, Sample, parse_record, read_samples
    from nextgpt.data.shards import expand_shards, is_shards, iter_shard

    out: dict[str, dict[str, None]] = {}

    def add(sample: Sample) -> None:
        for turn in sample.turns:
            for part in turn.parts:
                if turn.role == "assistant" and part.kind != "text" and part.value.caption:
                    out.setdefault(part.kind, {})[part.value.caption] = None

    for source in sources:
        if not is_shards(source.path):
            for sample in read_samples(
                source.path, source.root, data_config.skip_bad_records
            ).samples:
                add(sample)
            continue
        for shard in expand_shards(source.path):
            for key, files in iter_shard(shard):
                if f"{key}.json" not in files:
                    continue
                where = f"{shard}: sample {key}"
                try:
                    try:
                        record = json.loads(files[f"{key}.json"])
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
                    add(parse_record(record, Path("."), where, check_files=False))
                except DataError:
                    if not data_config.skip_bad_records:
                        raise
    return {m: list(c) for m, c in out.items()}


def _toy(args: argparse.Namespace) -> int:
    from nextgpt.data.toy import write_toy_dataset

    for path in write_toy_dataset(args.out, copies=args.copies).values():
        print(path)
    return 0


def _pack(args: argparse.Namespace) -> int:
    from nextgpt.data.formats import DataError
    from nextgpt.data.shards import pack_shards

    try:
        shards = pack_shards(args.data, args.out, args.root, args.per_shard)
    except DataError as e:
        raise UsageError(str(e)) from e
    for shard in shards:
        print(shard)
    return 0


def _merge(args: argparse.Namespace) -> int:
    from nextgpt.training.checkpoint import merge_lora

    print(merge_lora(args.checkpoint, args.out))
    return 0
