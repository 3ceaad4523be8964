"""P3O, the pairwise reward baseline: a clipped policy gradient on reward differences.

Pairwise Proximal Policy Optimization (Wu et al. 2023) learns from the *difference* of two
responses' rewards, so it is invariant to a reward's offset and learns comparatively. Here the
two responses are two images of one grid (same prompt); for a pair (w, l) with rewards
normalised per prompt, r̂_w > r̂_l, and a denoising step t:

    A = clip(r̂_w − r̂_l, −a, a)
    ρ = [π_θ/π_old](x^w_{t−1}|x^w_t) / [π_θ/π_old](x^l_{t−1}|x^l_t)
    L = max(−A ρ, −A clip(ρ, 1−ε, 1+ε))                  (the paper's joint clipping)

π_old is the policy that sampled the grid (its recorded log-probs). As in DDPO, log ρ is taken
per latent dimension by default so ε is small.
"""

from __future__ import annotations

import itertools
import math

import torch

from ..rounds import (
    Batch,
    pair_rows,
    recorded_log_probs,
    require_log_probs,
    sampling_policy_log_probs,
    select_steps,
)
from .ddpo import RewardObjective, rewarded_advantages


class P3OObjective(RewardObjective):
    """(example, winner, loser, step) items: every pair of a grid's images with different
    rewards, the higher one as winner; scored by the pair's clipped ratio."""

    sides = 2

    def items(self) -> list[tuple[int, int, int, int]]:
        require_log_probs(self.trajectories)
        adv = rewarded_advantages(self.examples, clip=math.inf, min_group=self.config.min_group)
        generator = torch.Generator().manual_seed(self.config.seed)
        self.advantages: dict[tuple[int, int, int], float] = {}
        items = []
        for e, traj in enumerate(self.trajectories):
            for i, j in itertools.combinations(range(traj.n), 2):
                diff = adv[(e, i)] - adv[(e, j)]
                if diff == 0:
                    continue
                win, lose = (i, j) if diff > 0 else (j, i)
                self.advantages[(e, win, lose)] = min(abs(diff), self.config.adv_clip)
                for k in select_steps(
                    traj.timesteps.numel(), self.config.timestep_fraction, generator
                ):
                    items.append((e, win, lose, k))
        return items

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        rows = pair_rows(batch.items)
        win, lose = sampling_policy_log_probs(pipe, self.trajectories, batch.key, rows).chunk(2)
        old_win, old_lose = recorded_log_probs(self.trajectories, rows).chunk(2)
        adv = torch.tensor([self.advantages[item[:3]] for item in batch.items])
        # the pair's log-ratio: log ρ_w − log ρ_l (the winner's advantage is positive)
        return self.clipped_terms(win - lose, old_win - old_lose, adv)
