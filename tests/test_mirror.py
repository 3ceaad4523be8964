"""Rounds of several adapters (d3po_core/mirror.py): mirrored twins on the picks and on their
mirror image, half their difference in the pipeline; and ensembles, K adapters on the same picks
from their own seeds, their mean in the pipeline."""

from __future__ import annotations

import pytest
import torch

from d3po_core.errors import DamagedAdapter, SettingsError
from d3po_core.methods import DiffusionDPOConfig, DiffusionKTOConfig
from d3po_core.mirror import ENSEMBLE_FILE, MIRROR_FILE, combined, ensemble, read_twins
from d3po_core.models import lora_settings_of, remove_lora
from d3po_core.objectives.implicit import image_rewards
from d3po_core.rounds import RoundCancelled
from d3po_core.session import Session
from d3po_core.settings import LoraSettings
from d3po_core.workflow import activate, generate, load_examples, train_round

from .conftest import FAST, circle_picks


def adapter_delta_weights(unet) -> dict[str, torch.Tensor]:
    """Each adapted layer's weight change (peft's ``get_delta_weight``), by module name."""
    return {
        name: module.get_delta_weight("d3po").detach().clone()
        for name, module in unet.named_modules()
        if hasattr(module, "get_delta_weight") and "d3po" in getattr(module, "lora_A", {})
    }


def _config(**overrides) -> DiffusionKTOConfig:
    settings = {"mirror": True, "epochs": 2, "noise_draws": 4, "learning_rate": 1e-2}
    return DiffusionKTOConfig(**{**settings, **overrides})


def test_picks_made_the_other_way_train_the_opposite_adapter(pipe, tmp_path):
    """The round's adapter is odd in the labels: the same grids picked the other way round
    train exactly its negative."""
    deltas = {}
    # one session a direction; the same grids (seeded) and the same round seed
    for name, swap in (("a", False), ("b", True)):
        remove_lora(pipe.unet)
        with Session.open(tmp_path / name) as session:
            for seed in range(0, 16, 4):
                grid_id, _ = generate(pipe, session, "a circle", FAST, seed=seed)
                best, worst = (3, 0) if swap else (0, 3)
                session.add_pick(grid_id, best=best, worst=worst)
            events = []
            train_round(pipe, session, _config(), on_progress=events.append)
            assert lora_settings_of(pipe.unet).rank == 2 * LoraSettings().rank
            # one progress bar over both twins: steps rise once to the round's total
            steps = [e.step for e in events if e.phase == "train"]
            assert steps == sorted(steps) and steps[-1] == events[-1].total
            assert len(set(steps)) == len(steps) == events[-1].total
            deltas[name] = adapter_delta_weights(pipe.unet)
    assert deltas["a"].keys() == deltas["b"].keys()
    size = max(float(d.abs().max()) for d in deltas["a"].values())
    assert size > 1e-4  # the round moved the model
    for key, delta in deltas["a"].items():
        torch.testing.assert_close(deltas["b"][key], -delta, rtol=0, atol=1e-6 * size)


