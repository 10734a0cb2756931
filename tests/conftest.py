"""Shared fixtures: everything runs offline on tiny components built here."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from nextgpt.config import SignalTokenConfig, tiny_config  # noqa: E402
from nextgpt.llm import LanguageModel  # noqa: E402

# One thread: the tiny models' ops are too small to gain from two, and two OpenMP threads on two
# shared cores spin against any other process and run 10-30x slower (measured: a 80x256x1024 matmul
# took 31 ms on two threads beside another busy process, 1 ms on one).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the default dtype or thread count; put them back."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llm() -> LanguageModel:
    return LanguageModel.from_config(tiny_config().llm, SignalTokenConfig(), seed=1)


@pytest.fixture(scope="session")
def tiny_model():
    """The whole tiny NExT-GPT (shared: tests must not train it in place)."""
    from nextgpt.model import NextGPT

    return NextGPT.from_config(tiny_config()).eval()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process training run starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
