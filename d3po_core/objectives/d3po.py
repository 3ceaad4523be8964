"""The D3PO objective: a DPO loss on each denoising step of a preferred/dispreferred pair.

For a pair (w, l) from one grid and a denoising step t:

    Δ_t = β · [ (log π_θ(x^w_{t−1}|x^w_t) − log π_ref(x^w_{t−1}|x^w_t))
              − (log π_θ(x^l_{t−1}|x^l_t) − log π_ref(x^l_{t−1}|x^l_t)) ]
    L   = − log σ(Δ_t)

Pure tensor functions; the trainer feeds them log-probs summed over latent dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["mean", "sum"]
PairMode = Literal["best-worst", "implied"]


@dataclass
class D3POTerms:
    """Per-item loss terms: loss, the margin Δ and each side's (possibly clipped) log-ratio."""

    loss: torch.Tensor
    delta: torch.Tensor
    log_ratio_w: torch.Tensor
    log_ratio_l: torch.Tensor


def log_ratio(
    logp: torch.Tensor,
    logp_ref: torch.Tensor,
    *,
    dims: int,
    reduction: Reduction = "sum",
    ratio_clip: float | None = None,
) -> torch.Tensor:
    """log π_θ/π_ref per item from log-probs summed over ``dims`` latent dimensions.

    ``reduction="mean"`` divides by ``dims`` (the official code's per-dimension average).
    ``ratio_clip=ε`` clamps the ratio to [1−ε, 1+ε], which stops the gradient outside it
    (a trust region, as in the official code); None leaves it free.
    """
    ratio = logp - logp_ref
    if reduction == "mean":
        ratio = ratio / dims
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if ratio_clip is not None:
        if not 0 < ratio_clip < 1:
            raise ValueError(f"ratio_clip must be in (0, 1), not {ratio_clip}")
        ratio = ratio.clamp(math.log1p(-ratio_clip), math.log1p(ratio_clip))
    return ratio


def d3po_loss(
    logp_w: torch.Tensor,
    logp_ref_w: torch.Tensor,
    logp_l: torch.Tensor,
    logp_ref_l: torch.Tensor,
    *,
    dims: int,
    beta: float,
    reduction: Reduction = "sum",
    ratio_clip: float | None = None,
) -> D3POTerms:
    """The per-(pair, step) D3PO loss −log σ(Δ); average ``loss`` over items for the objective."""
    ratio_w = log_ratio(logp_w, logp_ref_w, dims=dims, reduction=reduction, ratio_clip=ratio_clip)
    ratio_l = log_ratio(logp_l, logp_ref_l, dims=dims, reduction=reduction, ratio_clip=ratio_clip)
    delta = beta * (ratio_w - ratio_l)
    return D3POTerms(
        loss=-F.logsigmoid(delta), delta=delta, log_ratio_w=ratio_w, log_ratio_l=ratio_l
    )


def pairs_from_pick(
    n: int, best: int | None, worst: int | None, mode: PairMode = "best-worst"
) -> list[tuple[int, int]]:
    """(winner, loser) index pairs that one best/worst pick on an n-grid implies.

    "best-worst" gives the one pair; "implied" adds (best, other) and (other, worst) for every
    other image: 2n−3 pairs. A tie or skip (best or worst missing, or equal) gives none.
    """
    if best is None or worst is None or best == worst:
        return []
    if not (0 <= best < n and 0 <= worst < n):
        raise ValueError(f"pick ({best}, {worst}) is outside a grid of {n}")
    pairs = [(best, worst)]
    if mode == "implied":
        others = [i for i in range(n) if i not in (best, worst)]
        pairs += [(best, o) for o in others] + [(o, worst) for o in others]
    elif mode != "best-worst":
        raise ValueError(f"pairs must be 'best-worst' or 'implied', not {mode!r}")
    return pairs


def select_steps(
    num_steps: int, fraction: float, generator: torch.Generator | None = None
) -> list[int]:
    """Indices of the denoising steps trained for one pair: all, or a random fraction."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep_fraction must be in (0, 1], not {fraction}")
    if fraction == 1:
        return list(range(num_steps))
    count = max(1, round(num_steps * fraction))
    return sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())
