"""Two CPU processes (gloo, started by torchrun) train exactly as one process on the same global
batch: 2 processes x 1 micro-batch == 1 process x 2 accumulated micro-batches."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from nextgpt.data.toy import write_toy_dataset
from nextgpt.training.config import TrainConfig
from nextgpt.training.trainer import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    toy = write_toy_dataset(tmp_path / "toy", copies=2)
    base = {
        "stage": 2,
        "model": "tiny",
        "data": {"train": [{"path": str(toy["stage2"])}], "max_length": 256},
        "lr": 1e-2,
        "batch_size": 2,
        "max_steps": 4,
        "log_every": 1,
        "tensorboard": False,
        "progress": False,
    }
    config_file = tmp_path / "stage2.yaml"
    config_file.write_text(yaml.safe_dump({**base, "out_dir": str(tmp_path / "two")}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        str(Path(sys.executable).parent / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "nextgpt.cli",
        "train",
        str(config_file),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    # one thread, as in each launched process, so that both runs do the same float arithmetic
    # (Adam turns even last-bit differences of near-zero gradients into full-size steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        one = train(
            TrainConfig.from_dict({**base, "out_dir": str(tmp_path / "one"), "grad_accum": 2})
        )
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    two = load_file(tmp_path / "two" / "checkpoint-00000004" / "trainable.safetensors")
    single = load_file(one.checkpoint / "trainable.safetensors")
    start = load_file(tmp_path / "one" / "base" / "trainable.safetensors")
    assert two.keys() == single.keys()
    moved = 0
    for key in single:
        torch.testing.assert_close(two[key], single[key], atol=1e-5, rtol=1e-4)
        moved += not torch.equal(single[key], start[key])
    assert moved > len(single) // 2  # the comparison is between trained weights
