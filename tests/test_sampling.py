"""DDIM sampling with recorded trajectories and log-probs."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from d3po_core.models import load_pipeline
from d3po_core.sampling import (
    SampleSettings,
    guided_model_output,
    recompute_log_probs,
    sample_grid,
)

from .conftest import FAST


def _diffusers_latents(pipe, prompt, seeds, settings):
    return pipe(
        prompt,
        num_images_per_prompt=len(seeds),
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        eta=settings.eta,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
        output_type="latent",
    ).images


@pytest.mark.parametrize("fixture", ["tiny_eps", "tiny_v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_reproduces_diffusers_pipeline(request, fixture, eta):
    """Same seeds and scheduler settings give diffusers' own DDIM output (atol 1e-5).

    η = 0 is the deterministic DDIM path; with η = 1 diffusers draws each step's noise from the
    same per-image generators, so the stochastic path must match too.
    """
    pipe = load_pipeline(request.getfixturevalue(fixture), device="cpu")
    settings = replace(FAST, n=3, eta=eta, shared_noise=False)
    grid = sample_grid(pipe, "a blue square", settings, seeds=[11, 12, 13])
    expected = _diffusers_latents(pipe, "a blue square", [11, 12, 13], settings)
    torch.testing.assert_close(grid.trajectory.latents[:, -1], expected, atol=1e-5, rtol=0)


def test_recorded_log_probs_equal_normal_log_prob(pipe):
    """Each recorded log-prob is Normal(μ, σ).log_prob(x_{t−1}).sum(), with μ and σ from
    diffusers' own DDIMScheduler (μ = its step with zero noise, σ from its variance)."""
    grid = sample_grid(pipe, "a red circle", FAST, seed=5)
    traj = grid.trajectory
    sched = pipe.scheduler
    sched.set_timesteps(FAST.steps)
    n = traj.n
    cond = traj.prompt_embeds.expand(n, -1, -1)
    uncond = traj.negative_embeds.expand(n, -1, -1)
    for k, t in enumerate(traj.timesteps):
        x_t, x_prev = traj.latents[:, k], traj.latents[:, k + 1]
        with torch.no_grad():
            out = guided_model_output(pipe.unet, x_t, t.expand(n), cond, uncond, FAST.guidance)
        mean = sched.step(out, t, x_t, eta=FAST.eta, variance_noise=torch.zeros_like(x_t))
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        std = FAST.eta * sched._get_variance(t, prev_t) ** 0.5
        expected = (
            torch.distributions.Normal(mean.prev_sample.double(), std.double())
            .log_prob(x_prev.double())
            .flatten(1)
            .sum(1)
        )
        torch.testing.assert_close(traj.log_probs[:, k], expected, rtol=1e-6, atol=1e-3)


def test_reevaluating_stored_transitions_reproduces_log_probs(pipe):
    grid = sample_grid(pipe, "a green star", FAST, seed=9)
    again = recompute_log_probs(pipe, grid.trajectory)
    torch.testing.assert_close(again, grid.trajectory.log_probs, rtol=1e-6, atol=1e-3)


def test_grid_records_seeds_noise_and_settings(pipe):
    shared = sample_grid(pipe, "a circle", replace(FAST, shared_noise=True), seed=100)
    traj = shared.trajectory
    assert traj.seeds == [100, 101, 102, 103]
    assert len(shared.images) == 4 and shared.images[0].size == (32, 32)
    assert traj.latents.shape == (4, FAST.steps + 1, 4, 16, 16)
    assert traj.log_probs.shape == (4, FAST.steps)
    assert traj.timesteps.shape == (FAST.steps,)
    assert torch.equal(traj.latents[0, 0], traj.latents[3, 0])  # one shared x_T
    assert not torch.equal(traj.latents[0, -1], traj.latents[3, -1])  # different images
    independent = sample_grid(pipe, "a circle", FAST, seed=100)  # the default: x_T per image
    assert not torch.equal(
        independent.trajectory.latents[0, 0], independent.trajectory.latents[3, 0]
    )
    # an image is reproducible alone from its recorded seed (independent noise), up to the
    # float32 differences of a batch of 1 vs 4 through the UNet
    alone = sample_grid(pipe, "a circle", FAST, seeds=[102])
    torch.testing.assert_close(
        alone.trajectory.latents[0, -1], independent.trajectory.latents[2, -1], atol=1e-4, rtol=0
    )


def test_trajectory_round_trips_through_tensors(pipe):
    traj = sample_grid(pipe, "a circle", FAST, seed=1).trajectory
    from d3po_core.sampling import Trajectory

    back = Trajectory.from_tensors(traj.to_tensors(), traj.metadata())
    assert back.seeds == traj.seeds and back.settings == traj.settings
    assert torch.equal(back.log_probs, traj.log_probs)


def test_given_seeds_set_the_image_count_beyond_a_labeling_grid(pipe):
    # an evaluation batch may hold more images than a labeling grid (2 to 16)
    many = sample_grid(pipe, "a red circle", FAST, seeds=list(range(20)))
    assert len(many.images) == 20 and many.trajectory.n == 20
    assert many.trajectory.seeds == list(range(20))


def test_adapter_strength_scales_the_adapter_while_sampling(pipe):
    """``strength`` is the adapter's weight while sampling: 0 draws the base model's images,
    1 the adapter's, 2 the adapter's update twice over (further from the base than 1, the
    same way); inside ``base_model`` any strength draws the base; the adapter is left at 1."""
    from d3po_core.models import add_lora, base_model

    settings = replace(FAST, n=2)
    base = sample_grid(pipe, "a red circle", settings, seed=3).trajectory.latents[:, -1]
    add_lora(pipe.unet, seed=0)
    with torch.no_grad():  # a fresh adapter is the identity: give its B weights a value
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)

    def last(strength: float) -> torch.Tensor:
        grid = sample_grid(pipe, "a red circle", replace(settings, strength=strength), seed=3)
        return grid.trajectory.latents[:, -1]

    at1, at0, at2 = last(1.0), last(0.0), last(2.0)
    torch.testing.assert_close(at0, base)
    assert (at1 - base).abs().max() > 1e-3  # the adapter changes the images
    assert (at2 - base).norm() > (at1 - base).norm()
    assert (
        torch.nn.functional.cosine_similarity((at2 - base).flatten(), (at1 - base).flatten(), dim=0)
        > 0.5
    )
    with base_model(pipe.unet):
        torch.testing.assert_close(last(2.0), base)
    torch.testing.assert_close(last(1.0), at1)  # the adapter is back at full strength
    assert sample_grid(pipe, "a red circle", settings, seed=3).trajectory.settings.strength == 1
    # unless told otherwise the engine samples at the strength the taste benchmark chose
    default = replace(SampleSettings(), n=2, steps=FAST.steps, guidance=FAST.guidance)
    assert default.strength == 1.25
    drawn = sample_grid(pipe, "a red circle", default, seed=3).trajectory.latents[:, -1]
    torch.testing.assert_close(drawn, last(1.25))
