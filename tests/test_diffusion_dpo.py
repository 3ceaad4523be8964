"""Diffusion-DPO's noise levels (uniform by default, toward the noisy end with timestep_bias),
and Diffusion-KTO's per-image objective on the same picks."""

from __future__ import annotations

import torch

from d3po_core.methods import DiffusionDPOConfig, DiffusionKTOConfig
from d3po_core.models import remove_lora
from d3po_core.objectives import diffusion_dpo
from d3po_core.objectives.d3po import Example
from d3po_core.objectives.diffusion_dpo import DiffusionDPOObjective, KTOObjective, noise_level
from d3po_core.objectives.implicit import image_rewards
from d3po_core.rounds import Batch, run_round
from d3po_core.sampling import sample_grid
from d3po_core.session import Session
from d3po_core.workflow import train_round

from .conftest import FAST, circle_picks


def test_noise_levels_lean_toward_the_noisy_end():
    draws = {}
    for bias in (0.0, 2.0):
        gen = torch.Generator().manual_seed(0)
        draws[bias] = torch.stack([noise_level(gen, 1000, bias) for _ in range(4000)]).double()
    gen = torch.Generator().manual_seed(0)
    plain = torch.stack([torch.randint(0, 1000, (), generator=gen) for _ in range(4000)])
    assert torch.equal(draws[0.0].long(), plain)  # bias 0: the paper's uniform draw, unchanged
    assert draws[2.0].min() >= 0 and draws[2.0].max() <= 999
    # t/T has density 3s²: mean 3/4, and 7/8 of the draws in the noisier half
    assert abs(draws[2.0].mean() / 1000 - 0.75) < 0.02
    assert abs((draws[2.0] >= 500).double().mean() - 0.875) < 0.02
    assert abs((draws[0.0] >= 500).double().mean() - 0.5) < 0.03


def _round_timesteps(pipe, examples, monkeypatch, **config) -> torch.Tensor:
    """The timesteps a one-epoch round's UNet calls noised its images to."""
    seen = []
    original = diffusion_dpo.denoising_error

    def recording(pipe, latents, noise, timesteps, cond):
        seen.append(torch.stack(timesteps))
        return original(pipe, latents, noise, timesteps, cond)

    monkeypatch.setattr(diffusion_dpo, "denoising_error", recording)
    objective = DiffusionDPOObjective(examples, DiffusionDPOConfig(epochs=1, **config))
    run_round(pipe, objective)
    return torch.cat(seen).double()


def test_a_round_trains_noisier_levels_with_the_bias(pipe, monkeypatch):
    grids = [sample_grid(pipe, "a red circle", FAST, seed=10 * i) for i in range(4)]
    examples = [Example(g.trajectory, best=0, worst=3) for g in grids]
    uniform = _round_timesteps(pipe, examples, monkeypatch, noise_draws=16)
    biased = _round_timesteps(pipe, examples, monkeypatch, noise_draws=16, timestep_bias=2.0)
    # 4 picks × 5 implied pairs × 16 draws, each pair's two images at one level, reference
    # (once) and policy: the same number of levels, drawn higher
    assert uniform.numel() == biased.numel() == 4 * 5 * 16 * 2 * 2
    assert biased.mean() > uniform.mean() + 150
    assert (biased >= 500).double().mean() > 0.8


def test_kto_ranks_the_best_images_above_the_worst(pipe, tmp_path):
    """Diffusion-KTO judges each image on its own, against the batch's mean reward: after a
    round its training draws are mostly on the right side of that reference point, and at
    fresh noise levels the picks' best images gain more than their worst."""
    remove_lora(pipe.unet)  # the picks from the base model, and a new adapter from seed 0
    with Session.open(tmp_path / "s") as session:
        new = circle_picks(pipe, session)
        config = DiffusionKTOConfig(epochs=4, batch_size=8, noise_draws=16, learning_rate=3e-3)
        items = KTOObjective(new, config).items()
        assert len(items) == 4 * 2 * 16  # best and worst, 16 noise levels each
        assert sorted(item[4] for item in items if item[3] == 0) == [-1] * 4 + [1] * 4
        _, metrics = train_round(pipe, session, config)
        rewards = image_rewards(pipe, new)
    assert metrics["accuracy"] > 0.65 and metrics["reference_point"] > 0  # 0.73 at β 5000
    assert rewards[:, 0].mean() > rewards[:, 1].mean()


def test_kto_judges_images_against_its_reference_point(monkeypatch):
    """A batch whose four images all got worse than under the reference: with "kl" the
    reference point stays at 0, so both desirable images lose and both undesirable ones win;
    with "mean" each is judged against the batch's mean reward, as it is."""
    items = [(0, 0, 0, 0, 1), (0, 1, 1, 0, 1), (0, 2, 2, 0, -1), (0, 3, 3, 0, -1)]
    batch = Batch(key=(), items=items, cache={"ref_1": torch.zeros(4)})
    errors = torch.tensor([1e-4, 4e-4, 2e-4, 5e-4])  # above the reference's: all worse
    reward = -1250 * errors  # β/2 = 1250: -0.125, -0.5, -0.25, -0.625; mean -0.375
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0])
    for point, z, right in (("kl", 0.0, [0, 0, 1, 1]), ("mean", -0.375, [1, 0, 0, 1])):
        objective = KTOObjective([], DiffusionKTOConfig(beta=2500.0, reference_point=point))
        monkeypatch.setattr(objective, "_errors", lambda pipe, batch: (errors,))
        terms = objective.terms(None, batch)
        margin = sign * (reward - z)
        assert torch.allclose(terms["reference_point"], torch.full((4,), z))
        assert torch.allclose(terms["loss"], 1 - torch.sigmoid(margin))
        assert terms["accuracy"].tolist() == right
