"""A round: batching, progress, cancel, metrics, references, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from d3po_core.errors import NoPicksError, RoundCancelled, SettingsError
from d3po_core.methods import D3POConfig
from d3po_core.models import add_lora, lora_parameters, remove_lora
from d3po_core.objectives.d3po import D3POObjective, Example
from d3po_core.sampling import sample_grid

from .conftest import FAST, d3po_round


@pytest.fixture
def examples(pipe):
    grids = [sample_grid(pipe, "a red circle", FAST, seed=10 * i) for i in range(3)]
    return [Example(g.trajectory, best=i % 4, worst=(i + 1) % 4) for i, g in enumerate(grids)]


def _count_unet_rows(pipe):
    calls = []
    original = pipe.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    pipe.unet.forward = counting
    return calls


def _adapter_weights(pipe) -> torch.Tensor:
    """The LoRA's weights as one flat copy."""
    return torch.cat([p.detach().flatten() for p in lora_parameters(pipe.unet)])


def test_round_batches_pair_steps_through_few_unet_calls(pipe, examples):
    config = D3POConfig(epochs=2, batch_size=6)
    items = D3POObjective(examples, config).items()
    assert len(items) == 3 * FAST.steps  # one pair a pick, every step
    calls = _count_unet_rows(pipe)
    result = d3po_round(pipe, examples, config)
    batches = -(-len(items) // 6)
    # one reference pass + two epochs, each batch one UNet call of items × (w, l) × (cond, uncond)
    assert len(calls) == 3 * batches
    assert max(calls) == 6 * 2 * 2
    assert result.metrics["optimizer_steps"] == 2 * batches


def test_metrics_and_progress_events(pipe, examples):
    events = []
    result = d3po_round(
        pipe, examples, D3POConfig(epochs=2, batch_size=4), on_progress=events.append
    )
    assert [e.step for e in events] == list(range(1, len(events) + 1))
    assert events[-1].step == events[-1].total and events[-1].eta_s == 0
    for key in (
        "loss",
        "accuracy",
        "mean_delta",
        "grad_norm",
        "kl",
        "seconds",
        "peak_memory_mb",
        "picks",
        "items",
    ):
        assert key in result.metrics
    assert result.metrics["picks"] == 3
    assert 0.0 <= result.metrics["accuracy"] <= 1.0
    assert result.metrics["grad_norm"] > 0
    assert len(result.history) == len(events)


def test_training_lowers_the_loss_on_its_picks(pipe, examples):
    config = D3POConfig(epochs=6, batch_size=4, learning_rate=1e-3)
    result = d3po_round(pipe, examples, config)
    first = sum(h["loss"] for h in result.history[:3]) / 3
    last = sum(h["loss"] for h in result.history[-3:]) / 3
    assert last < first
    assert result.metrics["accuracy"] > 0.5


def test_a_first_round_is_the_same_whatever_ran_before(pipe, examples):
    """A first round's adapter is drawn from the round's seed, not from the process's random
    state: the same picks and settings train the same adapter, another seed another one."""
    trained = []
    for seed, before in ((0, 1), (0, 2), (1, 1)):
        remove_lora(pipe.unet)
        torch.manual_seed(before)  # whatever ran before in the process
        d3po_round(pipe, examples, D3POConfig(epochs=1, batch_size=4, seed=seed))
        trained.append(_adapter_weights(pipe))
    assert torch.equal(trained[0], trained[1])
    assert not torch.allclose(trained[0], trained[2])
    remove_lora(pipe.unet)
    state = torch.get_rng_state()
    add_lora(pipe.unet, seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global random state is left as it was


def test_a_round_with_ema_ends_on_the_moving_average_of_its_steps(pipe, examples, monkeypatch):
    """ema_decay d: the round ends on the exponential moving average of the adapter's weights
    after each optimizer step (diffusers' warm-up: decay min(d, (1 + k) / (10 + k)) at the
    k-th update after the first), not on the last step's weights."""
    remove_lora(pipe.unet)
    add_lora(pipe.unet, seed=0)
    after_steps = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        out = adamw_step(self, *args, **kwargs)
        after_steps.append(_adapter_weights(pipe))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = D3POConfig(epochs=2, batch_size=2, learning_rate=1e-2, ema_decay=0.5)
    result = d3po_round(pipe, examples, config)
    ended = _adapter_weights(pipe)
    assert len(after_steps) == result.metrics["optimizer_steps"] >= 4
    average = after_steps[0].clone()
    for k, weights in enumerate(after_steps[1:], start=1):
        decay = min(0.5, (1 + k) / (10 + k))
        average = decay * average + (1 - decay) * weights
    assert torch.allclose(ended, average, atol=1e-6)
    assert not torch.allclose(ended, after_steps[-1], atol=1e-4)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_a_round_takes_its_step_sizes_from_its_schedule(pipe, examples, monkeypatch, schedule):
    """lr_schedule: constant steps at the learning rate, or cosine: up from 0 over the first
    tenth of the optimizer steps, then down to 0 at the round's end; the history records the
    step size each update took."""
    taken = []
    adamw_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        taken.append(self.param_groups[0]["lr"])
        return adamw_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = D3POConfig(epochs=2, batch_size=2, learning_rate=1e-3, lr_schedule=schedule)
    result = d3po_round(pipe, examples, config)
    n = result.metrics["optimizer_steps"]
    assert len(taken) == n >= 10
    assert [h["lr"] for h in result.history] == pytest.approx(taken)
    if schedule == "constant":
        assert taken == pytest.approx([1e-3] * n)
        return
    warm = math.ceil(0.1 * n)
    expected = [1e-3 * k / warm for k in range(warm)] + [
        1e-3 * 0.5 * (1 + math.cos(math.pi * (k - warm) / (n - warm))) for k in range(warm, n)
    ]
    assert taken == pytest.approx(expected)
    assert taken[0] == 0 and max(taken) == pytest.approx(1e-3) and taken[-1] < 0.05 * 1e-3


def test_cancel_restores_the_adapter(pipe, examples):
    d3po_round(pipe, examples, D3POConfig(epochs=1, batch_size=4))
    before = [p.detach().clone() for p in lora_parameters(pipe.unet)]
    seen = []

    def cancel_after_two() -> bool:
        return len(seen) >= 2

    with pytest.raises(RoundCancelled):
        d3po_round(
            pipe,
            examples,
            D3POConfig(epochs=3, batch_size=2, learning_rate=1e-2),
            on_progress=seen.append,
            should_cancel=cancel_after_two,
        )
    assert len(seen) == 2
    for p, b in zip(lora_parameters(pipe.unet), before, strict=True):
        assert torch.equal(p, b)


def test_reference_previous_starts_at_zero_margin(pipe, examples):
    d3po_round(pipe, examples, D3POConfig(epochs=2, batch_size=4, learning_rate=1e-2))
    events = []
    d3po_round(
        pipe,
        examples,
        D3POConfig(epochs=1, batch_size=100, reference="previous"),
        on_progress=events.append,
    )
    # one batch: the policy is the reference when the loss is evaluated, so Δ = 0 exactly
    assert events[0].loss == pytest.approx(0.6931471805599453)


def test_no_picks_and_eta_zero_are_refused(pipe):
    with pytest.raises(NoPicksError, match="no picks"):
        d3po_round(pipe, [], D3POConfig())
    grid = sample_grid(pipe, "a circle", replace(FAST, eta=0.0), seed=1)
    with pytest.raises(SettingsError, match="eta = 0"):
        d3po_round(pipe, [Example(grid.trajectory, 0, 1)], D3POConfig())


def test_d3po_trains_on_grids_drawn_at_another_adapter_strength(pipe):
    """D3PO's log-ratios are the policy's and the reference's on the recorded steps, not the
    sampling policy's: a grid drawn at adapter strength 1.5 trains as any other."""
    grid = sample_grid(pipe, "a circle", replace(FAST, strength=1.5), seed=1)
    result = d3po_round(pipe, [Example(grid.trajectory, 0, 1)], D3POConfig())
    assert result.metrics["items"] > 0 and math.isfinite(result.metrics["loss"])


def test_bad_settings_are_refused(pipe, examples):
    with pytest.raises(SettingsError, match="beta"):
        d3po_round(pipe, examples, D3POConfig(beta=0))
    with pytest.raises(SettingsError, match="timestep fraction"):
        d3po_round(pipe, examples, D3POConfig(timestep_fraction=0))
    config = D3POConfig()
    config.epochs = 0  # changed after construction: the round checks again
    with pytest.raises(SettingsError, match="epochs"):
        d3po_round(pipe, examples, config)
