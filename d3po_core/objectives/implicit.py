"""The implicit reward of a tuned model, and held-out agreement with a labeler's picks.

A preference-tuned policy π_θ defines an implicit reward of an image x₀: log π_θ(x₀) −
log π_ref(x₀), how much more likely tuning made it. A diffusion model's log-likelihood is
estimated through its denoising errors (the ELBO), so the difference of the two models' errors
on noised copies of x₀ estimates the ratio:

    r(x₀) ≈ −E_{t, ε} [ e_θ(x₀, t, ε) − e_ref(x₀, t, ε) ]

with e the per-dimension squared error of the prediction (ε, or the velocity). Each pick's two
images share their (t, ε), and t is stratified over the schedule, which keeps the difference
of their rewards steady with few draws.

The log-ratio summed over the recorded denoising steps is another estimate, but on images the
policy drew itself it tracks how much the adapter steered each trajectory rather than the
outcome: on held-out picks it ranked 2 of 24 the way a contrast labeler did (docs/benchmarks.md
§5), where this one ranked 20 to 22.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..families import Cond
from ..models import base_model, has_lora
from ..sampling import guided_model_output


def denoising_error(pipe, *inputs, **options) -> torch.Tensor:
    """Per-item mean squared error of the UNet's prediction on noised latents, in one UNet
    call; the arguments as :func:`noised_prediction`'s."""
    pred, target = noised_prediction(pipe, *inputs, **options)
    return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)


def noised_prediction(
    pipe,
    latents: list[torch.Tensor],
    noise: list[torch.Tensor],
    timesteps: list[torch.Tensor],
    cond: list[Cond],
    uncond: list[Cond] | None = None,
    guidance: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's prediction on noised latents, in one call, and its target (the noise, or the
    velocity for v-prediction models), both in float32. Item i is ``latents[i]`` noised with
    ``noise[i]`` to ``timesteps[i]`` (a 0-d tensor), prompted by ``cond[i]`` (a trajectory's
    ``cond[0]``). The prediction is the conditional branch's, or with ``uncond`` rows and
    ``guidance`` > 1 the classifier-free guided one, as the sampler takes it."""
    device = pipe.unet.device
    latents, noise, timesteps = (
        torch.stack(part).to(device) for part in (latents, noise, timesteps)
    )
    cond = Cond.stack(cond).to(device)
    scheduler = pipe.scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    uncond = None if uncond is None else Cond.stack(uncond).to(device)
    pred = guided_model_output(pipe.unet, noisy, timesteps, cond, uncond, guidance)
    return pred, target.float()


def image_rewards(
    pipe, examples: list, *, draws: int = 16, seed: int = 0, batch_items: int = 32
) -> torch.Tensor:
    """The implicit reward of each pick's best and worst image, shape (picks, 2), averaged
    over ``draws`` noise levels (stratified t, one ε shared by the pick's two images)."""
    num_train = pipe.scheduler.config.num_train_timesteps
    items = [(e, d) for e in range(len(examples)) for d in range(draws)]
    rewards = torch.zeros(len(examples), 2, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(items), batch_items):
            chunk = items[start : start + batch_items]
            latents, noise, ts, cond = [], [], [], []
            for e, d in chunk:
                ex = examples[e]
                final = ex.trajectory.latents[:, -1]
                gen = torch.Generator().manual_seed(seed * 1_000_003 + e * 1009 + d)
                eps = torch.randn(final.shape[1:], generator=gen)
                t = int((d + torch.rand((), generator=gen).item()) / draws * num_train)
                latents += [final[ex.best], final[ex.worst]]
                noise += [eps, eps]
                ts += [torch.tensor(t)] * 2
                cond += [ex.trajectory.cond[0]] * 2
            args = (latents, noise, ts, cond)
            tuned = denoising_error(pipe, *args)
            with base_model(pipe.unet):
                base = denoising_error(pipe, *args)
            gain = (base - tuned).double().cpu().view(-1, 2)
            for (e, _d), g in zip(chunk, gain, strict=True):
                rewards[e] += g / draws
    return rewards


def pick_agreement(pipe, examples: list, *, draws: int = 16) -> dict[str, float] | None:
    """Held-out agreement: the share of picks whose best the adapter as it stands ranks above
    their worst by the implicit reward (a tie counts half), on picks it was not trained on.

    Returns ``{"agreement": share, "picks": n}``, or None with no adapter (the base model's
    implicit reward is 0 for every image) or no picks.
    """
    if not examples or not has_lora(pipe.unet):
        return None
    rewards = image_rewards(pipe, examples, draws=draws)
    margin = rewards[:, 0] - rewards[:, 1]
    wins = (margin > 0).double() + 0.5 * (margin == 0).double()
    return {"agreement": float(wins.mean()), "picks": len(examples)}
