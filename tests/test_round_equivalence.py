"""The round loop gives the same weights as the loop it replaced.

``tests/data/rounds_before_refactor.safetensors`` holds the LoRA weights and per-step losses of
a D3PO and a DDPO round made by the round code before it became one loop with objectives
(same tiny model, seeds, grids and settings as below; the D3PO round ends on a partial
accumulation group, the DDPO round on one of its defaults'). Both must still come out equal,
up to the float rounding of another CPU: the grids are sampled again, and a CPU with other
vector units sums in another order. Across the two development CPUs the weights differed by
0.2% of the distance the round moved them, the losses by 6e-6 of their value; a step more or
less, or a step size 10% off, moves the weights by 10% or more of that distance.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from d3po_core.methods import D3POConfig, DDPOConfig
from d3po_core.models import add_lora, load_pipeline, lora_parameters
from d3po_core.objectives.d3po import Example
from d3po_core.objectives.ddpo import RewardExample
from d3po_core.sampling import sample_grid

from .conftest import FAST, d3po_round, ddpo_round

BEFORE = Path(__file__).parent / "data" / "rounds_before_refactor.safetensors"
PROMPTS = ["a red circle", "a red circle", "a blue square"]
REWARDS = [[0.1, 0.5, 0.2, 0.9], [1.0, 0.3, 0.4, 0.2], [0.7, 0.1, 0.8, 0.3]]


def _grids(pipe):
    return [sample_grid(pipe, p, FAST, seed=10 * i).trajectory for i, p in enumerate(PROMPTS)]


def _adapter(pipe) -> list[torch.Tensor]:
    return [p.detach().clone() for p in lora_parameters(pipe.unet)]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum(((x - y).double() ** 2).sum() for x, y in zip(a, b, strict=True)) ** 0.5)


def _assert_same(pipe, result, before: dict, name: str, start: list[torch.Tensor]) -> None:
    """The round's weights within 1% of the distance the earlier loop moved them from
    ``start``, and its per-step losses to a relative 1e-4."""
    params = _adapter(pipe)
    assert len(params) == sum(k.startswith(f"{name}.") and k[-1].isdigit() for k in before)
    expected = [before[f"{name}.{i}"] for i in range(len(params))]
    assert _distance(params, expected) < 0.01 * _distance(expected, start)
    losses = [h["loss"] for h in result.history]
    assert losses == pytest.approx(before[f"{name}.loss"].tolist(), rel=1e-4, abs=1e-9)


def test_d3po_and_ddpo_rounds_match_the_loop_before_the_reshaping(tiny_eps):
    before = load_file(BEFORE)
    pipe = load_pipeline(tiny_eps, device="cpu")
    picks = [Example(t, best=i % 4, worst=(i + 1) % 4) for i, t in enumerate(_grids(pipe))]
    config = D3POConfig(epochs=2, batch_size=4, grad_accum=4, seed=3)
    torch.manual_seed(0)  # the adapter's initial weights as the loop before drew them
    add_lora(pipe.unet, config.lora)
    start = _adapter(pipe)
    _assert_same(pipe, d3po_round(pipe, picks, config), before, "d3po", start)

    pipe = load_pipeline(tiny_eps, device="cpu")
    rewarded = [RewardExample(t, r) for t, r in zip(_grids(pipe), REWARDS, strict=True)]
    config = DDPOConfig(batch_size=8, seed=1)
    torch.manual_seed(0)
    add_lora(pipe.unet, config.lora)
    start = _adapter(pipe)
    result = ddpo_round(pipe, rewarded, config)
    _assert_same(pipe, result, before, "ddpo", start)
