"""Output projectors: signal-token states -> decoder conditioning (shapes, inputs, fit, size,
and which kind composes combinations it never saw)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F

from nextgpt.config import OutputProjectorConfig
from nextgpt.projectors import (
    OUTPUT_PROJECTOR_KINDS,
    LinearOutputProjector,
    OutputProjector,
    build_output_projector,
)

TINY = OutputProjectorConfig(
    hidden_dim=32, num_heads=2, encoder_layers=1, decoder_layers=1, ff_dim=64
)


@pytest.mark.parametrize(
    ("signals", "cond_len", "cond_dim"), [(4, 77, 48), (24, 77, 64), (8, 1, 40), (1, 3, 8)]
)
def test_shapes(signals: int, cond_len: int, cond_dim: int) -> None:
    torch.manual_seed(0)
    proj = OutputProjector(TINY, 24, signals, cond_len, cond_dim)
    out = proj(torch.randn(3, signals, 24), torch.randn(3, signals, 24))
    assert out.shape == (3, cond_len, cond_dim)
    assert torch.isfinite(out).all()
    # the learned queries are distinct: the conditioning is not one vector repeated
    if cond_len > 1:
        assert (out[:, 0] - out[:, 1]).abs().max() > 1e-4


def kind(name: str, **changes: object) -> OutputProjectorConfig:
    return dataclasses.replace(TINY, kind=name, **changes)


@pytest.mark.parametrize("name", OUTPUT_PROJECTOR_KINDS)
def test_wrong_number_of_signal_tokens_is_an_error(name: str) -> None:
    proj = build_output_projector(kind(name), 24, 4, 5, 8)
    with pytest.raises(ValueError, match=r"\(B, 4, llm_dim\).*\(2, 5, 24\)"):
        proj(torch.randn(2, 5, 24))


@pytest.mark.parametrize("name", OUTPUT_PROJECTOR_KINDS)
def test_input_embeddings_are_added_only_when_configured(name: str) -> None:
    torch.manual_seed(0)
    hidden, embeds = torch.randn(2, 4, 24), torch.randn(2, 4, 24)
    proj = build_output_projector(kind(name), 24, 4, 5, 8).eval()
    with torch.no_grad():
        for param in proj.parameters():  # the linear kind starts at zero, which reads nothing
            param.add_(0.1 * torch.randn_like(param))
        torch.testing.assert_close(proj(hidden, embeds), proj(hidden + embeds))
        assert (proj(hidden, embeds) - proj(hidden)).abs().max() > 1e-4
    off = build_output_projector(kind(name, add_input_embeddings=False), 24, 4, 5, 8)
    with torch.no_grad():
        assert torch.equal(off(hidden, embeds), off(hidden))


def test_order_of_signal_tokens_matters() -> None:
    """The learned positions tell <image_00> from <image_03>; without them order is invisible."""
    torch.manual_seed(0)
    proj = OutputProjector(TINY, 24, 4, 5, 8).eval()
    with torch.no_grad():
        proj.pos_embed.normal_()
        hidden = torch.randn(2, 4, 24)
        assert (proj(hidden) - proj(hidden.flip(1))).abs().max() > 1e-3


@pytest.mark.parametrize("name", OUTPUT_PROJECTOR_KINDS)
def test_low_precision_states_and_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    proj = build_output_projector(kind(name), 24, 4, 5, 8)
    out = proj(torch.randn(2, 4, 24, dtype=torch.bfloat16), torch.randn(2, 4, 24))
    assert out.dtype == torch.float32  # the LLM's bf16 states are cast to the projector's dtype
    F.mse_loss(out, torch.randn(2, 5, 8)).backward()
    for name, param in proj.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


@pytest.mark.parametrize("name", OUTPUT_PROJECTOR_KINDS)
def test_fits_fixed_targets(name: str) -> None:
    torch.manual_seed(0)
    batch, signals, llm_dim, cond_len, cond_dim = 8, 4, 32, 6, 16
    hidden, embeds = torch.randn(batch, signals, llm_dim), torch.randn(batch, signals, llm_dim)
    target = torch.randn(batch, cond_len, cond_dim)
    proj = build_output_projector(kind(name), llm_dim, signals, cond_len, cond_dim)
    opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(proj(hidden, embeds), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"{name} output projector MSE: {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize(
    ("signals", "cond_len", "cond_dim", "millions"),
    [(4, 77, 768, 31.96), (24, 77, 1024, 32.10), (8, 1, 512, 31.79)],
)
def test_paper_size_parameter_count(
    signals: int, cond_len: int, cond_dim: int, millions: float
) -> None:
    with torch.device("meta"):
        proj = OutputProjector(OutputProjectorConfig(), 4096, signals, cond_len, cond_dim)
        out = proj(torch.empty(1, signals, 4096))
    n = sum(p.numel() for p in proj.parameters())
    print(f"output projector {cond_len}x{cond_dim}: {n / 1e6:.2f}M parameters")
    assert out.shape == (1, cond_len, cond_dim)
    assert n == pytest.approx(millions * 1e6, rel=1e-3)  # the paper's "~31M"


def test_centring_is_off_by_default_and_adds_nothing_to_the_state() -> None:
    """The reference layout (and the released checkpoint's keys) stays as it was."""
    proj = OutputProjector(TINY, 24, 4, 5, 8)
    assert not any("mean" in k for k in proj.state_dict())


@pytest.mark.parametrize("name", OUTPUT_PROJECTOR_KINDS)
def test_running_mean_tracks_training_batches_and_is_saved(name: str) -> None:
    torch.manual_seed(0)
    centred = kind(name, centre_inputs=True, centre_momentum=0.25)
    proj = build_output_projector(centred, 24, 4, 5, 8)
    first, second = torch.randn(3, 4, 24) + 5.0, torch.randn(3, 4, 24) - 5.0
    proj(first)  # the first training batch sets the mean ...
    torch.testing.assert_close(proj.input_mean, first.mean(0))
    proj(second)  # ... later ones move it by the momentum
    expected = 0.75 * first.mean(0) + 0.25 * second.mean(0)
    torch.testing.assert_close(proj.input_mean, expected)
    proj.eval()
    with torch.no_grad():
        for param in proj.parameters():
            param.add_(0.1 * torch.randn_like(param))
        out = proj(first)  # inference reads the mean and leaves it
        torch.testing.assert_close(proj.input_mean, expected)
        plain = build_output_projector(kind(name), 24, 4, 5, 8).eval()
        plain.load_state_dict({k: v for k, v in proj.state_dict().items() if "mean" not in k})
        torch.testing.assert_close(out, plain(first - expected))
    again = build_output_projector(centred, 24, 4, 5, 8)
    again.load_state_dict(proj.state_dict())
    assert bool(again.mean_ready) and torch.equal(again.input_mean, proj.input_mean)


def test_centring_learns_a_small_signal_on_a_large_drifting_constant_faster() -> None:
    """Signal-token states are a large per-position constant plus a small request-dependent part,
    and the constant drifts while stage 2 trains the signal rows (what the miniature's LLM
    gives); centred by the running mean, the projector reads the small part much sooner."""
    torch.manual_seed(0)
    signals, llm_dim, classes, steps = 4, 32, 12, 200
    start, end = 4.0 * torch.randn(signals, llm_dim), 4.0 * torch.randn(signals, llm_dim)
    codes = 0.1 * torch.randn(classes, signals, llm_dim)
    targets = torch.randn(classes, 5, 8)
    final = {}
    for centre in (False, True):
        torch.manual_seed(1)
        config = dataclasses.replace(TINY, centre_inputs=centre, add_input_embeddings=False)
        proj = OutputProjector(config, llm_dim, signals, 5, 8)
        opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
        for step in range(steps):
            label = torch.randint(0, classes, (16,))
            constant = torch.lerp(start, end, min(1.0, 2 * step / steps))  # drifts, then stays
            loss = F.mse_loss(proj(constant + codes[label]), targets[label])
            opt.zero_grad()
            loss.backward()
            opt.step()
        proj.eval()
        label = torch.arange(classes)
        with torch.no_grad():
            final[centre] = F.mse_loss(proj(end + codes[label]), targets[label]).item()
    print(f"MSE after {steps} steps: raw {final[False]:.3f}, centred {final[True]:.3f}")
    assert final[True] < 0.5 * final[False]


def test_linear_kind_shapes_and_starts_at_zero() -> None:
    proj = build_output_projector(kind("linear"), 24, 4, 5, 8)
    assert isinstance(proj, LinearOutputProjector)
    out = proj(torch.randn(3, 4, 24), torch.randn(3, 4, 24))
    assert out.shape == (3, 5, 8) and torch.equal(out, torch.zeros(3, 5, 8))
    assert sum(p.numel() for p in proj.parameters()) == 4 * 24 * 5 * 8 + 5 * 8


def test_unknown_kind_is_an_error_naming_the_known_ones() -> None:
    with pytest.raises(ValueError, match="'mlp'.*transformer, linear"):
        build_output_projector(kind("mlp"), 24, 4, 5, 8)


def test_linear_kind_composes_combinations_it_never_saw() -> None:
    """States that carry two attributes as a sum (on a large constant, as signal states do), and
    targets that are the sum of the attributes' conditionings; four of the sixteen pairs are held
    out of training. The linear projector writes a held-out pair as well as a trained one; the
    transformer fits the trained pairs closer still but writes held-out ones far off (the
    miniature's held-out generation, docs/mini-design.md section 8)."""
    torch.manual_seed(0)
    signals, llm_dim, cond_len, cond_dim, values = 4, 32, 6, 16, 4
    constant = 3.0 * torch.randn(signals, llm_dim)
    state_codes = 0.3 * torch.randn(2, values, signals, llm_dim)
    target_codes = torch.randn(2, values, cond_len, cond_dim)
    pairs = list(itertools.product(range(values), repeat=2))
    heldout = [(i, (i + 1) % values) for i in range(values)]
    train = [p for p in pairs if p not in heldout]

    def batch(chosen: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = torch.tensor([p[0] for p in chosen]), torch.tensor([p[1] for p in chosen])
        states = constant + state_codes[0, a] + state_codes[1, b]
        return states, target_codes[0, a] + target_codes[1, b]

    errors = {}
    for name in OUTPUT_PROJECTOR_KINDS:
        torch.manual_seed(1)
        config = kind(name, centre_inputs=True, add_input_embeddings=False)
        proj = build_output_projector(config, llm_dim, signals, cond_len, cond_dim)
        opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
        states, targets = batch(train)
        for _ in range(600):
            noisy = states + 0.01 * torch.randn_like(states)
            loss = F.mse_loss(proj(noisy), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        proj.eval()
        with torch.no_grad():
            unseen, wanted = batch(heldout)
            errors[name] = (
                F.mse_loss(proj(states), targets).item(),
                F.mse_loss(proj(unseen), wanted).item(),
            )
            spread = wanted.var().item()
    print(f"(train, held-out) MSE: {errors}; held-out target variance {spread:.2f}")
    linear_train, linear_heldout = errors["linear"]
    transformer_train, transformer_heldout = errors["transformer"]
    assert linear_train < 0.02 * spread and linear_heldout < 2 * linear_train + 0.01 * spread
    assert transformer_train < 0.02 * spread  # it fits what it saw ...
    assert transformer_heldout > 0.2 * spread  # ... and misses what it did not
