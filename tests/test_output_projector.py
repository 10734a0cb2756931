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
    assert proj.input_offset is None and not proj.needs_offset
    assert not any("offset" in k for k in proj.state_dict())
    with pytest.raises(ValueError, match="without centre_inputs"):
        proj.set_input_offset(torch.zeros(4, 24))


def test_input_offset_is_set_once_validated_and_saved() -> None:
    centred = dataclasses.replace(TINY, centre_inputs=True)
    proj = OutputProjector(centred, 24, 4, 5, 8).eval()
    assert proj.needs_offset
    with pytest.raises(ValueError, match=r"\(4, 24\).*\(24,\)"):
        proj.set_input_offset(torch.zeros(24))
    mean = torch.randn(4, 24)
    proj.set_input_offset(mean)
    assert not proj.needs_offset
    hidden = torch.randn(2, 4, 24)
    with torch.no_grad():  # the offset is subtracted from what the projector reads
        plain = OutputProjector(TINY, 24, 4, 5, 8).eval()
        plain.load_state_dict({k: v for k, v in proj.state_dict().items() if "offset" not in k})
        torch.testing.assert_close(proj(hidden + mean), plain(hidden))
    again = OutputProjector(centred, 24, 4, 5, 8)
    again.load_state_dict(proj.state_dict())
    assert not again.needs_offset and torch.equal(again.input_offset, proj.input_offset)


def _fit(proj: OutputProjector, hidden: torch.Tensor, target: torch.Tensor, steps: int) -> float:
    opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(proj(hidden), target)
        loss.backward()
        opt.step()
    return loss.item()


def test_centring_learns_a_small_signal_on_a_large_constant_faster() -> None:
    """Signal-token states are a large per-position constant plus a small request-dependent part
    (what the miniature's LLM gives); centred, the projector reads that part much sooner."""
    torch.manual_seed(0)
    signals, llm_dim, classes = 4, 32, 6
    constant = 4.0 * torch.randn(signals, llm_dim)
    codes = 0.3 * torch.randn(classes, signals, llm_dim)
    targets = torch.randn(classes, 5, 8)
    label = torch.arange(48) % classes
    hidden = constant + codes[label] + 0.02 * torch.randn(48, signals, llm_dim)
    losses = {}
    for centre in (False, True):
        torch.manual_seed(1)
        config = dataclasses.replace(TINY, centre_inputs=centre, add_input_embeddings=False)
        proj = OutputProjector(config, llm_dim, signals, 5, 8)
        if centre:
            proj.set_input_offset(hidden[:16].mean(0))  # one batch's mean, as the trainer does
        losses[centre] = _fit(proj, hidden, targets[label], 150)
    print(f"MSE after 150 steps: raw {losses[False]:.3f}, centred {losses[True]:.3f}")
    assert losses[True] < 0.5 * losses[False]
