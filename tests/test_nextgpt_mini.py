"""The shipped nextgpt-mini: it loads by name as the default model, fits its size budget, and a
quick subset of `nextgpt eval` beats chance by a wide margin on every measurement (the README's
table is the full run)."""

from __future__ import annotations

import pytest
import torch

from nextgpt.cli import DEFAULT_MODEL
from nextgpt.mini.evaluate import EvalSettings, evaluate, load_judges
from nextgpt.mini.world import World, WorldConfig
from nextgpt.model import NextGPT
from nextgpt.shipped import shipped_model_dir

MINI = "nextgpt-mini"


def wide_margin(chance: float) -> float:
    """Half-way from chance to perfect."""
    return chance + 0.5 * (1 - chance)


@pytest.fixture(scope="module")
def results() -> dict:
    torch.set_num_threads(1)
    model = NextGPT.from_pretrained(MINI)
    judges = load_judges(shipped_model_dir(MINI) / "judges")
    settings = EvalSettings(captions=8, routing=2, generations=6, ceiling=False, seed=1)
    return evaluate(model, judges, World(WorldConfig(seed=0)), settings)


def test_it_is_the_default_model_and_fits_the_budget():
    assert DEFAULT_MODEL == MINI
    folder = shipped_model_dir(MINI)
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 40e6
    from safetensors import safe_open

    for f in files:
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as st:
                dtypes = {st.get_tensor(k).dtype for k in st.keys()}  # noqa: SIM118
            assert torch.float32 not in dtypes, f  # shipped in float16


def test_captions_beat_chance_by_a_wide_margin(results):
    for modality, rows in results["caption"].items():
        for attribute, row in rows.items():
            if attribute != "all":
                assert row["train"] >= wide_margin(row["chance"]), (modality, attribute, row)


def test_routing_beats_chance_and_the_best_constant_answer(results):
    row = results["routing"]["kinds"]["all"]
    assert row["train"] >= wide_margin(row["chance"]), row
    assert row["train"] > results["routing"]["majority"]["train"], results["routing"]


def test_generation_through_nextgpt_beats_chance(results):
    for modality, rows in results["generation"].items():
        mean = sum(r["train"]["model"] for a, r in rows.items() if a != "all") / (len(rows) - 1)
        chance = sum(r["chance"] for a, r in rows.items() if a != "all") / (len(rows) - 1)
        assert mean >= wide_margin(chance), (modality, rows)


def test_it_loads_for_inference():
    """Stage 3 trains with LoRA dropout: a model left in training mode would answer at random."""
    model = NextGPT.from_pretrained(MINI)
    modules = list(model.named_modules())
    dropouts = [m for n, m in modules if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p > 0 for m in dropouts)  # the shipped recipe's dropout is there
    assert not [n for n, m in modules if m.training]
