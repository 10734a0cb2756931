"""Training checkpoints: trainable weights, configs and trainer state, written atomically.

A run directory holds:
- `base/`: the starting model in `NextGPT.save_pretrained` layout, written once. Parts built in
  memory (the tiny preset's random encoder, LLM and decoders) are saved there; parts that came
  from a path or hub id are only referenced.
- `checkpoint-<step>/`: `config.yaml` (the model, frozen parts referenced relative to it),
  `trainable.safetensors` (only what trains), `train_config.yaml`, `trainer_state.json`,
  `optimizer.safetensors` + `optimizer.json`, `scheduler.json` and `rng-<rank>.safetensors`.
  Under DeepSpeed or FSDP, whose optimizer state is sharded, accelerate's own `save_state` writes
  it into `accelerate/` instead.
- `latest`: the name of the newest complete checkpoint.
A checkpoint is written into a temporary folder and renamed into place, and `latest` is replaced
last, so a crash mid-write leaves the previous checkpoint as the latest one. Every checkpoint (and
the run directory itself, through `latest`) loads with `NextGPT.from_pretrained`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nextgpt.config import NextGPTConfig
from nextgpt.model import CONFIG_FILE, LATEST_FILE, TRAINABLE_FILE, NextGPT

BASE_DIR = "base"
STATE_FILE = "trainer_state.json"
TRAIN_CONFIG_FILE = "train_config.yaml"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
ACCELERATE_DIR = "accelerate"
PREFIX = "checkpoint-"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    previous = path.with_name(f".{path.name}.old")
    if not path.is_dir() and previous.is_dir():
        # a crash while a resumed run re-saved this step, between moving the old copy aside and
        # moving the new one in: the old copy is complete, so it is the checkpoint
        os.replace(previous, path)
    return path if path.is_dir() else None


def write_base(model: NextGPT, run_dir: Path) -> NextGPTConfig:
    """Save the starting model once; returns its config with every local part path absolute."""
    base = run_dir / BASE_DIR
    if not (base / CONFIG_FILE).is_file():
        tmp = run_dir / f".{BASE_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(base, ignore_errors=True)
        os.replace(tmp, base)
    config = NextGPTConfig.from_yaml(base / CONFIG_FILE)
    config.llm.lora = model.config.llm.lora

    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        for candidate in (base / p, Path(p)):
            if candidate.exists():
                return str(candidate.resolve())
        return p  # a hub id

    config.encoder.pretrained = absolute(config.encoder.pretrained)
    config.llm.pretrained = absolute(config.llm.pretrained)
    for d in config.decoders.values():
        d.pretrained = absolute(d.pretrained)
    return config


def _relative_config(config: NextGPTConfig, directory: Path, run_dir: Path) -> NextGPTConfig:
    """Part paths inside the run directory relative to `directory`, so the run can be moved."""
    config = copy.deepcopy(config)
    root = run_dir.resolve()

    def rel(p: str | None) -> str | None:
        if p is None or not Path(p).is_absolute() or not Path(p).is_relative_to(root):
            return p
        return os.path.relpath(p, directory.resolve())

    config.encoder.pretrained = rel(config.encoder.pretrained)
    config.llm.pretrained = rel(config.llm.pretrained)
    for d in config.decoders.values():
        d.pretrained = rel(d.pretrained)
    return config


def trainable_state(model: NextGPT, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`model.trainable_state_dict()` computed from a (gathered) full state dict of the model, so
    that the weights of a sharded model (ZeRO-3, FSDP) are read from what accelerate gathered."""
    own = model.trainable_state_dict()
    names = {id(p): n for n, p in model.named_parameters()}
    ids = torch.tensor(model.llm.special_ids)
    base = model.llm.base_model
    out = {}
    for key in own:
        if key.startswith(("input_projector.", "output_projectors.")):
            out[key] = full[key]
    out["llm.signal_embed"] = full[names[id(base.get_input_embeddings().weight)]][ids]
    if "llm.signal_lm_head" in own:
        out["llm.signal_lm_head"] = full[names[id(base.get_output_embeddings().weight)]][ids]
    if model.llm.has_lora:
        from peft import get_peft_model_state_dict

        sub = {k[len("llm.model.") :]: v for k, v in full.items() if k.startswith("llm.model.")}
        lora = get_peft_model_state_dict(
            model.llm.model, state_dict=sub, save_embedding_layers=False
        )
        out.update({f"llm.lora.{k}": v for k, v in lora.items()})
    if out.keys() != own.keys():
        raise KeyError(
            f"trainable weights differ from the model's: {sorted(out.keys() ^ own.keys())[:5]}"
        )
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in out.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    accelerator: Any,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    model_config: NextGPTConfig,
    train_config: Any,
    state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `checkpoint-<step>` atomically, point `latest` at it, prune old ones."""
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    full = accelerator.get_state_dict(model)  # every process takes part when weights are sharded
    sharded = _sharded(accelerator)
    if sharded:
        accelerator.save_state(str(tmp / ACCELERATE_DIR), safe_serialization=True)
    _write_rng(tmp / f"rng-{accelerator.process_index}.safetensors")
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file(trainable_state(unwrapped, full), tmp / TRAINABLE_FILE)
        _relative_config(model_config, final, run_dir).to_yaml(tmp / CONFIG_FILE)
        train_config.to_yaml(tmp / TRAIN_CONFIG_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=1))
        (tmp / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        if not sharded:
            _write_optimizer(optimizer.state_dict(), tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replaced = final.with_name(f".{final.name}.old")  # a resumed run saving the same step
        if final.exists():
            os.replace(final, replaced)
        os.replace(tmp, final)
        pointer = run_dir / f".{LATEST_FILE}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, run_dir / LATEST_FILE)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in sorted(run_dir.glob(f"{PREFIX}*"))[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    directory: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this process's RNG; returns the trainer state."""
    accelerator.unwrap_model(model).load_trainable(load_file(directory / TRAINABLE_FILE))
    if (directory / ACCELERATE_DIR).is_dir():
        accelerator.load_state(str(directory / ACCELERATE_DIR))
    else:
        optimizer.load_state_dict(_read_optimizer(directory))
    scheduler.load_state_dict(json.loads((directory / SCHEDULER_FILE).read_text()))
    rng = directory / f"rng-{accelerator.process_index}.safetensors"
    if not rng.is_file():
        raise FileNotFoundError(
            f"{rng}: no RNG state for process {accelerator.process_index}; "
            "resume with as many processes as the run was started with"
        )
    _read_rng(rng)
    return json.loads((directory / STATE_FILE).read_text())


