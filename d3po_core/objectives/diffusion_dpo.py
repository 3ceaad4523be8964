"""Diffusion-DPO, the noise-level preference loss, on the same stored picks.

Diffusion-DPO (Wallace et al., CVPR 2024) scores a preferred/dispreferred pair by how much
better the policy than the reference denoises each *final* image at a freshly drawn noise
level, rather than by the log-probs of the sampled denoising steps. For a pair (w, l) of one
grid's final latents, a timestep t ~ U[0, T) and one noise ε shared by both:

    e_θ(x) = ‖target(x, ε, t) − f_θ(√ᾱ_t x + √(1−ᾱ_t) ε, t, prompt)‖² / dims
    Δ      = −β/2 · [(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))]
    L      = −log σ(Δ) + λ·β/2 · [max(0, e_θ(w) − e_ref(w)) + max(0, e_θ(l) − e_ref(l))]

with target ε (or the velocity, for v-prediction models), the reference the base UNet (the
adapter disabled), evaluated once before any update, and λ the ``anchor`` weight (0 by
default: DPO-Positive's penalty, Pal et al. 2024, here on both images of the pair). Fresh noise
levels spread a pick's credit over the whole image instead of over the 20 noise draws that
happened to produce it. The UNet is called without guidance (the conditional branch), as in
the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import REFERENCE_WEIGHT, base_model, scaled_lora
from ..rounds import Batch, Objective, SettingsKey
from .d3po import anchor_penalty, pick_pairs
from .implicit import denoising_error, noised_prediction


def noise_level(
    gen: torch.Generator, num_train: int, bias: float, stratum: tuple[int, int] | None = None
) -> torch.Tensor:
    """A training timestep, 0-d: uniform over the schedule when ``bias`` is 0, else with
    t/T of density (1 + bias)·s^bias, toward the noisy end. ``stratum=(d, D)`` draws it from
    the d-th of D equal-probability slices of that density, so D draws cover it evenly."""
    if bias == 0 and stratum is None:
        return torch.randint(0, num_train, (), generator=gen)
    u = torch.rand((), generator=gen, dtype=torch.float64)
    if stratum is not None:
        u = (stratum[0] + u) / stratum[1]
    return (num_train * u ** (1.0 / (1.0 + bias))).long().clamp(max=num_train - 1)


class DiffusionDPOObjective(Objective):
    """(example, winner, loser, draw) items of the picks, scored by the noise-level loss."""

    sides = 2
    guided = False  # the conditional branch only, as in the paper

    empty_message = "no picks to train on: label some grids (best and worst) first"

    @property
    def _bias(self) -> float:
        """The noise levels' lean toward the noisy end (``timestep_bias``)."""
        return self.config.timestep_bias

    _stratified = False  # each draw's noise level uniform on its own (KTO: a setting)
    _reference = "base"  # the reference policy (KTO: a setting)

    def items(self) -> list[tuple[int, int, int, int]]:
        return [
            (e, win, lose, d)
            for e, win, lose in pick_pairs(self.examples, self.config.pairs)
            for d in range(self.config.noise_draws)
        ]

    def _errors(self, pipe, batch: Batch) -> tuple[torch.Tensor, ...]:
        """Denoising errors of each item's images (item[1], and item[2] when an item scores
        two: the winner, the loser), one tensor a side, in one UNet call; an item's (t, ε) is
        fixed by its index and the round's seed, so every pass sees the same ones and both
        sides share them."""
        sides = range(1, self.sides + 1)
        rows = [(item, item[side]) for side in sides for item in batch.items]
        return self._row_errors(pipe, batch.key, rows).chunk(len(sides))

    def _row_errors(self, pipe, key: SettingsKey, rows: list[tuple[tuple, int]]) -> torch.Tensor:
        """Denoising errors of (item, image) rows in one UNet call: image ``image`` of the
        item's grid, noised with the item's (t, ε)."""
        return denoising_error(pipe, *self._row_inputs(pipe, key, rows))

    def _row_inputs(self, pipe, key: SettingsKey, rows: list[tuple[tuple, int]]) -> tuple:
        """The arguments of :func:`denoising_error` for (item, image) rows."""
        num_train = pipe.scheduler.config.num_train_timesteps
        latents, noise, ts, cond, uncond = [], [], [], [], []
        # the grids' guidance; whether it applies is guided_model_output's rule, as in sampling
        guidance = key.guidance if self.guided else 1.0
        for item, image in rows:
            traj = self.trajectories[item[0]]
            final = traj.latents[:, -1]
            latents.append(final[image])
            eps, t = self._noise_draw(item, num_train)
            noise.append(eps)
            ts.append(t)
            cond.append(traj.cond[0])
            if self.guided and traj.uncond is not None:
                uncond.append(traj.uncond[0])
        return latents, noise, ts, cond, uncond or None, guidance

    def _noise_draw(self, item: tuple, num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The item's (ε, t): fixed by its noise key, so every pass sees the same ones."""
        final = self.trajectories[item[0]].latents[:, -1]
        gen = torch.Generator().manual_seed(hash(self._noise_key(item)) % 2**62)
        eps = torch.randn(final.shape[1:], generator=gen)
        slices = self.config.noise_draws if self._stratified else 0  # draw d from slice d
        stratum = (item[3], slices) if slices else None
        return eps, noise_level(gen, num_train, self._bias, stratum)

    def _noise_key(self, item: tuple) -> tuple:
        """What seeds an item's (t, ε): the round's seed, the pick, the images, the draw."""
        return (self.config.seed, item[0], item[1], item[2], item[3])

    def prepare(self, pipe, batches: list[Batch]) -> None:
        """The reference's errors, once, before any update: ``ref_1`` (the winner's, or the
        one image's) and ``ref_2`` (the loser's), a row an item."""
        with scaled_lora(pipe.unet, REFERENCE_WEIGHT[self._reference]):
            for batch in batches:
                for side, errors in enumerate(self._errors(pipe, batch), start=1):
                    batch.cache[f"ref_{side}"] = errors

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        err_w, err_l = self._errors(pipe, batch)
        gain_w = err_w - batch.cache["ref_1"]
        gain_l = err_l - batch.cache["ref_2"]
        half = 0.5 * self.config.beta
        delta = -half * (gain_w - gain_l)
        # DPO-Positive's idea on both sides: getting worse than the reference at either image
        # costs, so random or noisy picks cannot buy a margin by damaging what the model draws
        anchor = self.config.anchor * half * anchor_penalty(gain_w, gain_l, self.config)
        return {
            "loss": -F.logsigmoid(delta) + anchor,
            "anchor": anchor,
            "accuracy": (delta > 0).float(),
            "mean_delta": delta,
            # as D3PO's: the mean square of each side's β-scaled log-ratio estimate
            "kl": 0.25 * ((half * gain_w) ** 2 + (half * gain_l) ** 2),
            "error_w": err_w,
            "error_l": err_l,
        }

    def summary(self) -> dict:
        return {"picks": len(self.examples)}


class SFTObjective(DiffusionDPOObjective):
    """The plain diffusion loss on each pick's best image, the worst unused: fine-tuning
    toward what the labeler chose, with no reference. Items are (example, best, best, draw)."""

    sides = 1
    _bias = 0.0  # uniform noise levels: the plain diffusion loss

    def items(self) -> list[tuple[int, int, int, int]]:
        winners = sorted({(e, win) for e, win, _lose in pick_pairs(self.examples, "best-worst")})
        return [(e, win, win, d) for e, win in winners for d in range(self.config.noise_draws)]

    def prepare(self, pipe, batches: list[Batch]) -> None:
        """Nothing: the loss needs no reference."""

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        (err,) = self._errors(pipe, batch)
        return {"loss": err, "accuracy": torch.zeros_like(err), "error_w": err}


class KTOObjective(DiffusionDPOObjective):
    """Diffusion-KTO (Li et al., 2024) on the same picks: a per-image signal instead of a
    pair's. Each pick's best image is desirable and its worst undesirable; an image's implicit
    reward is r = −β/2·(e_θ − e_ref) at one noise level, and with z the batch's mean reward
    (detached, at least 0: KTO's estimate of the policy's KL from the reference)

        L = 1 − σ(r − z)  (desirable),   1 − σ(z − r)  (undesirable)

    so each image is judged against how far the model moved overall, not against its pair.
    With ``reference_point`` "grid", z is instead the mean reward of the image's own grid (all
    its images, at the image's noise level), a group baseline as in GRPO (Shao et al., 2024).
    Items are (example, image, image, draw, +1 desirable / −1 undesirable)."""

    sides = 1
    _bias = 0.0  # uniform noise levels, as in the paper

    @property
    def _stratified(self) -> bool:
        """Each image's draws cover the noise levels evenly (``noise_levels``)."""
        return self.config.noise_levels == "stratified"

    @property
    def _reference(self) -> str:
        """The policy an image's reward is measured against (``reference``)."""
        return self.config.reference

    @property
    def guided(self) -> bool:
        """Whether an image is judged by the sampler's guided prediction (``guided_loss``)."""
        return self.config.guided_loss

    def items(self) -> list[tuple[int, int, int, int, int]]:
        labeled = sorted(
            (e, image, sign)
            for e, ex in enumerate(self.examples)
            for image, sign in ((ex.best, 1), (ex.worst, -1))
        )
        draws = [max(1, round(self.config.noise_draws * ex.share)) for ex in self.examples]
        return [(e, image, image, d, sign) for e, image, sign in labeled for d in range(draws[e])]

    @property
    def _grid(self) -> bool:
        """Whether an image is judged against its own grid's mean reward (``reference_point``)."""
        return self.config.reference_point == "grid"

    def _noise_key(self, item: tuple) -> tuple:
        """With ``pair_noise``, or the grid as reference point, a pick's images share each
        draw's (t, ε)."""
        if self.config.pair_noise or self._grid:
            return (self.config.seed, item[0], -1, -1, item[3])
        return super()._noise_key(item)

    @torch.no_grad()
    def _grid_errors(self, pipe, batch: Batch) -> torch.Tensor:
        """Each item's grid's mean denoising error, every image of the grid noised with the
        item's (t, ε), a row an item; one set of UNet calls for the items of a (pick, draw),
        at most as many rows a call as the items' own."""
        groups: dict[tuple[int, int], tuple] = {}
        for item in batch.items:
            groups.setdefault((item[0], item[3]), item)
        sizes = [len(self.trajectories[item[0]].latents) for item in groups.values()]
        rows = [
            (item, image)
            for item, n in zip(groups.values(), sizes, strict=True)
            for image in range(n)
        ]
        size = max(1, len(batch.items))
        errors = torch.cat(
            [
                self._row_errors(pipe, batch.key, rows[i : i + size])
                for i in range(0, len(rows), size)
            ]
        )
        mean = dict(zip(groups, (part.mean() for part in errors.split(sizes)), strict=True))
        return torch.stack([mean[(item[0], item[3])] for item in batch.items])

    def rows_per_item(self) -> int:
        """An item's rows, and with ``preserve`` as many again for its unlabeled image."""
        return super().rows_per_item() * (2 if self.config.preserve > 0 else 1)

    def _kept_rows(self, pipe, batch: Batch) -> dict[int, tuple[tuple, int]]:
        """With ``preserve``, each item's row (by its place in the batch) of an image its pick
        left unlabeled, one of the grid's others by draw, noised with the item's (t, ε); none
        for an item of a 2-image grid, or one whose noise level is under ``preserve_from``."""
        rows: dict[int, tuple[tuple, int]] = {}
        if self.config.preserve <= 0:
            return rows
        num_train = pipe.scheduler.config.num_train_timesteps
        for i, item in enumerate(batch.items):
            if self.config.preserve_from > 0:
                _eps, t = self._noise_draw(item, num_train)
                if t < self.config.preserve_from * num_train:
                    continue
            ex = self.examples[item[0]]
            n = len(self.trajectories[item[0]].latents)
            others = [image for image in range(n) if image not in (ex.best, ex.worst)]
            if others:
                rows[i] = (item, others[item[3] % len(others)])
        return rows

    def _kept_prediction(self, pipe, batch: Batch) -> tuple[list[int], torch.Tensor] | None:
        """The UNet's prediction on the items' unlabeled images, and the items they belong to."""
        rows = self._kept_rows(pipe, batch)
        if not rows:
            return None
        inputs = self._row_inputs(pipe, batch.key, list(rows.values()))
        pred, _target = noised_prediction(pipe, *inputs)
        return list(rows), pred

    def prepare(self, pipe, batches: list[Batch]) -> None:
        """The reference's errors (``ref_1``); with the grid as reference point, its mean error
        over each item's grid at the item's draw (``ref_grid``); with ``preserve``, the base
        model's prediction on each item's unlabeled image (``base_kept``, a row an item, zero
        where it has none)."""
        super().prepare(pipe, batches)
        if self._grid:
            with scaled_lora(pipe.unet, REFERENCE_WEIGHT[self._reference]):
                for batch in batches:
                    batch.cache["ref_grid"] = self._grid_errors(pipe, batch)
        if self.config.preserve <= 0:
            return
        with torch.no_grad(), base_model(pipe.unet):
            for batch in batches:
                kept = self._kept_prediction(pipe, batch)
                if kept is None:
                    continue
                where, pred = kept
                full = pred.new_zeros((len(batch.items), *pred.shape[1:]))
                full[where] = pred
                batch.cache["base_kept"] = full

    def _preservation(self, pipe, batch: Batch, like: torch.Tensor) -> torch.Tensor:
        """preserve · β/2 · the mean square of the adapter's prediction on the item's unlabeled
        image minus the base model's: prior preservation (as DreamBooth's, on the labeler's own
        grids), so what the picks did not single out is drawn as the base draws it."""
        penalty = torch.zeros_like(like)
        kept = self._kept_prediction(pipe, batch) if "base_kept" in batch.cache else None
        if kept is None:
            return penalty
        where, pred = kept
        base = batch.cache["base_kept"][where].to(pred)
        gap = (pred - base).pow(2).flatten(1).mean(1)
        penalty[where] = self.config.preserve * 0.5 * self.config.beta * gap.to(like)
        return penalty

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        (err,) = self._errors(pipe, batch)
        half = 0.5 * self.config.beta
        reward = -half * (err - batch.cache["ref_1"])
        if self._grid:
            # the mean reward of the item's grid at its draw: what the grid's images share
            # (its prompt, its noise level) cancels, as a group baseline does
            z = -half * (self._grid_errors(pipe, batch) - batch.cache["ref_grid"])
        else:
            z = reward.mean().detach()
        if self.config.reference_point == "kl":
            z = z.clamp(min=0)
        sign = torch.tensor([item[4] for item in batch.items], dtype=reward.dtype)
        margin = sign.to(reward.device) * (reward - z)
        weight = torch.where(sign > 0, 1.0, self.config.undesirable_weight).to(reward)
        kept = self._preservation(pipe, batch, reward)
        return {
            "loss": weight * (1 - torch.sigmoid(margin)) + kept,
            "preservation": kept,
            "accuracy": (margin > 0).float(),
            "mean_delta": margin,
            "kl": 0.5 * reward**2,
            "reference_point": z.expand_as(reward),
        }