def test_a_mirrored_round_learns_the_picks_and_continues_its_twins(pipe, tmp_path):
    with Session.open(tmp_path / "s") as session:
        new = circle_picks(pipe, session)
        config = DiffusionDPOConfig(mirror=True, epochs=4, noise_draws=8, learning_rate=1e-2)
        first, metrics = train_round(pipe, session, config)
        assert metrics["mirror_loss"] > 0 and metrics["seconds"] > 0
        # the KL the warning reads is both twins' mean, the minus twin's kept beside it
        assert metrics["mirror_kl"] > 0 and metrics["kl"] != metrics["mirror_kl"]
        stored = session.rounds_df().iloc[-1]
        assert stored["metric_kl"] == pytest.approx(metrics["kl"])
        assert stored["metric_mirror_kl"] == pytest.approx(metrics["mirror_kl"])
        rewards = image_rewards(pipe, new)
        assert (rewards[:, 0] > rewards[:, 1]).all()  # each best above its worst

        folder = session.round_path(first)
        twins, settings = read_twins(folder)
        assert settings == LoraSettings()
        merged, _state = combined(twins, settings)
        assert merged.rank == 2 * settings.rank and merged.alpha == settings.alpha
        # the pipeline's adapter is the twins' half difference, as saved and as loaded
        activate(pipe, session, first)
        loaded = adapter_delta_weights(pipe.unet)
        for key in twins["plus"]:
            if "lora_A" not in key:
                continue
            b_key = key.replace("lora_A", "lora_B")
            half = 0.5 * (
                twins["plus"][b_key] @ twins["plus"][key]
                - twins["minus"][b_key] @ twins["minus"][key]
            )
            torch.testing.assert_close(loaded[key.removesuffix(".lora_A.weight")], half)

        for seed in (16, 20):  # a second round continues the twins
            grid_id, _ = generate(pipe, session, "a circle", FAST, seed=seed)
            session.add_pick(grid_id, best=0, worst=3)
        second, _ = train_round(pipe, session, config)
        after, _ = read_twins(session.round_path(second))
        moved = [(after["plus"][k] - v).abs().max() for k, v in twins["plus"].items()]
        assert max(moved) > 0


def test_a_mirrored_round_refuses_to_start_from_a_plain_one(pipe, tmp_path):
    with Session.open(tmp_path / "s") as session:
        circle_picks(pipe, session)
        plain, _ = train_round(pipe, session, _config(mirror=False))
        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=16)
        session.add_pick(grid_id, best=1, worst=2)
        before = adapter_delta_weights(pipe.unet)
        with pytest.raises(SettingsError, match="activate the base model"):
            train_round(pipe, session, _config())
        assert session.last_round() == plain
        assert not (session.round_path(plain) / MIRROR_FILE).exists()
        after = adapter_delta_weights(pipe.unet)
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert len(load_examples(session)[1]) == 1  # the new pick is still to train on


def test_a_cancelled_mirrored_round_leaves_the_adapter_as_it_was(pipe, tmp_path):
    with Session.open(tmp_path / "s") as session:
        circle_picks(pipe, session)
        first, _ = train_round(pipe, session, _config())
        before = adapter_delta_weights(pipe.unet)
        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=16)
        session.add_pick(grid_id, best=1, worst=2)
        calls = []

        def cancel_in_the_second_twin() -> bool:
            calls.append(1)
            return len(calls) > 3

        with pytest.raises(RoundCancelled):
            train_round(pipe, session, _config(), should_cancel=cancel_in_the_second_twin)
        assert session.last_round() == first
        after = adapter_delta_weights(pipe.unet)
        assert lora_settings_of(pipe.unet).rank == 8
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_mirror_takes_no_dora():
    with pytest.raises(SettingsError, match="plain LoRA"):
        DiffusionKTOConfig(mirror=True, lora=LoraSettings(dora=True))


def test_damaged_twins_stop_a_mirrored_round_with_a_clear_message(pipe, tmp_path):
    with Session.open(tmp_path / "s") as session:
        circle_picks(pipe, session)
        first, _ = train_round(pipe, session, _config())
        (session.round_path(first) / MIRROR_FILE).write_bytes(b"not safetensors")
        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=16)
        session.add_pick(grid_id, best=1, worst=2)
        with pytest.raises(DamagedAdapter, match="train without mirror, or activate the base"):
            train_round(pipe, session, _config())
        assert session.last_round() == first
        assert len(load_examples(session)[1]) == 1  # nothing lost: the pick waits
        activate(pipe, session, first)  # the round's own adapter still loads and samples
        assert lora_settings_of(pipe.unet).rank == 8


def _ensemble(k: int = 2, **overrides) -> DiffusionKTOConfig:
    """At the default step size: at 1e-2 a second round of these picks starts saturated."""
    return _config(mirror=False, ensemble=k, **{"learning_rate": 1e-3, **overrides})


