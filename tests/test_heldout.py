"""Held-out agreement: how each round ranks the picks made after it, and the warnings on it."""

from __future__ import annotations

from d3po_core.methods import D3POConfig, DiffusionDPOConfig
from d3po_core.models import remove_lora
from d3po_core.objectives.implicit import image_rewards, pick_agreement
from d3po_core.session import Session
from d3po_core.session.reports import heldout_df, round_warnings
from d3po_core.workflow import generate, load_examples, train_round

from .conftest import FAST, circle_picks


def _round(session: Session, **metrics) -> int:
    """Commit a round with an empty adapter folder and the given metrics."""
    tmp = session.new_round_dir()
    (tmp / "adapter_model.safetensors").write_bytes(b"")
    return session.commit_round(tmp, settings={}, metrics=metrics, last_pick_id=0)


def _measured(round_id: int, agreement: float, kl: float, picks: int = 8) -> dict:
    return {
        "heldout_round": round_id,
        "heldout_agreement": agreement,
        "heldout_picks": picks,
        "kl": kl,
    }


def test_heldout_table_and_warnings(tmp_path):
    with Session.open(tmp_path / "s") as session:
        assert heldout_df(session).empty
        _round(session, kl=1.0)  # round 1: nothing measured yet
        _round(session, **_measured(1, 0.875, 1.5))  # round 2 measured round 1
        _round(session, **_measured(2, 0.5, 2.0))  # round 3: round 2 fell by 3 of 8
        _round(session, **_measured(3, 0.25, 2.5))  # round 4: round 3 at 2 of 8
        _round(session, **_measured(4, 0.375, 12.0))  # round 5: its KL jumped 4.8×
        _round(session, **_measured(5, 0.375, 13.0))  # round 6: 3 of 8, no fall: nothing
        _round(session, **_measured(6, 0.625, 14.0))  # round 7: 2 of 8 more: nothing
        _round(session, **_measured(7, 0.375, 15.0))  # round 8: 2 of 8 fewer: nothing
        df = heldout_df(session)
        assert df["round"].tolist() == [1, 2, 3, 4, 5, 6, 7]
        assert df["measured_by"].tolist() == [2, 3, 4, 5, 6, 7, 8]
        assert df["agreement"].tolist() == [0.875, 0.5, 0.25, 0.375, 0.375, 0.625, 0.375]

        assert round_warnings(session, 1) == ([], None)
        assert round_warnings(session, 2) == ([], None)  # nothing before round 1 to compare

        warnings, target = round_warnings(session, 3)
        assert target == 1
        assert len(warnings) == 1 and "fewer than round 1 (88%)" in warnings[0]
        assert "4 of your 8 new picks" in warnings[0] and "roll back to round 1" in warnings[0]
        assert "1 in 7 to 1 in 4 rounds flagged like this had lost ground" in warnings[0]

        warnings, target = round_warnings(session, 4)
        assert target == 2
        assert len(warnings) == 1 and "only 2 of your 8 new picks" in warnings[0]

        warnings, target = round_warnings(session, 5)
        assert target == 4
        assert len(warnings) == 1 and "5× as far from the base as round 4" in warnings[0]

        assert round_warnings(session, 6) == ([], None)
        assert round_warnings(session, 7) == ([], None)
        assert round_warnings(session, 8) == ([], None)


def test_agreement_is_none_on_the_base_model(pipe, tmp_path):
    with Session.open(tmp_path / "s") as session:
        for seed in (0, 4):
            grid_id, _ = generate(pipe, session, "a circle", FAST, seed=seed)
            session.add_pick(grid_id, best=0, worst=1)
        _, new, _ = load_examples(session)
        assert pick_agreement(pipe, new) is None
        round_id, metrics = train_round(pipe, session, D3POConfig(epochs=1, batch_size=4))
        assert "heldout_agreement" not in metrics  # the base model ranks nothing

        grid_id, _ = generate(pipe, session, "a circle", FAST, seed=8)
        session.add_pick(grid_id, best=2, worst=3)
        _, new, _ = load_examples(session)
        assert [ex.pick_id for ex in new] == [3]
        _, metrics = train_round(pipe, session, D3POConfig(epochs=1, batch_size=4))
        assert metrics["heldout_round"] == round_id
        assert metrics["heldout_picks"] == 1
        assert metrics["heldout_agreement"] in (0.0, 0.5, 1.0)
        assert heldout_df(session)["round"].tolist() == [round_id]


def test_implicit_reward_ranks_the_trained_picks(pipe, tmp_path):
    """After a round on them, the picks' best images get the higher implicit reward."""
    with Session.open(tmp_path / "s") as session:
        new = circle_picks(pipe, session)
        config = DiffusionDPOConfig(epochs=4, batch_size=8, noise_draws=8, learning_rate=1e-2)
        train_round(pipe, session, config)
        rewards = image_rewards(pipe, new)
        assert (rewards[:, 0] > rewards[:, 1]).all()
        assert pick_agreement(pipe, new) == {"agreement": 1.0, "picks": 4}


def test_anchor_keeps_the_worst_images_from_being_unlearned(pipe, tmp_path):
    """Diffusion-DPO buys part of its margin by denoising the worst images worse than the base
    (a negative implicit reward); the anchor penalty stops most of that, and the round still
    ranks every pick's best above its worst."""
    rewards, metrics = {}, {}
    for anchor in (0.0, 5.0):
        remove_lora(pipe.unet)  # the same picks from the base model in each session
        with Session.open(tmp_path / f"s{anchor}") as session:
            new = circle_picks(pipe, session)
            config = DiffusionDPOConfig(
                epochs=4, batch_size=8, noise_draws=8, learning_rate=1e-2, anchor=anchor
            )
            _, metrics[anchor] = train_round(pipe, session, config)
            rewards[anchor] = image_rewards(pipe, new)
    assert (rewards[0.0][:, 1] < 0).all()  # the worst images unlearned
    assert rewards[5.0][:, 1].mean() > rewards[0.0][:, 1].mean() / 4
    assert (rewards[5.0][:, 0] > rewards[5.0][:, 1]).all()
    assert metrics[5.0]["anchor"] > 0 and metrics[0.0]["anchor"] == 0
