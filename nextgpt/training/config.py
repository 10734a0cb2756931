"""`TrainConfig`: the fields of a training YAML file, which are also its `--key value` overrides.

Nested fields are addressed with dots (`--data.max_length 256`, `--lr_groups.lora 2e-4`), list
items with their index (`--data.train.0.path x.json`); every value is read as YAML, so
`--losses [text,align,diffusion]` and `--data.train '[{path: a.json}]'` work too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nextgpt.config import LoraSettings, _from_plain, _to_plain  # the project's YAML <-> dataclass
from nextgpt.model import LOSS_TERMS
from nextgpt.training.stages import PARAMETER_GROUPS, STAGES

PRECISIONS = ("auto", "no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


@dataclass
class DataSource:
    """A JSON / JSON Lines file, or tar shards (`train-{000..099}.tar`) to stream."""

    path: str
    root: str | None = None  # media paths are relative to it; default: the file's folder


@dataclass
class DataConfig:
    train: tuple[DataSource, ...] = ()
    eval: tuple[DataSource, ...] = ()
    # without `eval` sources, hold out this fraction of the training records for evaluation
    eval_fraction: float = 0.0
    skip_bad_records: bool = False  # count and skip bad records instead of stopping
    caption_embeddings: str | None = None  # folder written by `nextgpt embed-captions`
    max_length: int = 512  # tokens; longer conversations are cut between media and signal groups
    num_workers: int = 0  # DataLoader worker processes per training process
    shuffle: bool = True


@dataclass
class TrainConfig:
    stage: int = 1
    # preset name, model directory (a previous stage's run or checkpoint), or a model YAML file
    model: str = "tiny"
    out_dir: str = "runs/train"
    data: DataConfig = field(default_factory=DataConfig)
    losses: tuple[str, ...] | None = None  # None: the stage's own; add "diffusion" to use it
    lora: LoraSettings = field(default_factory=LoraSettings)  # stage 3, when the model has none
    # optimisation (AdamW); `lr_groups` overrides `lr` per parameter group (see stages.py)
    lr: float = 1e-4
    lr_groups: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0  # never applied to biases, norms or the signal rows
    betas: tuple[float, ...] = (0.9, 0.999)
    schedule: str = "cosine"  # cosine decay to 0 after linear warm-up, or constant after warm-up
    warmup_ratio: float = 0.03
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many optimizer steps (needed when streaming)
    batch_size: int = 4  # per process and micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0: no clipping
    precision: str = "auto"  # auto: bf16 on GPUs that have it, else fp16 on GPU, else fp32
    gradient_checkpointing: bool = False
    seed: int = 0
    # bookkeeping, in optimizer steps (0: never, or only at the end for saving and evaluation)
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True
    resume: bool = False  # continue from `out_dir`'s latest checkpoint

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage: {self.stage!r} is not one of {sorted(STAGES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: {self.precision!r} is not one of {PRECISIONS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: {self.schedule!r} is not one of {SCHEDULES}")
        unknown = sorted(set(self.losses or ()) - set(LOSS_TERMS))
        if unknown:
            raise ValueError(f"losses: unknown {unknown}; use {LOSS_TERMS}")
        unknown = sorted(set(self.lr_groups) - set(PARAMETER_GROUPS))
        if unknown:
            raise ValueError(f"lr_groups: unknown {unknown}; use {PARAMETER_GROUPS}")
        if self.max_steps <= 0 and self.epochs < 1:
            raise ValueError("give epochs >= 1 or max_steps > 0")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")

    # ---- YAML and overrides ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "train config") -> TrainConfig:
        return _from_plain(cls, data, where)

    @classmethod
    def load(cls, path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
        """Read a YAML file, then apply `--key value` overrides in order."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"train config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of train config fields")
        return cls.from_dict(apply_overrides(data, overrides or []), str(path))


def apply_overrides(data: dict[str, Any], args: list[str]) -> dict[str, Any]:
    """`["--a.b", "1", "--flag", ...]` onto nested `data`; a key with no value is `true`."""
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ValueError(f"expected --key value, got {arg!r}")
        key, sep, inline = arg[2:].partition("=")
        if sep:
            value, i = inline, i + 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            value, i = args[i + 1], i + 2
        else:
            value, i = "true", i + 1
        _set(data, key.replace("-", "_").split("."), yaml.safe_load(value), key)
    return data


def _set(node: Any, path: list[str], value: Any, key: str) -> None:
    for depth, name in enumerate(path):
        last = depth == len(path) - 1
        if isinstance(node, list):
            if not name.isdigit() or int(name) >= len(node):
                raise ValueError(f"--{key}: {name!r} is not an index of a {len(node)}-item list")
            if last:
                node[int(name)] = value
            else:
                node = node[int(name)]
        elif isinstance(node, dict):
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
                if node is None:
                    raise ValueError(f"--{key}: cannot set a field inside a null value")
        else:
            raise ValueError(f"--{key}: {name!r} is inside a plain value")
