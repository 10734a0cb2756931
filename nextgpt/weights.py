"""Helpers shared by every loader of weights."""

from __future__ import annotations

import torch


def realign(module: torch.nn.Module) -> torch.nn.Module:
    """Copy parameters and buffers that a memory-mapped load left at unaligned addresses.

    CPU matmul kernels take a different path on unaligned data, so without this a part loaded from
    safetensors differs from the one that was saved in the last bits of its outputs.
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.data_ptr() % 64:
            tensor.data = tensor.data.clone()
    return module