def test_an_ensemble_round_samples_the_mean_of_its_members(pipe, tmp_path):
    """Each member is the plain round its own seed would train; the pipeline's adapter is
    their mean, as saved and as loaded; a second round continues the members."""
    plain = {}
    for seed in (0, 1):  # the same grids and picks, one plain round a seed
        remove_lora(pipe.unet)
        with Session.open(tmp_path / f"plain{seed}") as session:
            circle_picks(pipe, session)
            train_round(pipe, session, _ensemble(1, seed=seed))
            plain[seed] = adapter_delta_weights(pipe.unet)
    remove_lora(pipe.unet)
    with Session.open(tmp_path / "s") as session:
        circle_picks(pipe, session)
        events = []
        first, metrics = train_round(pipe, session, _ensemble(), on_progress=events.append)
        assert len(metrics["ensemble_losses"]) == 2 and metrics["seconds"] > 0
        # the round's loss is the members' mean, and so are its other figures (the KL warning's)
        assert metrics["loss"] == pytest.approx(sum(metrics["ensemble_losses"]) / 2)
        assert metrics["ensemble_losses"][0] != metrics["ensemble_losses"][1]
        assert session.rounds_df().iloc[-1]["metric_kl"] == pytest.approx(metrics["kl"])
        assert lora_settings_of(pipe.unet).rank == 2 * LoraSettings().rank
        steps = [e.step for e in events if e.phase == "train"]  # one bar over both members
        assert steps == sorted(steps) and steps[-1] == events[-1].total
        members, settings = read_twins(session.round_path(first), ensemble(2))
        assert not (session.round_path(first) / MIRROR_FILE).exists()
        activate(pipe, session, first)
        loaded = adapter_delta_weights(pipe.unet)
        scale = settings.alpha / settings.rank
        size = max(float(d.abs().max()) for d in loaded.values())
        assert size > 1e-4
        for key, delta in loaded.items():
            a, b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
            each = [scale * members[m][b] @ members[m][a] for m in ("m0", "m1")]
            torch.testing.assert_close(delta, (each[0] + each[1]) / 2)
            # member i is the plain round of seed i: same start, batches and noise draws
            for i in (0, 1):
                torch.testing.assert_close(each[i], plain[i][key], rtol=1e-4, atol=1e-6 * size)
        assert not torch.allclose(plain[0][key], plain[1][key])  # the seeds differ

        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=16)
        session.add_pick(grid_id, best=0, worst=3)
        with pytest.raises(SettingsError, match="kept 2 ensemble adapters and this round asks"):
            train_round(pipe, session, _ensemble(3))
        assert session.last_round() == first
        second, _ = train_round(pipe, session, _ensemble())
        after, _ = read_twins(session.round_path(second), ensemble(2))
        assert max(float((after["m1"][k] - v).abs().max()) for k, v in members["m1"].items()) > 0
        assert (session.round_path(second) / ENSEMBLE_FILE).exists()


def test_an_ensemble_refuses_dora_mirror_and_a_plain_start(pipe, tmp_path):
    with pytest.raises(SettingsError, match="plain LoRA"):
        _ensemble(lora=LoraSettings(dora=True))
    with pytest.raises(SettingsError, match="do not combine"):
        _config(ensemble=2)
    with pytest.raises(SettingsError, match="between 1 and 8"):
        _ensemble(0)
    remove_lora(pipe.unet)
    with Session.open(tmp_path / "s") as session:
        circle_picks(pipe, session)
        plain, _ = train_round(pipe, session, _config(mirror=False))
        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=16)
        session.add_pick(grid_id, best=1, worst=2)
        with pytest.raises(SettingsError, match="train without ensemble"):
            train_round(pipe, session, _ensemble())
        assert session.last_round() == plain
        assert len(load_examples(session)[1]) == 1  # the new pick is still to train on
