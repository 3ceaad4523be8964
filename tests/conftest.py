"""Shared fixtures: tiny random-weight pipeline folders laid out like hub checkpoints."""

from __future__ import annotations

import pytest
import torch

from d3po_core.methods import D3POConfig, DDPOConfig
from d3po_core.models import load_pipeline
from d3po_core.objectives.d3po import D3POObjective
from d3po_core.objectives.ddpo import DDPOObjective
from d3po_core.rounds import run_round
from d3po_core.sampling import SampleSettings
from d3po_core.tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline

from ._procs import REPO, free_port, repo_env, spawn_worker  # noqa: F401 (shared)

torch.set_num_threads(2)

# Few steps and small grids keep the CPU suite quick; the math is the same at any size. The
# adapter as trained (strength 1, as diffusers loads it): the default strength has its own tests.
FAST = SampleSettings(n=4, steps=4, guidance=5.0, eta=1.0, strength=1.0)


def d3po_round(pipe, examples, config=None, **kwargs):
    """One D3PO round through the round loop."""
    return run_round(pipe, D3POObjective(examples, config or D3POConfig()), **kwargs)


def circle_picks(pipe, session) -> list:
    """Four grids of "a circle" (seeds 0, 4, 8, 12), each picked best 0 and worst 3; their
    examples, as a round loads them."""
    from d3po_core.workflow import generate, load_examples

    for seed in range(0, 16, 4):
        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=seed)
        session.add_pick(grid_id, best=0, worst=3)
    return load_examples(session)[1]


def ddpo_round(pipe, examples, config=None, **kwargs):
    """One DDPO round through the round loop."""
    return run_round(pipe, DDPOObjective(examples, config or DDPOConfig()), **kwargs)


@pytest.fixture(scope="session")
def tiny_eps(tmp_path_factory):
    """An epsilon-prediction checkpoint whose saved scheduler is PNDM (as in SD 1.5)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-eps"), prediction_type="epsilon")


@pytest.fixture(scope="session")
def tiny_v(tmp_path_factory):
    """A v-prediction checkpoint with a DDIM scheduler (as in SD 2.x 768)."""
    return build_tiny_pipeline(
        tmp_path_factory.mktemp("tiny-v"), prediction_type="v_prediction", scheduler="ddim", seed=1
    )


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """An SDXL-architecture checkpoint (two text encoders, pooled embeddings, time ids)."""
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture
def pipe(tiny_eps):
    return load_pipeline(tiny_eps, device="cpu")


@pytest.fixture
def ctl(tmp_path, tiny_eps):
    """A studio controller on the tiny model and a fresh session."""
    from studio.controller import StudioController

    controller = StudioController(
        tmp_path / "s", model=str(tiny_eps), device="cpu", sample_settings=FAST
    )
    yield controller
    controller.close()