def _sharded(accelerator: Any) -> bool:
    return accelerator.distributed_type.value in ("DEEPSPEED", "FSDP")


def _write_optimizer(state: dict[str, Any], directory: Path) -> None:
    """Tensors to safetensors, the rest (param groups, scalar entries) to JSON."""
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, directory / OPTIMIZER_TENSORS)
    meta = {"param_groups": state["param_groups"], "scalars": scalars}
    (directory / OPTIMIZER_JSON).write_text(json.dumps(meta))


def _read_optimizer(directory: Path) -> dict[str, Any]:
    meta = json.loads((directory / OPTIMIZER_JSON).read_text())
    state: dict[int, dict[str, Any]] = {}
    entries = [*load_file(directory / OPTIMIZER_TENSORS).items(), *meta["scalars"].items()]
    for key, value in entries:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _write_rng(path: Path) -> None:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(states, path)


def _read_rng(path: Path) -> None:
    states = load_file(path)
    torch.set_rng_state(states["cpu"])
    cuda = cuda_rng_states(states)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def cuda_rng_states(states: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The saved per-GPU states in device order (a string sort would put cuda10 before cuda2)."""
    count = sum(k.startswith("cuda") for k in states)
    missing = [f"cuda{i}" for i in range(count) if f"cuda{i}" not in states]
    if missing:
        raise ValueError(f"RNG state file lacks {missing} among {count} GPU states")
    return [states[f"cuda{i}"] for i in range(count)]


def merge_lora(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Export a checkpoint with LoRA merged into the LLM's weights: a plain model directory."""
    model = NextGPT.from_pretrained(checkpoint)
    if model.llm.has_lora:
        model.llm.model = model.llm.model.merge_and_unload()
    model.config.llm.lora = None
    model.config.llm.pretrained = None  # the merged LLM is new: save it in full
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
