"""Helpers shared by every loader of weights."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype a config names; `what` says which field, for the error."""
    if name not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def realign(module: torch.nn.Module) -> torch.nn.Module:
    """Copy parameters and buffers that a memory-mapped load left at unaligned addresses.

    CPU matmul kernels take a different path on unaligned data, so without this a part loaded from
    safetensors differs from the one that was saved in the last bits of its outputs.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
    return module
