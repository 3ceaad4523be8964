"""The D3PO objective: a DPO loss on each denoising step of a preferred/dispreferred pair.

For a pair (w, l) from one grid and a denoising step t:

    Δ_t = β · [ (log π_θ(x^w_{t−1}|x^w_t) − log π_ref(x^w_{t−1}|x^w_t))
              − (log π_θ(x^l_{t−1}|x^l_t) − log π_ref(x^l_{t−1}|x^l_t)) ]
    L   = − log σ(Δ_t) + λβ · [max(0, −log-ratio of w's step) + max(0, −log-ratio of l's step)]

The loss and pair functions are pure tensor functions; :class:`D3POObjective` feeds them
log-probs summed over latent dimensions from the round loop (``d3po_core.rounds``). The
reference policy is the same UNet with its adapter disabled (or, as an option, the adapter as
the round starts), evaluated once before any update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SettingsError
from ..methods import PairMode, Reduction
from ..models import REFERENCE_WEIGHT, scaled_lora
from ..rounds import (
    Batch,
    Objective,
    log_probs_of,
    pair_rows,
    require_log_probs,
    select_steps,
)
from ..sampling import Trajectory


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
        raise SettingsError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    if ratio_clip is not None:
        if not 0 < ratio_clip < 1:
            raise SettingsError(f"ratio_clip must be in (0, 1), not {ratio_clip}")
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
        raise SettingsError(f"pick ({best}, {worst}) is outside a grid of {n}")
    pairs = [(best, worst)]
    if mode == "implied":
        others = [i for i in range(n) if i not in (best, worst)]
        pairs += [(best, o) for o in others] + [(o, worst) for o in others]
    elif mode != "best-worst":
        raise SettingsError(f"pairs must be 'best-worst' or 'implied', not {mode!r}")
    return pairs


def anchor_penalty(loss_w: torch.Tensor, loss_l: torch.Tensor, config) -> torch.Tensor:
    """The anchor's penalty on how much less likely than under the reference each image of a
    pair became (``loss_w``, ``loss_l``: positive is worse): each side's loss ("each"), or the
    pair's net loss ("pair"), where the dispreferred image may lose what the preferred gains."""
    if config.anchor_scope == "pair":
        return F.relu(loss_w + loss_l)
    return F.relu(loss_w) + F.relu(loss_l)


@dataclass
class Example:
    """One confirmed pick: a grid's trajectory and the indices of its best and worst image."""

    trajectory: Trajectory
    best: int
    worst: int
    pick_id: int | None = None
    #: the share of a round's noise draws this pick gets (read by KTO's items: with
    #: ``replay_spread`` each replayed pick gets less than 1; other objectives ignore it)
    share: float = 1.0


def pick_pairs(examples: list[Example], mode: PairMode) -> list[tuple[int, int, int]]:
    """(example, winner, loser) of every pair the examples' picks imply."""
    return [
        (e, win, lose)
        for e, ex in enumerate(examples)
        for win, lose in pairs_from_pick(ex.trajectory.n, ex.best, ex.worst, mode)
    ]


class D3POObjective(Objective):
    """(winner, loser, step) items of the picks, scored by the D3PO loss."""

    sides = 2

    empty_message = "no picks to train on: label some grids (best and worst) first"

    def items(self) -> list[tuple[int, int, int, int]]:
        """All (example, winner, loser, step) items of a round, steps drawn per pair."""
        require_log_probs(self.trajectories)
        generator = torch.Generator().manual_seed(self.config.seed)
        items = []
        for e, win, lose in pick_pairs(self.examples, self.config.pairs):
            steps = self.trajectories[e].timesteps.numel()
            for k in select_steps(steps, self.config.timestep_fraction, generator):
                items.append((e, win, lose, k))
        return items

    def _log_probs(self, pipe, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """log π of the winner and loser side of each item, in one UNet call."""
        return log_probs_of(pipe, self.trajectories, batch.key, pair_rows(batch.items)).chunk(2)

    def prepare(self, pipe, batches: list[Batch]) -> None:
        """Reference log-probs, once, before any update."""
        with scaled_lora(pipe.unet, REFERENCE_WEIGHT[self.config.reference]):
            for batch in batches:
                batch.cache["ref_w"], batch.cache["ref_l"] = self._log_probs(pipe, batch)

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        logp_w, logp_l = self._log_probs(pipe, batch)
        terms = d3po_loss(
            logp_w,
            batch.cache["ref_w"],
            logp_l,
            batch.cache["ref_l"],
            dims=self.latent_dims,
            beta=self.config.beta,
            reduction=self.config.reduction,
            ratio_clip=self.config.ratio_clip,
        )
        # DPO-Positive's penalty on both sides (see DiffusionDPOObjective): a recorded step of
        # either trajectory may not become less likely than under the reference
        loss_w, loss_l = -terms.log_ratio_w, -terms.log_ratio_l
        anchor = self.config.anchor * self.config.beta * anchor_penalty(loss_w, loss_l, self.config)
        return {
            "loss": terms.loss + anchor,
            "anchor": anchor,
            "accuracy": (terms.delta > 0).float(),
            "mean_delta": terms.delta,
            "kl": 0.25 * (terms.log_ratio_w**2 + terms.log_ratio_l**2),
        }

    def summary(self) -> dict:
        return {"picks": len(self.examples)}
