"""The studio controller: the verbs every front end calls, and their bad-input messages."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from d3po_core.errors import D3POError, ModelLoadError, NoPicksError, RoundCancelled, SettingsError
from d3po_core.methods import D3POConfig
from d3po_core.models import default_model, has_lora
from d3po_core.settings import MAX_PROMPT_CHARS
from studio.controller import StudioController, StudioError

from .conftest import FAST


def _label(ctl, count=2, labeler="ana"):
    for i in range(count):
        view = ctl.generate("a red circle", seed=10 * i)
        ctl.pick(view.grid_id, best=i % 4, worst=(i + 1) % 4, labeler=labeler)


def test_generate_pick_undo_and_counter(ctl):
    view = ctl.generate("a red circle", 3, seed=5)
    assert len(view.images) == 3 and view.seeds == [5, 6, 7] and view.adapter_round is None
    ctl.pick(view.grid_id, 0, 2, labeler="ana")
    assert ctl.picks_since_last_round() == 1
    ctl.tie(view.grid_id, labeler="ben")
    ctl.skip(view.grid_id, labeler="ben")
    assert ctl.picks_since_last_round() == 1  # ties and skips train nothing
    ctl.undo("ana")
    assert ctl.picks_since_last_round() == 0
    assert list(ctl.picks()["kind"]) == ["tie", "skip"]


@pytest.mark.parametrize(
    "prompt,n,message",
    [
        ("", 4, "prompt is empty"),
        ("x" * (MAX_PROMPT_CHARS + 1), 4, "too long"),
        ("a circle", 1, "grid size must be between 2 and 16"),
        ("a circle", 17, "grid size must be between 2 and 16"),
    ],
)
def test_bad_generate_input_is_refused_and_nothing_is_stored(ctl, prompt, n, message):
    with pytest.raises(SettingsError, match=message):
        ctl.generate(prompt, n)
    assert ctl.session.grids_df().empty


def test_pick_must_name_two_images(ctl):
    view = ctl.generate("a circle", seed=1)
    with pytest.raises(SettingsError, match="two different"):
        ctl.pick(view.grid_id, 1, 1)
    with pytest.raises(D3POError, match="out of range|outside"):
        ctl.pick(view.grid_id, 0, 9)
    assert ctl.picks().empty


def test_train_on_zero_picks_is_a_clear_message(ctl):
    with pytest.raises(NoPicksError, match="label some grids"):
        ctl.train()


def test_train_compare_vote_activate_export(ctl, tmp_path):
    _label(ctl)
    events = []
    round_id, metrics = ctl.train(
        D3POConfig(epochs=2, batch_size=4, learning_rate=1e-2), on_progress=events.append
    )
    assert round_id == 1 and events and metrics["picks"] == 2
    assert ctl.picks_since_last_round() == 0
    assert ctl.generate("a circle", seed=3).adapter_round == 1

    base, tuned = ctl.compare(1, "a circle", [1, 2])
    assert len(base) == len(tuned) == 2
    assert not np.array_equal(np.asarray(base[0]), np.asarray(tuned[0]))
    pair = ctl.blind_pair(1, "a circle", seed=4)
    rates = ctl.vote(pair, "left" if pair.left_is == "b" else "right", labeler="ana")
    assert rates.loc[0, "wins"] == 1 and rates.loc[0, "win_rate"] == 1.0
    with pytest.raises(SettingsError, match="left, right or tie"):
        ctl.vote(pair, "up")

    assert ctl.export_lora(tmp_path / "lora").is_file()
    assert ctl.export_kohya(tmp_path / "k.safetensors").is_file()
    assert len(pd.read_parquet(ctl.export_picks(tmp_path / "p.parquet"))) == 2
    # the studio exports at the strength it last sampled at: up weights scaled, the rest as
    # trained (a grid drawn at 1.5 sets it; a failed one leaves it)
    with pytest.raises(SettingsError):
        ctl.generate("", settings=replace(FAST, strength=2.0))
    ctl.generate("a circle", settings=replace(FAST, strength=1.5), seed=5)
    assert ctl.sample_settings.strength == 1.5
    at_one = load_file(tmp_path / "k.safetensors")
    stronger = load_file(ctl.export_kohya(tmp_path / "k15.safetensors"))
    for key, value in at_one.items():
        torch.testing.assert_close(stronger[key], value * (1.5 if "lora_up" in key else 1.0))
    lora15 = load_file(ctl.export_lora(tmp_path / "lora15"))
    lora1 = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(lora15[k], v) for k, v in lora1.items())

    ctl.activate(None)  # roll back to the base model
    assert ctl.generate("a circle", seed=3).adapter_round is None
    with pytest.raises(StudioError, match="no active round"):
        ctl.export_lora(tmp_path / "lora2")


def test_cancel_from_another_thread_commits_nothing(ctl):
    _label(ctl)
    errors = []

    def on_progress(event):
        if event.step == 1:
            threading.Thread(target=ctl.cancel_training).start()

    def run():
        try:
            ctl.train(D3POConfig(epochs=50, batch_size=1), on_progress=on_progress)
        except RoundCancelled as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join(timeout=300)
    assert errors and ctl.session.last_round() is None
    assert ctl.picks_since_last_round() == 2  # the picks wait for the next round


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        StudioController(tmp_path / "s", model=str(tmp_path / "no-model"), device="cpu")


def test_corrupt_adapter_file_is_reported_and_nothing_lost(ctl):
    _label(ctl)
    ctl.train(D3POConfig(epochs=1, batch_size=8))
    ctl.activate(None)
    (ctl.session.round_path(1) / "pytorch_lora_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="corrupt or unreadable LoRA"):
        ctl.activate(1)
    assert len(ctl.picks()) == 2 and ctl.session.last_round() == 1


def test_out_of_memory_becomes_a_clear_message(ctl, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("d3po_core.workflow.sample_grid", oom)
    with pytest.raises(StudioError, match="out of GPU memory"):
        ctl.generate("a circle")
    assert ctl.session.grids_df().empty
    monkeypatch.undo()
    assert len(ctl.generate("a circle", seed=1).images) == FAST.n  # the lock was released


def test_two_tabs_picking_at_once_lose_and_duplicate_nothing(ctl):
    grids = [ctl.generate("a circle", seed=s).grid_id for s in (1, 2)]
    ids: list[int] = []

    def tab(grid_id, name):
        for _ in range(10):
            ids.append(ctl.pick(grid_id, 0, 1, labeler=name))

    threads = [
        threading.Thread(target=tab, args=(g, n))
        for g, n in zip(grids, ("ana", "ben"), strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    picks = ctl.picks()
    assert sorted(picks["id"]) == sorted(ids) and len(set(ids)) == 20
    assert picks.groupby("labeler").size().to_dict() == {"ana": 10, "ben": 10}


def test_switching_models_then_training_at_another_precision(ctl, tiny_v):
    _label(ctl)
    ctl.train(D3POConfig(epochs=1, batch_size=4))
    # the same architecture in bf16: the active round follows, and a round trains in bf16
    assert ctl.switch_model(str(tiny_v), dtype=torch.bfloat16) == f"Loaded {tiny_v}."
    assert ctl.active_round() == 1 and ctl.pipe.unet.dtype == torch.bfloat16
    _label(ctl)
    round_id, metrics = ctl.train(D3POConfig(epochs=1, batch_size=4, mixed_precision="bf16"))
    assert round_id == 2 and np.isfinite(metrics["loss"])
    # another architecture: its base model, and the line says why
    message = ctl.switch_model(None)
    assert "Round 2's adapter does not fit this model" in message and ctl.active_round() is None
    assert ctl.generate("a circle", seed=1).adapter_round is None
    # a folder that is not a model leaves the current one
    with pytest.raises(ModelLoadError):
        ctl.switch_model(str(tiny_v.parent / "missing"))
    assert ctl.model == str(default_model())


def test_reopening_a_session_whose_round_does_not_fit_the_model_says_so(ctl, tmp_path):
    first = ctl.session_root
    _label(ctl)
    ctl.train(D3POConfig(epochs=1, batch_size=4))
    assert ctl.switch_session(tmp_path / "other") == f"Opened {tmp_path / 'other'}."
    assert not has_lora(ctl.pipe.unet)  # the new session has no round: the base model samples
    ctl.switch_model(None)  # the embedded model: another architecture
    said = ctl.switch_session(first)
    assert (
        said == f"Opened {first}. Round 1's adapter does not fit this model, so the base is active."
    )
    # the session agrees with the pipeline: new grids are not credited to round 1
    assert ctl.active_round() is None
    assert ctl.generate("a circle", seed=1).adapter_round is None
