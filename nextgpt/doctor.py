"""`nextgpt doctor`: for each component, where it was looked for, what is there, what is missing,
how to fetch it; then the memory each part needs and what fits a given GPU.

Nothing is downloaded and no weights are loaded: files are listed, configs and checkpoint headers
read, and sizes come from `nextgpt.memory`. Exit code 0 when every component is complete, 1 when
something is missing.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nextgpt.config import IMAGEBIND_ENV, MODALITIES, NextGPTConfig
from nextgpt.sources import Location, files_under, locate

IMAGEBIND_URL = "https://dl.fbaipublicfiles.com/imagebind/imagebind_huge.pth"
LLM_WEIGHTS = ("model*.safetensors", "pytorch_model*.bin")
LLM_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json")
MODEL_WEIGHTS = (
    "diffusion_pytorch_model*.safetensors",
    "diffusion_pytorch_model*.bin",
    "model*.safetensors",
    "pytorch_model*.bin",
)
VICUNA_V0_HELP = (
    "Vicuna-7B v0 is published as a delta on LLaMA-7B: get LLaMA-7B in transformers' layout, "
    "then `pip install fschat` and `python -m fastchat.model.apply_delta --base-model-path "
    "LLAMA_7B_DIR --target-model-path {path} --delta-path lmsys/vicuna-7b-delta-v0`"
)


@dataclass
class Check:
    """What was found for one component."""

    component: str
    source: str
    looked_in: str
    found: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    fetch: str | None = None

    @property
    def ok(self) -> bool:
        return not self.missing


def _size(paths: list[Path]) -> str:
    total = sum(p.stat().st_size for p in paths)
    return f"{total / 2**30:.2f} GiB" if total >= 2**27 else f"{total / 2**20:.1f} MiB"


def _hub_fetch(where: Location, what: str) -> str | None:
    if where.kind == "hub":
        return f"{what} (with network access; HF_HUB_OFFLINE unset)"
    return None


# ---- encoder -----------------------------------------------------------------------------------
def check_encoder(config: NextGPTConfig) -> Check:
    """The ImageBind file, and whether its tensors load strictly into the configured encoder."""
    from nextgpt.encoders.imagebind import (
        _GROUPS,
        EXTRA_TRUNKS,
        ImageBindEncoder,
        _check_state_dict,
        _read_state_dict,
    )

    cfg = config.encoder
    if cfg.pretrained is None:
        return Check("encoder", "random", "-", found=["random weights, built here"])
    path = Path(cfg.pretrained).expanduser()
    check = Check("encoder", cfg.pretrained, str(path))
    if not path.is_file():
        check.missing.append("ImageBind-huge weights (official imagebind_huge.pth, 4.5 GB)")
        check.fetch = (
            f"mkdir -p {path.parent} && curl -L -o {path} {IMAGEBIND_URL}  "
            f"(or set ${IMAGEBIND_ENV} / encoder.pretrained to where it is)"
        )
        return check
    state = _read_state_dict(path)
    if not cfg.all_modalities:
        skipped = tuple(f"{group}.{m}." for group in _GROUPS for m in EXTRA_TRUNKS)
        state = {k: v for k, v in state.items() if not k.startswith(skipped)}
    with torch.device("meta"):
        model = ImageBindEncoder(cfg)
    try:
        _check_state_dict(model, state, path)
    except ValueError as e:
        check.missing.append(f"weights that fit the configured encoder: {e}")
        return check
    check.found.append(f"{path.name}: {_size([path])}, {len(state)} tensors, loads strictly")
    return check


# ---- LLM ---------------------------------------------------------------------------------------
def check_llm(config: NextGPTConfig) -> Check:
    """Config, weight shards (all those the index names) and tokenizer of the causal LM."""
    cfg = config.llm
    if cfg.pretrained is None:
        return Check("llm", "random", "-", found=["random tiny LLaMA, built here"])
    where = locate(cfg.pretrained)
    check = Check("llm", cfg.pretrained, where.looked_in)
    if where.path is None:
        check.missing.append("the model (config.json, weights, tokenizer)")
    else:
        _check_llm_files(where.path, check)
    if not check.ok:
        check.fetch = _hub_fetch(where, f"hf download {cfg.pretrained}") or (
            VICUNA_V0_HELP.format(path=cfg.pretrained)
            if "v0" in cfg.pretrained.lower()
            else f"put a transformers save_pretrained directory at {cfg.pretrained}"
        )
    if cfg.quantization is not None:
        import importlib.util

        if not torch.cuda.is_available():
            check.missing.append(f"a CUDA GPU for {cfg.quantization} loading")
        elif importlib.util.find_spec("bitsandbytes") is None:
            check.missing.append(f"bitsandbytes for {cfg.quantization} loading")
            check.fetch = "pip install bitsandbytes"
    if cfg.base_rows is not None:
        rows = Path(cfg.base_rows)
        if rows.is_file():
            check.found.append(f"{rows.name}: the checkpoint's embedding rows, {_size([rows])}")
        else:
            check.missing.append(f"{rows} (the checkpoint's embedding rows): run nextgpt convert")
    return check


def _check_llm_files(root: Path, check: Check) -> None:
    config = root / "config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        check.found.append(
            f"config.json: {data.get('model_type')}, {data.get('num_hidden_layers')} layers, "
            f"width {data.get('hidden_size')}"
        )
    else:
        check.missing.append("config.json")
    weights = files_under(root, LLM_WEIGHTS)
    needed: set[str] = set()
    for index in files_under(root, ("*.index.json",)):
        needed |= set(json.loads(index.read_text())["weight_map"].values())
    absent = sorted(needed - {p.name for p in weights})
    if weights:
        check.found.append(f"{len(weights)} weight file(s), {_size(weights)}")
    if absent or not weights:
        check.missing.append(f"weights: {', '.join(absent) or 'none found'}")
    tokenizer = files_under(root, LLM_TOKENIZER)
    if tokenizer:
        check.found.append(f"tokenizer: {', '.join(p.name for p in tokenizer)}")
    else:
        check.missing.append("tokenizer (tokenizer.json or tokenizer.model)")


# ---- decoders ----------------------------------------------------------------------------------
def check_decoder(config: NextGPTConfig, modality: str) -> Check:
    """model_index.json, every component it names, and the conditioning shape."""
    from nextgpt.decoders import build_decoder

    cfg = config.decoders[modality]
    if cfg.pretrained is None:
        return Check(modality, "random", "-", found=["random tiny pipeline, built here"])
    where = locate(cfg.pretrained)
    check = Check(modality, cfg.pretrained, where.looked_in)
    index = where.path / "model_index.json" if where.path is not None else None
    if index is None or not index.is_file():
        check.missing.append("the pipeline (model_index.json and its components)")
    else:
        _check_pipeline_files(where.path, check)
    if check.ok:
        try:
            length, width = build_decoder(copy.deepcopy(cfg)).conditioning_shape()
            check.found.append(f"conditions on {length}x{width}")
        except ValueError as e:
            check.missing.append(str(e))
    else:
        check.fetch = _hub_fetch(
            where,
            'python -c "from diffusers import DiffusionPipeline; '
            f"DiffusionPipeline.download('{cfg.pretrained}')\"",
        ) or (f"save a diffusers pipeline at {cfg.pretrained} (save_pretrained)")
    if cfg.cpu_offload and not torch.cuda.is_available():
        check.missing.append("a CUDA GPU for cpu_offload")
    return check


def _check_pipeline_files(root: Path, check: Check) -> None:
    index = json.loads((root / "model_index.json").read_text())
    for name, spec in index.items():
        if not isinstance(spec, list) or None in spec:
            continue
        folder = root / name
        if not folder.is_dir():
            check.missing.append(f"{name}/")
            continue
        if (folder / "config.json").is_file():  # a model: it needs weights
            weights = files_under(folder, MODEL_WEIGHTS)
            if weights:
                check.found.append(f"{name}: {_size(weights)}")
            else:
                check.missing.append(f"{name} weights")
        elif not any(folder.iterdir()):
            check.missing.append(f"{name} files")


# ---- the whole model -----------------------------------------------------------------------------
def load_config(name_or_dir: str) -> tuple[NextGPTConfig, Path | None]:
    """A preset, or a model directory's config with its relative paths resolved as on loading."""
    from nextgpt.config import PRESETS
    from nextgpt.model import CONFIG_FILE, _resolve_paths

    if name_or_dir in PRESETS:
        return NextGPTConfig.from_name(name_or_dir), None
    directory = Path(name_or_dir)
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{name_or_dir}: not a preset ({', '.join(PRESETS)}) nor a model directory"
        )
    return _resolve_paths(NextGPTConfig.from_yaml(directory / CONFIG_FILE), directory), directory


