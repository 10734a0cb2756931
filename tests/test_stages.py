"""What each stage trains, parameter by parameter, and that everything else stays bit-identical."""

from __future__ import annotations

import copy

import pytest
import torch

from nextgpt.config import LoraSettings, tiny_config
from nextgpt.data.dataset import SampleEncoder, collate_encoded
from nextgpt.data.formats import read_samples
from nextgpt.data.toy import write_toy_dataset
from nextgpt.model import NextGPT
from nextgpt.training.config import TrainConfig
from nextgpt.training.stages import Stage, apply_stage, get_stage, set_train_mode
from nextgpt.training.trainer import make_optimizer


@pytest.fixture(scope="module")
def base_model() -> NextGPT:
    return NextGPT.from_config(tiny_config())


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return write_toy_dataset(tmp_path_factory.mktemp("toy"), copies=1)


def expected_trainable(name: str, stage: int) -> bool:
    """Independent of stages.py: which parameter names each stage must train."""
    if name.startswith("encoder."):
        return False
    if name.startswith("input_projector."):
        return stage in (1, 3)
    if name.startswith("output_projectors."):
        return stage in (2, 3)
    if "lora_" in name:
        return stage == 3
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return stage in (2, 3)  # the full matrices take (row-masked) gradients
    return False


@pytest.mark.parametrize("number", [1, 2, 3])
def test_stage_trains_exactly_its_parameters(base_model, toy, number):
    model = copy.deepcopy(base_model)
    plan = apply_stage(model, get_stage(number), LoraSettings(r=4, alpha=8, dropout=0.0))
    names = dict(model.named_parameters())
    assert any("lora_" in n for n in names) == (number == 3)
    for name, p in names.items():
        assert p.requires_grad == expected_trainable(name, number), name
    assert f"stage {number}" in plan.summary() and "%" in plan.summary()
    assert 0 < plan.trainable < plan.total

    before = {n: p.detach().clone() for n, p in names.items()}
    config = TrainConfig(lr=1e-2, weight_decay=0.1)
    optimizer = make_optimizer(plan, config)
    set_train_mode(model, plan)
    encoder = SampleEncoder.for_model(model)
    samples = read_samples(toy[f"stage{number}"]).samples[:4]
    batch = collate_encoded([encoder(s) for s in samples], model.llm.tokenizer.pad_token_id)
    for _ in range(3):
        model(batch, losses=get_stage(number).losses).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    special = torch.tensor(model.llm.special_ids)
    other = torch.ones(len(model.llm.tokenizer), dtype=torch.bool)
    other[special] = False
    for name, p in names.items():
        if not expected_trainable(name, number):
            assert torch.equal(p, before[name]), f"frozen {name} changed"
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(p[other], before[name][other]), f"non-signal rows of {name} moved"
            assert not torch.equal(p[special], before[name][special]), f"{name}: rows not trained"
    trained = [n for n in names if expected_trainable(n, number)]
    assert sum(not torch.equal(names[n], before[n]) for n in trained) > len(trained) // 2


def test_a_stage_can_never_train_nothing(base_model):
    model = copy.deepcopy(base_model)
    lora_only = Stage(9, "LoRA without adding it", ("lora",), ("text",), lora=False)
    with pytest.raises(ValueError, match="stage 9 trains lora, but this model has none"):
        apply_stage(model, lora_only)
    with pytest.raises(ValueError, match="unknown stage 4"):
        get_stage(4)


def test_stage3_adds_lora_and_records_it_in_the_config(base_model):
    model = copy.deepcopy(base_model)
    apply_stage(model, get_stage(3), LoraSettings(r=2, alpha=4, dropout=0.0))
    assert model.llm.has_lora and model.config.llm.lora.r == 2
    assert any(k.startswith("llm.lora.") for k in model.trainable_state_dict())


def test_signal_row_mask_follows_the_gradient_to_another_device():
    """accelerate moves the model after `apply_stage` (CPU -> cuda:rank keeps the parameter and
    its hook): the row mask, built on the weight's first device, must follow the gradient."""
    from nextgpt.training.stages import _mask_rows

    weight = torch.nn.Parameter(torch.ones(4, 2))
    _mask_rows(weight, [1, 3])
    (hook,) = weight._backward_hooks.values()
    assert hook(torch.ones(4, 2)).tolist() == [[0, 0], [1, 1], [0, 0], [1, 1]]
    assert hook(torch.ones(4, 2, device="meta")).device.type == "meta"  # no device mismatch
