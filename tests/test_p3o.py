"""P3O: pairs of a grid's images, the clipped pair ratio, offset invariance, a round."""

from __future__ import annotations

import math

import pytest
import torch

from d3po_core.errors import NoPicksError
from d3po_core.methods import P3OConfig
from d3po_core.objectives.ddpo import RewardExample
from d3po_core.objectives.p3o import P3OObjective
from d3po_core.rounds import run_round
from d3po_core.sampling import recompute_log_probs, sample_grid

from .conftest import FAST


@pytest.fixture
def grid(pipe):
    return sample_grid(pipe, "a red circle", FAST, seed=21)


def _pairs(objective: P3OObjective) -> dict:
    objective.items()
    return objective.advantages


def test_pairs_are_every_two_images_with_different_rewards_winner_first(grid):
    objective = P3OObjective([RewardExample(grid.trajectory, [0.0, 2.0, 1.0, 2.0])], P3OConfig())
    items = objective.items()
    pairs = _pairs(objective)
    # 6 pairs of 4 images; (1, 3) have equal rewards and give none
    assert set(pairs) == {(0, 1, 0), (0, 2, 0), (0, 3, 0), (0, 1, 2), (0, 3, 2)}
    assert len(items) == len(pairs) * FAST.steps
    assert all(a > 0 for a in pairs.values())


def test_advantages_ignore_a_reward_offset_and_scale(grid):
    rewards = [0.1, 0.7, 0.3, 0.2]
    base = _pairs(P3OObjective([RewardExample(grid.trajectory, rewards)], P3OConfig()))
    moved = [10 * r + 5 for r in rewards]
    other = _pairs(P3OObjective([RewardExample(grid.trajectory, moved)], P3OConfig()))
    assert base.keys() == other.keys()
    for key in base:
        assert other[key] == pytest.approx(base[key], rel=1e-5)


def test_advantages_are_clipped(grid):
    config = P3OConfig(adv_clip=0.5)
    pairs = _pairs(P3OObjective([RewardExample(grid.trajectory, [0, 0, 0, 100])], config))
    assert max(pairs.values()) == 0.5


def _change(pipe, traj) -> torch.Tensor:
    return (recompute_log_probs(pipe, traj) - traj.log_probs).sum(1)


def test_a_round_moves_the_policy_toward_the_better_image_of_each_pair(pipe, grid):
    config = P3OConfig(epochs=1, batch_size=3 * FAST.steps, grad_accum=1, learning_rate=1e-3)
    # image 2 is the best, image 0 the worst: 3 pairs involve image 2, all won by it
    example = RewardExample(grid.trajectory, [0.0, 1.0, 3.0, 1.0])
    result = run_round(pipe, P3OObjective([example], config))
    change = _change(pipe, grid.trajectory)
    assert change[2] > change[[0, 1, 3]].max()
    assert change[0] < change[[1, 2, 3]].min()
    assert result.metrics["items"] == 5 * FAST.steps
    assert 0 <= result.metrics["clipfrac"] <= 1 and result.metrics["approx_kl"] >= 0
    assert result.metrics["grids"] == 1 and math.isfinite(result.metrics["loss"])


def test_no_rewarded_grids_is_refused(pipe):
    with pytest.raises(NoPicksError, match="no rewarded grids"):
        run_round(pipe, P3OObjective([], P3OConfig()))
