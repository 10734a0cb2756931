"""Where a pretrained component's files are: a local path, or a hub id in the Hugging Face cache.

Nothing here downloads: a hub id is looked up in the local cache only (as `HF_HUB_OFFLINE=1`
loading would), so `nextgpt doctor` and the memory estimate can say what is on disk before any
weights are fetched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Location:
    """`path` is the local file or directory holding the component, None when nothing was found."""

    source: str  # as configured: a path or a hub id
    kind: str  # "path" | "hub"
    looked_in: str  # the path itself, or the repo's folder in the HF cache
    path: Path | None


def is_hub_id(source: str) -> bool:
    """`org/name` that is not an existing local path."""
    return bool(_HUB_ID.fullmatch(source)) and not Path(source).expanduser().exists()


def locate(source: str) -> Location:
    """Find `source` on disk without touching the network."""
    if not is_hub_id(source):
        path = Path(source).expanduser()
        return Location(source, "path", str(path), path if path.exists() else None)
    folder = Path(constants.HF_HUB_CACHE) / f"models--{source.replace('/', '--')}"
    return Location(source, "hub", str(folder), _snapshot(folder))


def _snapshot(folder: Path) -> Path | None:
    """The cached snapshot of the main branch (else the newest one), complete or not."""
    ref = folder / "refs" / "main"
    if ref.is_file():
        snapshot = folder / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = [p for p in (folder / "snapshots").glob("*") if p.is_dir()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def files_under(root: Path, patterns: tuple[str, ...]) -> list[Path]:
    """Files under `root` matching any glob pattern, sorted, without duplicates."""
    found = {p for pattern in patterns for p in root.glob(pattern) if p.is_file()}
    return sorted(found)
