"""Streaming from sharded tar files in the webdataset layout, for data sets larger than a disk.

A shard is a plain tar; the files of one sample share a key (the name up to the first dot):
`000123.json` is the record, in any format `formats` reads, and its media paths name the sample's
other members (`000123.input_image.png`). Shards are split between processes and DataLoader
workers (shard i goes to reader `i % readers`), each reader cycles through its shards in a seeded
order per epoch, and the training loop stops at `max_steps`. `pack_shards` writes this layout
from a JSON data file.
"""

from __future__ import annotations

import io
import json
import logging
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from nextgpt.batch import OutputTarget
from nextgpt.config import MODALITIES
from nextgpt.conversation import EncodedConversation
from nextgpt.data.dataset import SampleEncoder
from nextgpt.data.formats import (
    DataError,
    Sample,
    _BadJSON,
    parse_record,
    path_keys,
    read_records,
)

logger = logging.getLogger(__name__)
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def is_shards(path: str) -> bool:
    return ".tar" in Path(path).name


def expand_shards(pattern: str) -> list[str]:
    """`data/train-{000..015}.tar` -> the 16 names (zero padding kept); a plain name -> itself."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    first, last = match.group(1), match.group(2)
    names = []
    for n in range(int(first), int(last) + 1):
        name = pattern[: match.start()] + str(n).zfill(len(first)) + pattern[match.end() :]
        names.extend(expand_shards(name))
    return names


def iter_shard(path: str | Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {member name: bytes}) per sample, in the order of the tar."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: shard not found")
    key, files = None, {}
    with tarfile.open(path, "r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = Path(member.name).name
            member_key = name.split(".", 1)[0]
            if member_key != key and files:
                yield key, files
                files = {}
            key = member_key
            files[name] = tar.extractfile(member).read()
    if files:
        yield key, files


class ShardStream(IterableDataset):
    """Endless stream of encoded samples from this reader's shards; bad records skipped or raised.

    `skip` samples (this process's share of what a resumed run already consumed) are read and
    dropped without loading their media, so a resume sees the same stream an unbroken run would.
    With `skip_bad` they are encoded too (slower): a record whose media fail to load was skipped,
    not consumed, so only samples that encode count.
    """

    def __init__(
        self,
        shards: list[str],
        encoder: SampleEncoder,
        batch_size: int,
        processes: int = 1,
        rank: int = 0,
        seed: int = 0,
        skip_batches: int = 0,
        skip_bad: bool = False,
    ) -> None:
        self.shards, self.encoder, self.batch_size = shards, encoder, batch_size
        self.processes, self.rank, self.seed = processes, rank, seed
        self.skip_batches, self.skip_bad = skip_batches, skip_bad
        self.skipped = 0

    def __iter__(self) -> Iterator[EncodedConversation]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        reader = self.rank * workers + worker
        readers = self.processes * workers
        mine = [s for i, s in enumerate(self.shards) if i % readers == reader]
        if not mine:
            raise DataError(
                f"{len(self.shards)} shard(s) for {readers} readers (processes x workers): "
                "give at least one shard per reader"
            )
        # the DataLoader takes whole batches from its workers in turn
        skip = sum(1 for b in range(self.skip_batches) if b % workers == worker) * self.batch_size
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            for index in torch.randperm(len(mine), generator=generator).tolist():
                for sample in self._parsed(mine[index]):
                    if skip and not self.skip_bad:
                        skip -= 1
                        continue
                    try:
                        encoded = self.encoder(sample)
                    except DataError as e:
                        if not self.skip_bad:
                            raise
                        self._skip(e)
                        continue
                    if skip:  # with skip_bad only a sample that encodes was ever consumed
                        skip -= 1
                        continue
                    yield encoded
            epoch += 1

    def _parsed(self, shard: str) -> Iterator[Sample]:
        """Each sample of a shard, parsed, its files on disk until the next one is asked for."""
        for key, files in iter_shard(shard):
            where = f"{shard}: sample {key}"
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    record_name = f"{key}.json"
                    if record_name not in files:
                        raise DataError(f"{where}: no {record_name}")
                    for name, payload in files.items():
                        Path(tmp, name).write_bytes(payload)
                    try:
                        record = json.loads(files[record_name])
                    except json.JSONDecodeError as e:
                        raise DataError(f"{where}: not valid JSON ({e.msg})") from e
                    sample = parse_record(record, Path(tmp), where)
                    _check_members(sample, Path(tmp), where)
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    self._skip(e)
                    continue
                yield sample

    def _skip(self, error: DataError) -> None:
        self.skipped += 1
        logger.warning("skipped a bad record (%d so far in this reader): %s", self.skipped, error)


def _check_members(sample: Sample, folder: Path, where: str) -> None:
    """A shard's record may name only its sample's own members: no absolute or `../` paths that
    would read files of the machine that trains."""
    folder = folder.resolve()
    for turn in sample.turns:
        for part in turn.parts:
            value = part.value
            paths = [value.media, value.embedding] if isinstance(value, OutputTarget) else [value]
            for path in paths:
                if isinstance(path, Path) and not path.resolve().is_relative_to(folder):
                    raise DataError(f"{where}: {path} is not a member of the sample")


def pack_shards(
    data: str | Path,
    out_dir: str | Path,
    root: str | Path | None = None,
    per_shard: int = 1000,
    prefix: str = "shard",
) -> list[Path]:
    """Write a JSON data file and its media as tar shards; returns the shard paths."""
    data = Path(data)
    root = Path(root) if root is not None else data.parent
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_records(data)
    shards = []
    for start in range(0, len(records), per_shard):
        path = out_dir / f"{prefix}-{start // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, record in enumerate(records[start : start + per_shard], start):
                key = f"{i:09d}"
                members: dict[str, bytes] = {}
                if isinstance(record, _BadJSON):  # a broken JSON line stays a bad record
                    members[f"{key}.json"] = record.line.encode()
                else:
                    record = _relink(record, key, root, members, f"{data}: record {i}")
                    members[f"{key}.json"] = json.dumps(record).encode()
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        shards.append(path)
    return shards


def _relink(record: Any, key: str, root: Path, members: dict[str, bytes], where: str) -> Any:
    """A copy of `record` whose file paths name tar members, collected into `members`."""
    if not isinstance(record, dict):
        return record

    def move(value: Any) -> Any:
        if isinstance(value, list):
            return [move(v) for v in value]
        if not isinstance(value, str):
            return value
        source = Path(value) if Path(value).is_absolute() else root / value
        if not source.is_file():
            raise DataError(f"{where}: file not found: {source}")
        name = f"{key}.{len(members)}{source.suffix}"
        members[name] = source.read_bytes()
        return name

    keys = {k for m in MODALITIES for k in path_keys(m)}
    out = {k: move(v) if k in keys else v for k, v in record.items()}
    for turns_key in ("conversation", "conversations"):
        if isinstance(out.get(turns_key), list):
            out[turns_key] = [
                {k: move(v) if k in keys else v for k, v in t.items()} if isinstance(t, dict) else t
                for t in out[turns_key]
            ]
    return out
