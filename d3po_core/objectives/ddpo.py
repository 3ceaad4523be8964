"""DDPO, the reward-model baseline: PPO-clip on the same recorded trajectories.

DDPO (Black et al. 2023, the importance-sampling variant) needs a scalar reward per image
where D3PO needs only which image of a grid was best and worst. For image i of prompt p and
denoising step t:

    A_i = clip((r_i − mean_p) / (std_p + 1e−6), −a, a)          per-prompt normalised reward
    ρ   = π_θ(x_{t−1}|x_t) / π_old(x_{t−1}|x_t)                  π_old: recorded while sampling
    L   = max(−A_i ρ, −A_i clip(ρ, 1−ε, 1+ε))

As in the official code, log ρ is taken per latent dimension (``reduction="mean"``) so ε is
small (1e−4). Prompts with fewer than ``min_group`` images in the round are normalised with the
round's overall statistics. π_old is the policy that sampled the grids (their recorded
log-probs), so sample a round's grids with the adapter as it stands.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..errors import ScorerError, SettingsError
from ..methods import Reduction
from ..rounds import (
    Batch,
    Objective,
    recorded_log_probs,
    require_log_probs,
    sampling_policy_log_probs,
    select_steps,
)
from ..sampling import Trajectory


@dataclass
class RewardExample:
    """One sampled grid and a reward for each of its images."""

    trajectory: Trajectory
    rewards: list[float]


@dataclass
class PPOTerms:
    """Per-item terms: the loss, the log-ratio and whether the ratio was clipped."""

    loss: torch.Tensor
    log_ratio: torch.Tensor
    clipped: torch.Tensor


def ppo_clip_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    advantages: torch.Tensor,
    *,
    dims: int,
    clip_range: float,
    reduction: Reduction = "mean",
) -> PPOTerms:
    """PPO's clipped surrogate per item, from log-probs summed over ``dims`` latent dims."""
    log_ratio = logp - logp_old
    if reduction == "mean":
        log_ratio = log_ratio / dims
    elif reduction != "sum":
        raise SettingsError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    ratio = torch.exp(log_ratio)
    advantages = advantages.to(ratio.dtype)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return PPOTerms(
        loss=torch.maximum(unclipped, clipped),
        log_ratio=log_ratio,
        clipped=(ratio - 1.0).abs() > clip_range,
    )


def normalized_advantages(
    rewards: Sequence[float], prompts: Sequence[str], *, clip: float = 5.0, min_group: int = 2
) -> np.ndarray:
    """Rewards normalised per prompt ((r − mean) / (std + 1e−6)), then clipped to ±clip.

    A prompt with fewer than ``min_group`` rewards uses the mean and std of all rewards.
    """
    df = pd.DataFrame({"reward": np.asarray(rewards, dtype=np.float64), "prompt": list(prompts)})
    if df.empty:
        return np.zeros(0)
    grouped = df.groupby("prompt")["reward"]
    mean = grouped.transform("mean")
    std = grouped.transform(lambda r: r.std(ddof=0))
    small = grouped.transform("size") < min_group
    mean[small] = df["reward"].mean()
    std[small] = df["reward"].std(ddof=0)
    adv = (df["reward"] - mean) / (std + 1e-6)
    return adv.clip(-clip, clip).to_numpy()


def rewarded_advantages(
    examples: list[RewardExample], *, clip: float, min_group: int
) -> dict[tuple[int, int], float]:
    """The normalised advantage of each (example, image) of rewarded grids."""
    rewards, prompts, keys = [], [], []
    for e, ex in enumerate(examples):
        if len(ex.rewards) != ex.trajectory.n:
            raise ScorerError(
                f"grid {e} has {ex.trajectory.n} images but {len(ex.rewards)} rewards"
            )
        for i, r in enumerate(ex.rewards):
            if not math.isfinite(r):
                raise ScorerError(f"reward of image {i} of grid {e} is not finite: {r}")
            rewards.append(r)
            prompts.append(ex.trajectory.prompt)
            keys.append((e, i))
    adv = normalized_advantages(rewards, prompts, clip=clip, min_group=min_group)
    return dict(zip(keys, adv.tolist(), strict=True))


class RewardObjective(Objective):
    """What DDPO and P3O share: rewarded grids, PPO's clipped surrogate, reward metrics."""

    empty_message = "no rewarded grids to train on"

    def clipped_terms(
        self, logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Per-item PPO terms of log-probs against the sampling policy's, for advantages."""
        advantages = advantages.to(logp.device)
        terms = ppo_clip_loss(
            logp,
            logp_old.to(logp.device, logp.dtype),
            advantages,
            dims=self.latent_dims,
            clip_range=self.config.clip_range,
            reduction=self.config.reduction,
        )
        return {
            "loss": terms.loss,
            # the policy moved each item the way its advantage asks
            "accuracy": (terms.log_ratio * advantages > 0).float(),
            "clipfrac": terms.clipped.float(),
            "approx_kl": 0.5 * terms.log_ratio**2,
        }

    def summary(self) -> dict:
        rewards = [r for ex in self.examples for r in ex.rewards]
        return {
            "reward_mean": float(np.mean(rewards)),
            "reward_std": float(np.std(rewards)),
            "grids": len(self.examples),
        }


class DDPOObjective(RewardObjective):
    """(example, image, step) items of rewarded grids, scored by PPO's clipped surrogate."""

    def items(self) -> list[tuple[int, int, int]]:
        """All (example, image, step) items; advantages are computed on the way."""
        require_log_probs(self.trajectories)
        self.advantages = rewarded_advantages(
            self.examples, clip=self.config.adv_clip, min_group=self.config.min_group
        )
        generator = torch.Generator().manual_seed(self.config.seed)
        items = []
        for e, i in self.advantages:
            steps = self.trajectories[e].timesteps.numel()
            for k in select_steps(steps, self.config.timestep_fraction, generator):
                items.append((e, i, k))
        return items

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        logp = sampling_policy_log_probs(pipe, self.trajectories, batch.key, batch.items)
        old = recorded_log_probs(self.trajectories, batch.items)
        adv = torch.tensor([self.advantages[(e, i)] for e, i, _k in batch.items])
        return self.clipped_terms(logp, old, adv)
