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


@pytest.fixture(autouse=True)
def _restore_torch_state():
    """Tests may change the default dtype or seed; put them back."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def tiny_llm() -> LanguageModel:
    return LanguageModel.from_config(tiny_config().llm, SignalTokenConfig(), seed=1)


@pytest.fixture(scope="session")
def tiny_model():
    """The whole tiny NExT-GPT (shared: tests must not train it in place)."""
    from nextgpt.model import NextGPT

    return NextGPT.from_config(tiny_config()).eval()
