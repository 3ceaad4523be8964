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
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..rounds import Batch, Objective, log_probs_of, require_log_probs, select_steps
from ..settings import RoundSettings, setting
from .d3po import Reduction
from .ddpo import RewardExample, ppo_clip_loss, reward_summary, rewarded_advantages


@dataclass
class P3OConfig(RoundSettings):
    """Settings of one P3O round."""

    method: ClassVar[str] = "p3o"

    learning_rate: float = setting(
        3e-3, low=0, low_open=True, high=1, aliases=("--lr",), help="AdamW step size."
    )
    epochs: int = setting(1, low=1, high=100, help="Passes over the round's items.")
    grad_accum: int = setting(
        4, low=1, high=1024, help="UNet calls an optimizer step (gradient accumulation)."
    )
    clip_range: float = setting(
        1e-4, low=0, low_open=True, high=0.99, help="ε on the per-dimension pair ratio."
    )
    adv_clip: float = setting(
        5.0, low=0, low_open=True, help="Reward differences are clipped to [−adv_clip, adv_clip]."
    )
    reduction: Reduction = setting(
        "mean", help="mean: per-dimension log-ratio (as DDPO); sum: the whole step."
    )
    min_group: int = setting(
        2, low=1, help="Images a prompt needs in the round for its own mean and std."
    )

    def to_dict(self) -> dict:
        return {"method": self.method, **super().to_dict()}


class P3OObjective(Objective):
    """(example, winner, loser, step) items: every pair of a grid's images with different
    rewards, the higher one as winner; scored by the pair's clipped ratio."""

    empty_message = "no rewarded grids to train on"

    def __init__(self, examples: list[RewardExample], config: P3OConfig) -> None:
        self.examples, self.config = examples, config
        self.trajectories = [ex.trajectory for ex in examples]

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
        rows = [(e, win, k) for e, win, _lose, k in batch.items]
        rows += [(e, lose, k) for e, _win, lose, k in batch.items]
        logp = log_probs_of(pipe, self.trajectories, batch.key, rows)
        old = torch.stack([self.trajectories[e].log_probs[i, k] for e, i, k in rows])
        pair_logp = logp.view(2, -1)
        pair_old = old.to(logp.device, logp.dtype).view(2, -1)
        adv = torch.tensor([self.advantages[item[:3]] for item in batch.items])
        terms = ppo_clip_loss(
            pair_logp[0] - pair_logp[1],
            pair_old[0] - pair_old[1],
            adv.to(logp.device),
            dims=math.prod(self.trajectories[0].latents.shape[2:]),
            clip_range=self.config.clip_range,
            reduction=self.config.reduction,
        )
        return {
            "loss": terms.loss,
            # the policy moved the pair toward its winner
            "accuracy": (terms.log_ratio > 0).float(),
            "clipfrac": terms.clipped.float(),
            "approx_kl": 0.5 * terms.log_ratio**2,
        }

    def summary(self) -> dict:
        return reward_summary(self.examples)
