"""Diffusion-DPO's noise levels (uniform by default, toward the noisy end with timestep_bias),
and Diffusion-KTO's per-image objective on the same picks."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from types import SimpleNamespace

import torch

from d3po_core.families import Cond
from d3po_core.methods import DiffusionDPOConfig, DiffusionKTOConfig
from d3po_core.models import base_model, remove_lora
from d3po_core.objectives import diffusion_dpo
from d3po_core.objectives.d3po import Example
from d3po_core.objectives.diffusion_dpo import DiffusionDPOObjective, KTOObjective, noise_level
from d3po_core.objectives.implicit import image_rewards
from d3po_core.rounds import Batch, make_batches, run_round
from d3po_core.sampling import guided_model_output, sample_grid
from d3po_core.session import Session
from d3po_core.workflow import generate, load_examples, train_round

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

    def recording(pipe, latents, noise, timesteps, *conditioning):
        seen.append(torch.stack(timesteps))
        return original(pipe, latents, noise, timesteps, *conditioning)

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


def test_stratified_noise_levels_take_one_from_each_slice():
    """``stratum=(d, D)`` draws from the d-th of D equal-probability slices: uniform slices of
    the schedule at bias 0, slices of the biased density otherwise."""
    gen = torch.Generator().manual_seed(0)
    for d in range(20):
        for _ in range(50):
            t = int(noise_level(gen, 1000, 0.0, stratum=(d, 20)))
            assert 50 * d <= t < 50 * (d + 1)
    # at bias 2, t/T = s^(1/3): the first of 8 slices ends at (1/8)^(1/3) = 0.5
    biased = [int(noise_level(gen, 1000, 2.0, stratum=(0, 8))) for _ in range(200)]
    assert max(biased) < 500 and min(biased) >= 0


def _kto_draws(monkeypatch, config: DiffusionKTOConfig, items) -> tuple[list, list]:
    """The timesteps and noises a KTO objective draws for ``items`` (no UNet call)."""
    seen: dict[str, list] = {}

    def recording(pipe, latents, noise, timesteps, *conditioning):
        seen.update(noise=noise, timesteps=[int(t) for t in timesteps])
        return torch.zeros(len(latents))

    monkeypatch.setattr(diffusion_dpo, "denoising_error", recording)
    trajectory = SimpleNamespace(latents=torch.randn(4, 3, 4, 8, 8), cond=[SimpleNamespace()])
    objective = KTOObjective([], config)
    objective.trajectories = [trajectory]
    pipe = SimpleNamespace(
        scheduler=SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000))
    )
    objective._errors(pipe, Batch(key=(), items=items))
    return seen["timesteps"], seen["noise"]


def test_kto_noise_draws_per_image(monkeypatch):
    """By default a pick's best and worst image each draw their own (t, ε); with pair_noise
    they share each draw's, as a Diffusion-DPO pair does; with stratified noise levels an
    image's draws cover the schedule one slice each."""
    items = [(0, image, image, d, sign) for image, sign in ((0, 1), (3, -1)) for d in range(10)]
    ts, noise = _kto_draws(monkeypatch, DiffusionKTOConfig(noise_draws=10), items)
    assert ts[:10] != ts[10:] and not torch.equal(noise[0], noise[10])
    ts, noise = _kto_draws(monkeypatch, DiffusionKTOConfig(noise_draws=10, pair_noise=True), items)
    assert ts[:10] == ts[10:]
    assert all(torch.equal(noise[d], noise[10 + d]) for d in range(10))
    config = DiffusionKTOConfig(noise_draws=10, noise_levels="stratified")
    ts, _ = _kto_draws(monkeypatch, config, items)
    for image in (ts[:10], ts[10:]):
        assert [t // 100 for t in image] == list(range(10))


def test_kto_weighs_the_undesirable_images(monkeypatch):
    """undesirable_weight scales the worst images' loss and leaves the best images'."""
    items = [(0, 0, 0, 0, 1), (0, 1, 1, 0, -1)]
    batch = Batch(key=(), items=items, cache={"ref_1": torch.zeros(2)})
    errors = torch.tensor([-1e-4, 1e-4])
    losses = {}
    for weight in (1.0, 0.25):
        objective = KTOObjective([], DiffusionKTOConfig(undesirable_weight=weight))
        monkeypatch.setattr(objective, "_errors", lambda pipe, batch: (errors,))
        losses[weight] = objective.terms(None, batch)["loss"]
    assert losses[0.25][0] == losses[1.0][0] > 0
    assert torch.isclose(losses[0.25][1], 0.25 * losses[1.0][1]) and losses[1.0][1] > 0


def test_kto_reference_policies(pipe, tmp_path):
    """The reference errors a round caches: the base model's ("base"), the adapter's as the
    round starts ("previous": the first step's rewards are 0) or that adapter's at half
    strength ("halfway"), and the adapter is back at full strength after."""
    remove_lora(pipe.unet)
    with Session.open(tmp_path / "s") as session:
        examples = circle_picks(pipe, session)
        train_round(pipe, session, DiffusionKTOConfig(epochs=1, noise_draws=2))
        cached, errors = {}, []
        for reference in ("base", "halfway", "previous"):
            config = DiffusionKTOConfig(noise_draws=2, reference=reference)
            objective = KTOObjective(examples, config)
            batch = Batch(key=(), items=objective.items()[:8])
            with torch.no_grad():
                objective.prepare(pipe, [batch])
                cached[reference] = batch.cache["ref_1"]
                errors.append(objective._errors(pipe, batch)[0])  # the policy's, as it trains
    assert all(torch.allclose(e, errors[0]) for e in errors)  # full strength after each
    assert torch.allclose(cached["previous"], errors[0])
    assert not torch.allclose(cached["base"], errors[0])
    assert not torch.allclose(cached["halfway"], cached["base"])
    assert not torch.allclose(cached["halfway"], cached["previous"])


def test_kto_guided_loss_scores_the_sampler_s_guided_prediction(pipe):
    """guided_loss: an image's denoising error is that of the classifier-free guided
    prediction at its grid's guidance (5 in FAST), as the sampler denoises, at two UNet rows
    an item; off, that of the conditional branch alone."""
    remove_lora(pipe.unet)
    grids = [sample_grid(pipe, "a red circle", FAST, seed=10 * i) for i in range(2)]
    examples = [Example(g.trajectory, best=0, worst=3) for g in grids]
    errors, rows = {}, {}
    for guided in (False, True):
        objective = KTOObjective(examples, DiffusionKTOConfig(noise_draws=2, guided_loss=guided))
        (batch,) = make_batches(objective.trajectories, objective.items(), 8, 0)
        with torch.no_grad():
            (errors[guided],) = objective._errors(pipe, batch)
        rows[guided] = objective.rows_per_item()
    assert rows == {False: 1, True: 2}
    # the guided prediction by hand, for the first item
    e, image, _, d, _ = batch.items[0]
    traj = examples[e].trajectory
    gen = torch.Generator().manual_seed(hash(objective._noise_key(batch.items[0])) % 2**62)
    final = traj.latents[:, -1]
    eps = torch.randn(final.shape[1:], generator=gen)
    t = noise_level(gen, pipe.scheduler.config.num_train_timesteps, 0.0).view(1)
    noisy = pipe.scheduler.add_noise(final[image : image + 1], eps[None], t)
    with torch.no_grad():
        pred = guided_model_output(pipe.unet, noisy, t, traj.cond, traj.uncond, FAST.guidance)
    expected = float(((pred - eps) ** 2).mean())
    assert abs(float(errors[True][0]) - expected) < 1e-5 * max(expected, 1)
    assert abs(float(errors[False][0]) - expected) > 1e-3 * expected


def test_kto_grid_reference_point_is_the_mean_reward_of_the_image_s_grid(pipe, tmp_path):
    """reference_point "grid": an image is judged against the mean reward of all four images
    of its own grid, each noised with the image's (t, ε) (a pick's best and worst share it),
    the policy's error against the base's at the same draw; other picks' images play no part."""
    remove_lora(pipe.unet)
    with Session.open(tmp_path / "s") as session:
        examples = circle_picks(pipe, session)
        train_round(pipe, session, DiffusionKTOConfig(epochs=1, noise_draws=2))
    config = DiffusionKTOConfig(noise_draws=2, beta=2500.0, reference_point="grid")
    objective = KTOObjective(examples, config)
    (batch,) = make_batches(objective.trajectories, objective.items()[:12], 12, 0)
    with torch.no_grad():
        objective.prepare(pipe, [batch])
        terms = objective.terms(pipe, batch)
    num_train = pipe.scheduler.config.num_train_timesteps
    z = {}
    rows = zip(batch.items, terms["reference_point"], terms["mean_delta"], strict=True)
    for item, point, margin in rows:
        e, image, _, d, sign = item
        traj = examples[e].trajectory
        final = traj.latents[:, -1]
        gen = torch.Generator().manual_seed(hash((config.seed, e, -1, -1, d)) % 2**62)
        eps = torch.randn(final.shape[1:], generator=gen)
        t = noise_level(gen, num_train, 0.0).expand(len(final))
        noisy = pipe.scheduler.add_noise(final, eps.expand_as(final), t)
        cond = Cond.stack([traj.cond[0]] * len(final))
        errors = []
        for adapter in (True, False):
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if not adapter:
                    stack.enter_context(base_model(pipe.unet))
                pred = guided_model_output(pipe.unet, noisy, t, cond, None, 1.0)
            errors.append(((pred - eps) ** 2).flatten(1).mean(1))
        reward = -1250 * (errors[0] - errors[1])  # β/2: each image of the grid
        expected = float(reward.mean())
        # rewards are β/2 × differences of errors: float32 rounding of another batch's
        # layout gives ~2e-4 here, the grid's rewards spread over ~1
        assert abs(float(point) - expected) < 2e-3, (float(point), reward.tolist())
        assert abs(float(margin) - sign * (float(reward[image]) - expected)) < 4e-3
        z.setdefault((e, d), set()).add(round(float(point), 6))
    assert all(len(points) == 1 for points in z.values())  # one point a (pick, draw)
    assert len({next(iter(points)) for points in z.values()}) > 1  # not the batch's
    assert torch.allclose(terms["loss"], 1 - torch.sigmoid(terms["mean_delta"]))


def _kept_gap(pipe, examples) -> float:
    """The mean square of the adapter's prediction minus the base's on the picks' unlabeled
    images (1 and 2 of each 4-grid), at fixed noise levels."""
    gen = torch.Generator().manual_seed(7)
    gaps = []
    for ex in examples:
        final = ex.trajectory.latents[[1, 2], -1]
        eps = torch.randn(final.shape, generator=gen)
        t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (2,), generator=gen)
        noisy = pipe.scheduler.add_noise(final, eps, t)
        cond = Cond.stack([ex.trajectory.cond[0]] * 2)
        with torch.no_grad():
            tuned = guided_model_output(pipe.unet, noisy, t, cond, None, 1.0)
            with base_model(pipe.unet):
                base = guided_model_output(pipe.unet, noisy, t, cond, None, 1.0)
        gaps.append(float(((tuned - base) ** 2).mean()))
    return sum(gaps) / len(gaps)


