"""Output projector: signal-token states -> decoder conditioning (shapes, inputs, fit, size)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from nextgpt.config import OutputProjectorConfig
from nextgpt.projectors import OutputProjector

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


def test_wrong_number_of_signal_tokens_is_an_error() -> None:
    proj = OutputProjector(TINY, 24, 4, 5, 8)
    with pytest.raises(ValueError, match=r"\(B, 4, llm_dim\).*\(2, 5, 24\)"):
        proj(torch.randn(2, 5, 24))


def test_input_embeddings_are_added_only_when_configured() -> None:
    torch.manual_seed(0)
    hidden, embeds = torch.randn(2, 4, 24), torch.randn(2, 4, 24)
    proj = OutputProjector(TINY, 24, 4, 5, 8).eval()
    with torch.no_grad():
        torch.testing.assert_close(proj(hidden, embeds), proj(hidden + embeds))
        assert (proj(hidden, embeds) - proj(hidden)).abs().max() > 1e-4
    off = OutputProjector(dataclasses.replace(TINY, add_input_embeddings=False), 24, 4, 5, 8)
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


def test_low_precision_states_and_gradients_reach_every_parameter() -> None:
    torch.manual_seed(0)
    proj = OutputProjector(TINY, 24, 4, 5, 8)
    out = proj(torch.randn(2, 4, 24, dtype=torch.bfloat16), torch.randn(2, 4, 24))
    assert out.dtype == torch.float32  # the LLM's bf16 states are cast to the projector's dtype
    F.mse_loss(out, torch.randn(2, 5, 8)).backward()
    for name, param in proj.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name


def test_fits_fixed_targets() -> None:
    torch.manual_seed(0)
    batch, signals, llm_dim, cond_len, cond_dim = 8, 4, 32, 6, 16
    hidden, embeds = torch.randn(batch, signals, llm_dim), torch.randn(batch, signals, llm_dim)
    target = torch.randn(batch, cond_len, cond_dim)
    proj = OutputProjector(TINY, llm_dim, signals, cond_len, cond_dim)
    opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(proj(hidden, embeds), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"output projector MSE: {losses[0]:.3f} -> {losses[-1]:.3f}")
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


def test_running_mean_tracks_training_batches_and_is_saved() -> None:
    torch.manual_seed(0)
    centred = dataclasses.replace(TINY, centre_inputs=True, centre_momentum=0.25)
    proj = OutputProjector(centred, 24, 4, 5, 8)
    first, second = torch.randn(3, 4, 24) + 5.0, torch.randn(3, 4, 24) - 5.0
    proj(first)  # the first training batch sets the mean ...
    torch.testing.assert_close(proj.input_mean, first.mean(0))
    proj(second)  # ... later ones move it by the momentum
    expected = 0.75 * first.mean(0) + 0.25 * second.mean(0)
    torch.testing.assert_close(proj.input_mean, expected)
    proj.eval()
    with torch.no_grad():
        out = proj(first)  # inference reads the mean and leaves it
        torch.testing.assert_close(proj.input_mean, expected)
        plain = OutputProjector(TINY, 24, 4, 5, 8).eval()
        plain.load_state_dict({k: v for k, v in proj.state_dict().items() if "mean" not in k})
        torch.testing.assert_close(out, plain(first - expected))
    again = OutputProjector(centred, 24, 4, 5, 8)
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
