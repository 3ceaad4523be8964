"""DDPO, the reward-model baseline: PPO-clip on the same recorded trajectories.

DDPO (Black et al. 2023, the importance-sampling variant) needs a scalar reward per image
where D3PO needs only which image of a grid was best and worst. For image i of prompt p and
denoising step t:

    A_i = clip((r_i − mean_p) / (std_p + 1e−6), −a, a)          per-prompt normalised reward
    ρ   = π_θ(x_{t−1}|x_t) / π_old(x_{t−1}|x_t)                  π_old: recorded while sampling
    L   = max(−A_i ρ, −A_i clip(ρ, 1−ε, 1+ε))

As in the official code, log ρ is taken per latent dimension (``reduction="mean"``) so ε is
small (1e−4). Prompts with fewer than ``min_group`` images in the round are normalised with the
round's overall statistics. The UNet calls, LoRA handling, accelerate and cancel-with-restore
are the D3PO trainer's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from accelerate import Accelerator

from .d3po import Reduction, select_steps
from .models import LoraSettings
from .sampling import Trajectory
from .trainer import (
    Batch,
    NoPicksError,
    ProgressEvent,
    RoundResult,
    RoundSettings,
    log_probs_of,
    make_accelerator,
    make_batches,
    optimize,
    peak_memory_mb,
    train_adapter,
)


@dataclass
class DDPOConfig(RoundSettings):
    """Settings of one DDPO round (the official code's choices where they apply).

    clip_range: PPO's ε on the per-dimension ratio.
    adv_clip: advantages are clipped to [−adv_clip, adv_clip].
    reduction: "mean" (per-dimension log-ratio, as the official code) or "sum".
    min_group: a prompt needs this many images in the round for its own mean and std.
    learning_rate: 3e-3, the best of 3e-4 / 1e-3 / 3e-3 in bench/ablation.py (LoRA rank 4 on
        the embedded model; PPO's small ε keeps the steps small).
    Other fields as in :class:`~d3po_core.trainer.D3POConfig`.
    """

    learning_rate: float = 3e-3
    clip_range: float = 1e-4
    adv_clip: float = 5.0
    reduction: Reduction = "mean"
    min_group: int = 2
    timestep_fraction: float = 1.0
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 4
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict:
        return {"method": "ddpo", **asdict(self)}

    def validate(self) -> None:
        if not 0 < self.clip_range < 1:
            raise ValueError(f"clip_range must be in (0, 1), not {self.clip_range}")
        if self.adv_clip <= 0:
            raise ValueError(f"adv_clip must be > 0, not {self.adv_clip}")
        super().validate()
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {self.reduction!r}")


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
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
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


def build_items(
    examples: list[RewardExample], config: DDPOConfig
) -> tuple[list[tuple[int, int, int]], dict[tuple[int, int], float]]:
    """All (example, image, step) items and the advantage of each (example, image)."""
    rewards, prompts, keys = [], [], []
    for e, ex in enumerate(examples):
        if ex.trajectory.settings.eta <= 0:
            raise ValueError("grids sampled with eta = 0 have no log-probs; sample with eta > 0")
        if len(ex.rewards) != ex.trajectory.n:
            raise ValueError(f"grid {e} has {ex.trajectory.n} images but {len(ex.rewards)} rewards")
        for i, r in enumerate(ex.rewards):
            if not math.isfinite(r):
                raise ValueError(f"reward of image {i} of grid {e} is not finite: {r}")
            rewards.append(r)
            prompts.append(ex.trajectory.prompt)
            keys.append((e, i))
    adv = normalized_advantages(rewards, prompts, clip=config.adv_clip, min_group=config.min_group)
    advantages = dict(zip(keys, adv.tolist(), strict=True))
    generator = torch.Generator().manual_seed(config.seed)
    items = []
    for e, i in keys:
        steps = examples[e].trajectory.timesteps.numel()
        for k in select_steps(steps, config.timestep_fraction, generator):
            items.append((e, i, k))
    return items, advantages


def run_ddpo_round(
    pipe,
    examples: list[RewardExample],
    config: DDPOConfig | None = None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> RoundResult:
    """Train the pipeline's LoRA adapter with DDPO on rewarded grids for one round.

    π_old is the policy that sampled the grids (their recorded log-probs), so sample the
    round's grids with the adapter as it stands. Restores the adapter on cancel or error.
    """
    config = config or DDPOConfig()
    config.validate()
    if not examples:
        raise NoPicksError("no rewarded grids to train on")

    def train(params: list[torch.nn.Parameter]) -> RoundResult:
        return _train(pipe, examples, config, params, on_progress, should_cancel, accelerator)

    return train_adapter(pipe, config, train)


def _train(pipe, examples, config, params, on_progress, should_cancel, accelerator) -> RoundResult:
    start = time.perf_counter()
    unet = pipe.unet
    device = unet.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    accelerator = accelerator or make_accelerator(config, unet)
    items, advantages = build_items(examples, config)
    trajectories = [ex.trajectory for ex in examples]
    batches = make_batches(trajectories, items, config.batch_size, config.seed)
    batches = batches[accelerator.process_index :: accelerator.num_processes] or batches[:1]
    dims = math.prod(trajectories[0].latents.shape[2:])

    def objective(batch: Batch) -> dict[str, torch.Tensor]:
        logp = log_probs_of(pipe, trajectories, batch.key, batch.items)
        old = torch.stack([trajectories[e].log_probs[i, k] for e, i, k in batch.items])
        adv = torch.tensor([advantages[(e, i)] for e, i, _k in batch.items])
        terms = ppo_clip_loss(
            logp,
            old.to(logp.device, logp.dtype),
            adv.to(logp.device),
            dims=dims,
            clip_range=config.clip_range,
            reduction=config.reduction,
        )
        return {
            "loss": terms.loss,
            # the policy moved each item the way its advantage asks
            "accuracy": (terms.log_ratio * adv.to(logp.device) > 0).float(),
            "clipfrac": terms.clipped.float(),
            "approx_kl": 0.5 * terms.log_ratio**2,
        }

    loop = optimize(
        pipe,
        batches,
        config,
        params,
        objective,
        accelerator=accelerator,
        start=start,
        on_progress=on_progress,
        should_cancel=should_cancel,
    )
    rewards = [r for ex in examples for r in ex.rewards]
    metrics = {
        "loss": sum(h["loss"] for h in loop.history) / len(loop.history),
        "loss_last": loop.history[-1]["loss"],
        "accuracy": float(loop.final["accuracy"].mean()),
        "clipfrac": float(loop.final["clipfrac"].mean()),
        "approx_kl": float(loop.final["approx_kl"].mean()),
        "reward_mean": float(np.mean(rewards)),
        "reward_std": float(np.std(rewards)),
        "grad_norm": loop.grad_norm,
        "seconds": time.perf_counter() - start,
        "peak_memory_mb": peak_memory_mb(device),
        "grids": len(examples),
        "items": len(items),
        "optimizer_steps": loop.optimizer_steps,
    }
    return RoundResult(metrics=metrics, history=loop.history)