def diagnose(config: NextGPTConfig, directory: Path | None = None) -> list[Check]:
    """One check per component: encoder, LLM, each decoder, then the model's trained weights."""
    from nextgpt.model import TRAINABLE_FILE

    checks = [check_encoder(config), check_llm(config)]
    checks += [check_decoder(config, m) for m in MODALITIES if m in config.decoders]
    if directory is not None:
        trainable = directory / TRAINABLE_FILE
        check = Check("trained", TRAINABLE_FILE, str(directory))
        if trainable.is_file():
            check.found.append(f"{TRAINABLE_FILE}: {_size([trainable])}")
        else:
            check.missing.append(TRAINABLE_FILE)
        checks.append(check)
    return checks


def format_checks(checks: list[Check]) -> str:
    lines = []
    for c in checks:
        lines.append(f"[{'ok' if c.ok else 'MISSING'}] {c.component}: {c.source}")
        lines.append(f"    looked in: {c.looked_in}")
        lines += [f"    found: {f}" for f in c.found]
        lines += [f"    missing: {m}" for m in c.missing]
        if c.fetch and not c.ok:
            lines.append(f"    fetch: {c.fetch}")
    return "\n".join(lines)


def run_doctor(model: str, gpu_memory: float | None = None) -> tuple[bool, str]:
    """(everything found, the report)."""
    from nextgpt import memory

    config, directory = load_config(model)
    checks = diagnose(config, directory)
    sizes = memory.estimate(config)
    report = [
        f"nextgpt doctor: {model} ({config.name})",
        format_checks(checks),
        "",
        "memory of the weights (parameters counted from configs, nothing loaded):",
        memory.format_table(sizes),
        "",
        "estimated peak GPU memory (weights + working memory; a guide, keep a margin):",
        memory.format_plans(memory.plans(config, sizes), gpu_memory),
    ]
    return all(c.ok for c in checks), "\n".join(report)


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "doctor",
        help="check the pretrained parts a model needs, and the memory it takes",
        description=__doc__,
    )
    d.add_argument("--model", default="nextgpt-7b", help="preset name or model directory")
    d.add_argument("--gpu-memory", type=float, default=None, help="GPU size in GB: what fits")
    d.set_defaults(handler=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    from nextgpt.cli import UsageError

    try:
        ok, report = run_doctor(args.model, args.gpu_memory)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from e
    print(report)
    return 0 if ok else 1
