"""The engine's verbs over a session: generate, label, train, activate, export."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from d3po_core.errors import NoPicksError, SettingsError
from d3po_core.export import export_diffusers, export_kohya, export_picks
from d3po_core.methods import D3POConfig
from d3po_core.models import has_lora, load_pipeline
from d3po_core.sampling import sample_grid
from d3po_core.scorers import jpeg_compressibility
from d3po_core.session import Session
from d3po_core.settings import LoraSettings
from d3po_core.workflow import (
    activate,
    generate,
    label_with_scorer,
    load_trajectory,
    sync_active,
    train_round,
    unlabeled_grids,
)

from .conftest import FAST


@pytest.fixture
def session(tmp_path):
    with Session.open(tmp_path / "session") as s:
        yield s


def _label_two_grids(pipe, session):
    for seed in (1, 2):
        grid_id, _ = generate(pipe, session, "a red circle", FAST, seed=seed)
        label_with_scorer(session, grid_id, jpeg_compressibility)


def test_generate_stores_a_grid_whose_trajectory_reloads(pipe, session):
    grid_id, grid = generate(pipe, session, "  a red circle ", FAST, seed=4)
    stored = session.grid(grid_id)
    assert stored["prompt"] == "a red circle" and stored["seeds"] == [4, 5, 6, 7]
    traj = load_trajectory(session, grid_id)
    assert torch.equal(traj.log_probs, grid.trajectory.log_probs)
    assert torch.equal(traj.latents, grid.trajectory.latents)
    assert traj.settings == FAST
    assert unlabeled_grids(session) == [grid_id]
    with pytest.raises(SettingsError, match="prompt is empty"):
        generate(pipe, session, "   ", FAST)


def test_round_commits_adapter_and_metrics_then_needs_new_picks(pipe, session):
    _label_two_grids(pipe, session)
    assert unlabeled_grids(session) == []
    round_id, metrics = train_round(pipe, session, D3POConfig(epochs=1, batch_size=4))
    assert round_id == 1 and session.active_round == 1
    rounds = session.rounds_df()
    assert rounds.loc[0, "metric_picks"] == 2
    assert (session.round_path(1) / "pytorch_lora_weights.safetensors").is_file()
    with pytest.raises(NoPicksError, match="no new picks"):
        train_round(pipe, session, D3POConfig())
    with pytest.raises(NoPicksError, match="no new picks"):  # replay needs new picks too
        train_round(pipe, session, D3POConfig(replay=True))
    # replay adds as many earlier picks as there are new ones (all when fewer)
    grid_id, _ = generate(pipe, session, "a red circle", FAST, seed=3)
    label_with_scorer(session, grid_id, jpeg_compressibility)
    round_id, metrics = train_round(pipe, session, D3POConfig(epochs=1, batch_size=4, replay=True))
    assert round_id == 2 and metrics["picks"] == 2
    for seed in (4, 5, 6):
        grid_id, _ = generate(pipe, session, "a red circle", FAST, seed=seed)
        label_with_scorer(session, grid_id, jpeg_compressibility)
    _, metrics = train_round(pipe, session, D3POConfig(epochs=1, batch_size=4, replay=True))
    assert metrics["picks"] == 6  # 3 new + all 3 earlier


def test_activate_and_roll_back(pipe, tiny_eps, session):
    _label_two_grids(pipe, session)
    train_round(pipe, session, D3POConfig(epochs=2, batch_size=4, learning_rate=1e-2))
    tuned = sample_grid(pipe, "a circle", FAST, seed=3).trajectory.latents[:, -1]
    activate(pipe, session, None)
    assert session.active_round is None and not has_lora(pipe.unet)
    base = sample_grid(pipe, "a circle", FAST, seed=3).trajectory.latents[:, -1]
    assert not torch.allclose(tuned, base)
    fresh = load_pipeline(tiny_eps, device="cpu")
    session.set_active_round(1)
    sync_active(fresh, session)
    again = sample_grid(fresh, "a circle", FAST, seed=3).trajectory.latents[:, -1]
    torch.testing.assert_close(again, tuned, atol=1e-6, rtol=0)


def _plain_pipe(folder):
    plain = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    return plain


def _plain_latents(plain):
    return plain(
        "a red circle",
        num_inference_steps=FAST.steps,
        guidance_scale=FAST.guidance,
        eta=FAST.eta,
        generator=torch.Generator().manual_seed(8),
        output_type="latent",
    ).images


def test_exports_load_back_in_diffusers_with_the_same_images(pipe, tiny_eps, session, tmp_path):
    _label_two_grids(pipe, session)
    train_round(pipe, session, D3POConfig(epochs=2, batch_size=4, learning_rate=1e-2))
    lora_file = export_diffusers(session, 1, tmp_path / "lora")
    kohya_file = export_kohya(pipe.unet, tmp_path / "kohya.safetensors", base_model="tiny")

    keys = list(load_file(kohya_file))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(k.endswith(".lora_down.weight") for k in keys)
    assert any(k.endswith(".alpha") for k in keys)

    base = _plain_latents(_plain_pipe(tiny_eps))
    with_diffusers = _plain_pipe(tiny_eps)
    with_diffusers.load_lora_weights(lora_file.parent)
    a = _plain_latents(with_diffusers)
    with_kohya = _plain_pipe(tiny_eps)
    with_kohya.load_lora_weights(kohya_file)
    b = _plain_latents(with_kohya)
    assert not torch.allclose(a, base, atol=1e-4)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_exports_at_a_strength_draw_what_the_adapter_draws_at_it(pipe, tiny_eps, session, tmp_path):
    """Exported at strength 1.5 (the studio exports at the strength it samples at), either
    file loaded at weight 1 draws what the strength-1 file draws at weight 1.5 in diffusers;
    a strength below 0 is refused before anything is written."""
    _label_two_grids(pipe, session)
    train_round(pipe, session, D3POConfig(epochs=2, batch_size=4, learning_rate=1e-2))
    lora_file = export_diffusers(session, 1, tmp_path / "lora", strength=1.5)
    kohya_file = export_kohya(pipe.unet, tmp_path / "kohya.safetensors", strength=1.5)
    plain_file = export_diffusers(session, 1, tmp_path / "plain")

    weighted = _plain_pipe(tiny_eps)
    weighted.load_lora_weights(plain_file.parent, adapter_name="tuned")
    at_one = _plain_latents(weighted)
    weighted.set_adapters(["tuned"], adapter_weights=[1.5])
    expected = _plain_latents(weighted)
    assert not torch.allclose(expected, at_one, atol=1e-4)
    for exported in (lora_file.parent, kohya_file):
        loaded = _plain_pipe(tiny_eps)
        loaded.load_lora_weights(exported)  # s·B then A rounds otherwise than s·(BA): 1e-4
        torch.testing.assert_close(_plain_latents(loaded), expected, atol=1e-4, rtol=0)
    with pytest.raises(SettingsError, match="strength"):
        export_kohya(pipe.unet, tmp_path / "bad.safetensors", strength=-1)
    assert not (tmp_path / "bad.safetensors").exists()


def test_dora_adapter_exports_for_diffusers_and_kohya_refuses_it(pipe, tiny_eps, session, tmp_path):
    _label_two_grids(pipe, session)
    config = D3POConfig(epochs=2, batch_size=4, learning_rate=1e-2, lora=LoraSettings(dora=True))
    train_round(pipe, session, config)
    lora_file = export_diffusers(session, 1, tmp_path / "lora")
    with_diffusers = _plain_pipe(tiny_eps)
    with_diffusers.load_lora_weights(lora_file.parent)
    a = _plain_latents(with_diffusers)
    assert not torch.allclose(a, _plain_latents(_plain_pipe(tiny_eps)), atol=1e-4)
    # diffusers drops a kohya file's dora_scale (other images, no error): refused, no file
    with pytest.raises(SettingsError, match="DoRA adapter has no kohya form"):
        export_kohya(pipe.unet, tmp_path / "kohya.safetensors")
    assert not (tmp_path / "kohya.safetensors").exists()


def test_picks_export_parquet_and_jsonl(pipe, session, tmp_path):
    _label_two_grids(pipe, session)
    grid_id, _ = generate(pipe, session, "a blue square", FAST, seed=9)
    session.add_pick(grid_id, best=None, worst=None, kind="skip", labeler="ana")
    train_round(pipe, session, D3POConfig(epochs=1, batch_size=8))
    parquet = pd.read_parquet(export_picks(session, tmp_path / "picks.parquet"))
    assert len(parquet) == 3
    assert list(parquet["labeler"]) == ["scorer", "scorer", "ana"]
    trained = parquet["trained_round"].astype("Int64")
    assert list(trained[:2]) == [1, 1] and pd.isna(trained[2])  # a skip trains nothing
    first = parquet.iloc[0]
    assert first["best_image"] == list(first["images"])[first["best"]]
    lines = tmp_path / "picks.jsonl"
    export_picks(session, lines)
    rows = [json.loads(line) for line in lines.read_text().splitlines()]
    assert rows[2]["kind"] == "skip" and rows[2]["best"] is None
    assert rows[0]["prompt"] == "a red circle"
    with pytest.raises(SettingsError, match=".parquet or .jsonl"):
        export_picks(session, tmp_path / "picks.csv")


def test_fresh_draws_give_each_round_its_own_seed(pipe, session):
    """With fresh_draws a round trains on the train seed plus the rounds before it (its noise
    levels, steps and batch order its own); without, every round on the train seed."""
    seeds = {}
    for fresh in (True, False):
        activate(pipe, session, None)
        for _ in range(2):
            _label_two_grids(pipe, session)
            config = D3POConfig(epochs=1, batch_size=4, seed=5, fresh_draws=fresh)
            train_round(pipe, session, config)
        seeds[fresh] = list(session.rounds_df()["setting_seed"].iloc[-2:])
    assert seeds == {True: [5, 6], False: [5, 5]}
