"""The round loop gives the same weights as the loop it replaced.

``tests/data/rounds_before_refactor.safetensors`` holds the LoRA weights and per-step losses of
a D3PO and a DDPO round made by the round code before it became one loop with objectives
(same tiny model, seeds, grids and settings as below; the D3PO round ends on a partial
accumulation group, the DDPO round on one of its defaults'). Both must still come out equal.
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


def _assert_same(pipe, result, before: dict, name: str) -> None:
    params = lora_parameters(pipe.unet)
    assert len(params) == sum(k.startswith(f"{name}.") and k[-1].isdigit() for k in before)
    for i, p in enumerate(params):
        torch.testing.assert_close(p.detach(), before[f"{name}.{i}"], rtol=1e-5, atol=1e-7)
    losses = [h["loss"] for h in result.history]
    assert losses == pytest.approx(before[f"{name}.loss"].tolist(), rel=1e-6, abs=1e-9)


def test_d3po_and_ddpo_rounds_match_the_loop_before_the_reshaping(tiny_eps):
    before = load_file(BEFORE)
    pipe = load_pipeline(tiny_eps, device="cpu")
    picks = [Example(t, best=i % 4, worst=(i + 1) % 4) for i, t in enumerate(_grids(pipe))]
    config = D3POConfig(epochs=2, batch_size=4, grad_accum=4, seed=3)
    torch.manual_seed(0)  # the adapter's initial weights as the loop before drew them
    add_lora(pipe.unet, config.lora)
    _assert_same(pipe, d3po_round(pipe, picks, config), before, "d3po")

    pipe = load_pipeline(tiny_eps, device="cpu")
    rewarded = [RewardExample(t, r) for t, r in zip(_grids(pipe), REWARDS, strict=True)]
    config = DDPOConfig(batch_size=8, seed=1)
    torch.manual_seed(0)
    add_lora(pipe.unet, config.lora)
    result = ddpo_round(pipe, rewarded, config)
    _assert_same(pipe, result, before, "ddpo")
