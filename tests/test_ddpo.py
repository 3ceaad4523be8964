"""The DDPO baseline: PPO-clip surrogate, per-prompt advantages, a round on the tiny model."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from d3po_core.errors import NoPicksError, RoundCancelled, ScorerError, SettingsError
from d3po_core.methods import DDPOConfig
from d3po_core.models import lora_parameters, remove_lora
from d3po_core.objectives.ddpo import (
    RewardExample,
    normalized_advantages,
    ppo_clip_loss,
)
from d3po_core.sampling import recompute_log_probs, sample_grid

from .conftest import FAST, ddpo_round

DIMS = 4


def _loss_and_grad(log_ratio_per_dim: float, advantage: float, clip: float = 0.1):
    logp = torch.tensor([log_ratio_per_dim * DIMS], dtype=torch.float64, requires_grad=True)
    terms = ppo_clip_loss(
        logp,
        torch.zeros(1, dtype=torch.float64),
        torch.tensor([advantage]),
        dims=DIMS,
        clip_range=clip,
    )
    terms.loss.sum().backward()
    return terms, logp.grad.item()


def test_surrogate_matches_hand_computation_inside_the_trust_region():
    terms, grad = _loss_and_grad(math.log(1.05), advantage=2.0)
    assert terms.loss.item() == pytest.approx(-2.0 * 1.05)
    assert not terms.clipped.item()
    # d/dlogp of −A·exp(logp/dims) = −A·ratio/dims: a positive advantage pushes logp up
    assert grad == pytest.approx(-2.0 * 1.05 / DIMS)
    _, grad = _loss_and_grad(math.log(1.05), advantage=-2.0)
    assert grad == pytest.approx(2.0 * 1.05 / DIMS)


def test_clipping_stops_the_gradient_only_where_ppo_says():
    # A > 0 and the ratio already above 1 + ε: no further push
    terms, grad = _loss_and_grad(math.log(1.3), advantage=1.0)
    assert terms.clipped.item() and grad == 0.0
    assert terms.loss.item() == pytest.approx(-1.0 * 1.1)
    # A < 0 and the ratio already below 1 − ε: no further push
    terms, grad = _loss_and_grad(math.log(0.7), advantage=-1.0)
    assert terms.clipped.item() and grad == 0.0
    # A < 0 but the ratio went up past 1 + ε: the pessimistic (unclipped) term keeps pulling
    terms, grad = _loss_and_grad(math.log(1.3), advantage=-1.0)
    assert terms.loss.item() == pytest.approx(1.3)
    assert grad == pytest.approx(1.3 / DIMS)


def test_sum_reduction_and_bad_reduction():
    logp = torch.tensor([0.05], dtype=torch.float64)
    terms = ppo_clip_loss(
        logp,
        torch.zeros(1, dtype=torch.float64),
        torch.ones(1),
        dims=DIMS,
        clip_range=0.2,
        reduction="sum",
    )
    assert terms.log_ratio.item() == pytest.approx(0.05)
    with pytest.raises(SettingsError, match="reduction"):
        ppo_clip_loss(logp, logp, torch.ones(1), dims=DIMS, clip_range=0.2, reduction="max")


def test_advantages_are_normalised_per_prompt_and_clipped():
    rewards = [1.0, 2.0, 3.0, 100.0, 200.0, 300.0, 7.0]
    prompts = ["a", "a", "a", "b", "b", "b", "lonely"]
    adv = normalized_advantages(rewards, prompts, clip=5.0)
    a, b = adv[:3], adv[3:6]
    assert a == pytest.approx(b, abs=1e-5)  # the scale of each prompt's rewards does not matter
    assert a.mean() == pytest.approx(0.0) and a.std() == pytest.approx(1.0, abs=1e-5)
    # a prompt seen once is normalised with the round's overall mean and std
    overall = np.asarray(rewards)
    assert adv[6] == pytest.approx((7.0 - overall.mean()) / (overall.std() + 1e-6))
    clipped = normalized_advantages([0.0] * 99 + [1.0], ["p"] * 100, clip=2.0)
    assert clipped.max() == 2.0


@pytest.fixture
def grid(pipe):
    return sample_grid(pipe, "a red circle", FAST, seed=21)


def _policy_change(pipe, traj) -> torch.Tensor:
    """Per image, log π_θ − log π_old summed over the steps (π_old: recorded at sampling)."""
    return (recompute_log_probs(pipe, traj) - traj.log_probs).sum(1)


def test_one_step_moves_the_policy_toward_the_rewarded_image(pipe, grid):
    config = DDPOConfig(epochs=1, batch_size=4 * FAST.steps, grad_accum=1, learning_rate=1e-3)
    result = ddpo_round(pipe, [RewardExample(grid.trajectory, [0.0, 0.0, 1.0, 0.0])], config)
    assert result.metrics["optimizer_steps"] == 1
    change = _policy_change(pipe, grid.trajectory)
    assert change[2] > 0 and change[2] > change[[0, 1, 3]].max()
    # the opposite reward, from a fresh adapter, moves image 2 the other way
    remove_lora(pipe.unet)
    ddpo_round(pipe, [RewardExample(grid.trajectory, [1.0, 1.0, 0.0, 1.0])], config)
    change = _policy_change(pipe, grid.trajectory)
    assert change[2] < 0 and change[2] < change[[0, 1, 3]].min()


def test_round_metrics_progress_and_batching(pipe, grid):
    other = sample_grid(pipe, "a blue square", FAST, seed=3)
    examples = [
        RewardExample(grid.trajectory, [0.1, 0.5, 0.9, 0.3]),
        RewardExample(other.trajectory, [2.0, 1.0, 3.0, 0.0]),
    ]
    events = []
    config = DDPOConfig(epochs=2, batch_size=8, grad_accum=2)
    result = ddpo_round(pipe, examples, config, on_progress=events.append)
    items = 2 * 4 * FAST.steps
    assert result.metrics["items"] == items
    assert result.metrics["optimizer_steps"] == 2 * (items // 8 // 2) == len(events)
    assert events[-1].step == events[-1].total
    assert result.metrics["reward_mean"] == pytest.approx(np.mean([0.1, 0.5, 0.9, 0.3, 2, 1, 3, 0]))
    assert 0 <= result.metrics["clipfrac"] <= 1 and result.metrics["approx_kl"] >= 0
    # after the first update the trust region binds on part of the second epoch
    assert result.metrics["clipfrac"] > 0


def test_cancel_restores_the_adapter_and_bad_input_is_refused(pipe, grid):
    example = RewardExample(grid.trajectory, [0.0, 1.0, 2.0, 3.0])
    ddpo_round(pipe, [example], DDPOConfig(grad_accum=1))
    before = [p.detach().clone() for p in lora_parameters(pipe.unet)]
    with pytest.raises(RoundCancelled):
        ddpo_round(
            pipe,
            [example],
            DDPOConfig(grad_accum=1, batch_size=2, learning_rate=1e-2),
            should_cancel=lambda: True,
        )
    for p, b in zip(lora_parameters(pipe.unet), before, strict=True):
        assert torch.equal(p, b)
    with pytest.raises(NoPicksError):
        ddpo_round(pipe, [], DDPOConfig())
    with pytest.raises(ScorerError, match="4 images but 3 rewards"):
        ddpo_round(pipe, [RewardExample(grid.trajectory, [0.0, 1.0, 2.0])], DDPOConfig())
    with pytest.raises(ScorerError, match="not finite"):
        ddpo_round(
            pipe, [RewardExample(grid.trajectory, [0.0, 1.0, float("nan"), 2.0])], DDPOConfig()
        )
    with pytest.raises(SettingsError, match="clip range"):
        ddpo_round(pipe, [example], DDPOConfig(clip_range=0))


def test_a_partial_accumulation_group_still_makes_a_step(pipe, grid):
    example = RewardExample(grid.trajectory, [0.0, 1.0, 2.0, 3.0])
    snapshots = []

    def snapshot(_event) -> None:
        snapshots.append([p.detach().clone() for p in lora_parameters(pipe.unet)])

    # 16 items in batches of 6: 3 UNet calls; accumulating 2 a step, the 3rd call is alone
    config = DDPOConfig(batch_size=6, grad_accum=2, learning_rate=1e-2)
    result = ddpo_round(pipe, [example], config, on_progress=snapshot)
    assert result.metrics["optimizer_steps"] == len(snapshots) == 2
    # the last, partial group moved the weights too, and left no gradient behind
    assert any(not torch.equal(a, b) for a, b in zip(*snapshots, strict=True))
    assert all(p.grad is None or not p.grad.any() for p in lora_parameters(pipe.unet))


def test_settings_round_trip_through_a_round_record():
    from d3po_core.methods import D3POConfig
    from d3po_core.objectives import config_from_dict
    from d3po_core.settings import LoraSettings

    ddpo = DDPOConfig(learning_rate=1e-4, clip_range=0.01, lora=LoraSettings(rank=8))
    assert DDPOConfig.from_dict(ddpo.to_dict()) == ddpo  # the "method" tag is not a field
    d3po = D3POConfig(beta=0.5, pairs="implied")
    assert D3POConfig.from_dict(d3po.to_dict()) == d3po
    assert config_from_dict(ddpo.to_dict()) == ddpo and config_from_dict(d3po.to_dict()) == d3po
    with pytest.raises(SettingsError, match="epochs"):
        DDPOConfig(epochs=0)


def test_a_grid_drawn_at_another_adapter_strength_is_trained_on_that_policy(pipe):
    """A grid sampled with the adapter at strength 1.5 recorded that policy's log-probs:
    PPO's ratio is taken against the adapter at the grid's strength, so before any update it
    is 1 (as at strength 1), and the round trains."""
    from d3po_core.models import add_lora
    from d3po_core.objectives.ddpo import DDPOObjective
    from d3po_core.rounds import make_batches

    add_lora(pipe.unet, seed=0)
    with torch.no_grad():  # an adapter that changes the images, so strength matters
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    grids = {s: sample_grid(pipe, "a circle", replace(FAST, strength=s), seed=1) for s in (1, 1.5)}
    for strength, grid in grids.items():
        objective = DDPOObjective(
            [RewardExample(grid.trajectory, [0.0, 1.0, 2.0, 3.0])], DDPOConfig()
        )
        batch = make_batches(objective.trajectories, objective.items(), 8, seed=0)[0]
        assert batch.key.strength == strength
        with torch.no_grad():
            kl = objective.terms(pipe, batch)["approx_kl"]
        assert kl.max() < 1e-8
    assert (grids[1.5].trajectory.latents - grids[1].trajectory.latents).abs().max() > 1e-3
    result = ddpo_round(
        pipe, [RewardExample(grids[1.5].trajectory, [0.0, 1.0, 2.0, 3.0])], DDPOConfig()
    )
    assert math.isfinite(result.metrics["loss"])
