"""The D3PO objective: hand-computed values, reductions, clipping, pairs and gradient sign."""

from __future__ import annotations

import math

import pytest
import torch

from d3po_core.errors import SettingsError
from d3po_core.methods import D3POConfig
from d3po_core.models import base_model, remove_lora
from d3po_core.objectives.d3po import (
    Example,
    anchor_penalty,
    d3po_loss,
    log_ratio,
    pairs_from_pick,
)
from d3po_core.rounds import select_steps
from d3po_core.sampling import recompute_log_probs, sample_grid

from .conftest import FAST, d3po_round


def test_hand_computed_loss():
    # winner: log π_θ = −10.0, log π_ref = −10.5 → ratio +0.5; loser: −20.0 vs −19.0 → −1.0
    terms = d3po_loss(
        torch.tensor([-10.0]),
        torch.tensor([-10.5]),
        torch.tensor([-20.0]),
        torch.tensor([-19.0]),
        dims=256,
        beta=0.1,
        reduction="sum",
    )
    delta = 0.1 * (0.5 - (-1.0))  # 0.15
    assert terms.delta.item() == pytest.approx(delta)
    assert terms.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-delta))))
    assert terms.loss.item() == pytest.approx(0.620957, abs=1e-6)  # log(1 + e^−0.15)


def test_mean_reduction_divides_by_dims_and_equal_policies_give_log2():
    lp, ref = torch.tensor([-300.0]), torch.tensor([-200.0])
    assert log_ratio(lp, ref, dims=100, reduction="mean").item() == pytest.approx(-1.0)
    same = d3po_loss(ref, ref, ref, ref, dims=100, beta=0.1)
    assert same.loss.item() == pytest.approx(math.log(2))


def test_ratio_clip_bounds_ratio_and_stops_gradient_outside():
    lp = torch.tensor([0.5, 0.01], requires_grad=True)
    ratio = log_ratio(lp, torch.zeros(2), dims=1, ratio_clip=0.1)
    assert ratio[0].item() == pytest.approx(math.log(1.1))
    assert ratio[1].item() == pytest.approx(0.01)
    ratio.sum().backward()
    assert lp.grad.tolist() == [0.0, 1.0]
    with pytest.raises(SettingsError, match="ratio_clip"):
        log_ratio(lp, torch.zeros(2), dims=1, ratio_clip=1.5)


def test_pairs_from_a_pick():
    assert pairs_from_pick(4, 2, 0) == [(2, 0)]
    implied = pairs_from_pick(5, 1, 3, "implied")
    assert len(implied) == 2 * 5 - 3
    assert set(implied) == {(1, 3), (1, 0), (1, 2), (1, 4), (0, 3), (2, 3), (4, 3)}
    assert pairs_from_pick(4, None, None) == []  # tie or skip
    assert pairs_from_pick(4, 1, 1) == []
    with pytest.raises(SettingsError, match="outside a grid of 4"):
        pairs_from_pick(4, 0, 7)


def test_select_steps_fraction():
    assert select_steps(20, 1.0) == list(range(20))
    chosen = select_steps(20, 0.25, torch.Generator().manual_seed(0))
    assert len(chosen) == 5 and len(set(chosen)) == 5 and all(0 <= k < 20 for k in chosen)


def _pair_log_ratios(pipe, traj, best, worst):
    policy = recompute_log_probs(pipe, traj)
    with base_model(pipe.unet):
        ref = recompute_log_probs(pipe, traj)
    ratio = (policy - ref).sum(1)
    return ratio[best].item(), ratio[worst].item()


def test_one_step_raises_winner_log_ratio_over_loser(pipe):
    grid = sample_grid(pipe, "a red circle", FAST, seed=21)
    config = D3POConfig(epochs=1, batch_size=FAST.steps, learning_rate=1e-3)
    result = d3po_round(pipe, [Example(grid.trajectory, best=2, worst=0)], config)
    assert result.metrics["optimizer_steps"] == 1
    win, lose = _pair_log_ratios(pipe, grid.trajectory, 2, 0)
    assert win - lose > 0
    # the same pick the other way round, from a fresh adapter, moves the other way
    remove_lora(pipe.unet)
    d3po_round(pipe, [Example(grid.trajectory, best=0, worst=2)], config)
    win, lose = _pair_log_ratios(pipe, grid.trajectory, 0, 2)
    assert win - lose > 0


def test_anchor_penalty_each_image_or_the_pair_as_a_whole():
    """With "each" any image that got less likely costs; "pair" lets the dispreferred image lose
    what the preferred one gained, and charges only the pair's net loss."""
    loss_w = torch.tensor([-0.5, 0.2, -0.1])  # the preferred image: more, less, more likely
    loss_l = torch.tensor([0.3, 0.1, 0.4])  # the dispreferred image: less likely each time
    each = anchor_penalty(loss_w, loss_l, D3POConfig(anchor=1.0))
    pair = anchor_penalty(loss_w, loss_l, D3POConfig(anchor=1.0, anchor_scope="pair"))
    assert torch.allclose(each, torch.tensor([0.3, 0.3, 0.4]))
    assert torch.allclose(pair, torch.tensor([0.0, 0.3, 0.3]))