def test_kto_preserve_holds_the_unlabeled_images_to_the_base(pipe, tmp_path):
    """preserve: each item also scores one of its grid's unlabeled images (by draw) at the
    item's (t, ε), preserve·β/2 × the mean square of the adapter's prediction minus the base's
    added to its loss; trained with it, a round moves the model less on those images."""
    gaps = {}
    for preserve in (0.0, 20.0):
        remove_lora(pipe.unet)
        with Session.open(tmp_path / f"s{preserve}") as session:
            examples = circle_picks(pipe, session)
            config = DiffusionKTOConfig(
                epochs=2, noise_draws=8, learning_rate=3e-3, preserve=preserve
            )
            train_round(pipe, session, config)
        gaps[preserve] = _kept_gap(pipe, examples)
    assert gaps[20.0] < 0.5 * gaps[0.0], gaps

    config = DiffusionKTOConfig(noise_draws=2, beta=2500.0, preserve=2.0)
    objective = KTOObjective(examples, config)
    assert (
        objective.rows_per_item()
        == 2 * KTOObjective(examples, DiffusionKTOConfig()).rows_per_item()
    )
    (batch,) = make_batches(objective.trajectories, objective.items()[:8], 8, 0)
    with torch.no_grad():
        objective.prepare(pipe, [batch])
        terms = objective.terms(pipe, batch)
    num_train = pipe.scheduler.config.num_train_timesteps
    levels = []
    for item, penalty in zip(batch.items, terms["preservation"], strict=True):
        e, image, _, d, _sign = item
        kept = [1, 2][d % 2]  # best 0 and worst 3 labeled: the others by draw
        traj = examples[e].trajectory
        gen = torch.Generator().manual_seed(hash((config.seed, e, image, image, d)) % 2**62)
        final = traj.latents[kept : kept + 1, -1]
        eps = torch.randn(final.shape[1:], generator=gen)
        t = noise_level(gen, num_train, 0.0).expand(1)
        noisy = pipe.scheduler.add_noise(final, eps.expand_as(final), t)
        cond = Cond.stack([traj.cond[0]])
        with torch.no_grad():
            tuned = guided_model_output(pipe.unet, noisy, t, cond, None, 1.0)
            with base_model(pipe.unet):
                base = guided_model_output(pipe.unet, noisy, t, cond, None, 1.0)
        expected = 2.0 * 1250 * float(((tuned - base) ** 2).mean())
        assert expected > 0 and abs(float(penalty) - expected) < 1e-3 * expected + 1e-6
        levels.append(int(t))
    plain = 1 - torch.sigmoid(terms["mean_delta"])
    assert torch.allclose(terms["loss"], plain + terms["preservation"])

    # preserve_from: the same penalty on the items noised at t/T ≥ 0.5, none on the others
    high = torch.tensor([t >= num_train // 2 for t in levels])
    assert high.any() and not high.all(), levels
    objective = KTOObjective(examples, replace(config, preserve_from=0.5))
    (batch,) = make_batches(objective.trajectories, objective.items()[:8], 8, 0)
    with torch.no_grad():
        objective.prepare(pipe, [batch])
        upper = objective.terms(pipe, batch)
    assert torch.equal(upper["preservation"] > 0, high)
    assert torch.allclose(upper["preservation"][high], terms["preservation"][high], rtol=1e-4)
    assert torch.allclose(upper["loss"], plain + upper["preservation"], rtol=1e-4)


def test_kto_replay_spread_trains_every_earlier_pick_at_replay_s_cost(pipe, tmp_path):
    """Replay draws as many earlier picks as new ones; spread replays every earlier pick,
    each on its share of the noise draws, so a round has the same items and leaves none out."""
    remove_lora(pipe.unet)
    with Session.open(tmp_path / "s") as session:
        first = circle_picks(pipe, session)  # 4 picks
        train_round(pipe, session, DiffusionKTOConfig(epochs=1, batch_size=8, noise_draws=1))
        for seed in (20, 24):
            grid_id, _ = generate(pipe, session, "a square", FAST, seed=seed)
            session.add_pick(grid_id, best=1, worst=2)
        drawn, new, _ = load_examples(session, replay=True, seed=0)
        spread, new_too, _ = load_examples(session, replay=True, spread=True, seed=0)
    remove_lora(pipe.unet)
    earlier = {ex.pick_id for ex in first}
    assert [ex.pick_id for ex in new] == [ex.pick_id for ex in new_too] and len(new) == 2
    assert len(drawn) == 4 and len(earlier & {ex.pick_id for ex in drawn}) == 2
    assert {ex.pick_id for ex in spread} == earlier | {ex.pick_id for ex in new}
    assert [ex.share for ex in spread] == [0.5] * 4 + [1.0] * 2
    config = DiffusionKTOConfig(noise_draws=16)
    items = {
        name: KTOObjective(exs, config).items()
        for name, exs in (("drawn", drawn), ("spread", spread))
    }
    assert len(items["spread"]) == len(items["drawn"]) == 4 * 2 * 16
    per_pick = [sum(item[0] == e for item in items["spread"]) for e in range(6)]
    assert per_pick == [16] * 4 + [32] * 2  # best and worst: 8 draws an earlier pick, 16 a new
