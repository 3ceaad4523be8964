"""Damaged files never stop the user: a damaged database is named with how to go on; a round
leaves out a damaged trajectory's picks and trains on the rest; a damaged adapter of the
active round is set aside for the last whole round (or the base); ``check`` lists it all."""

from __future__ import annotations

import pytest

from d3po_core.__main__ import main as cli
from d3po_core.errors import NoPicksError, SessionError
from d3po_core.methods import D3POConfig
from d3po_core.models import LORA_WEIGHT_NAME, has_lora
from d3po_core.session import Session
from d3po_core.session.check import check_session
from d3po_core.workflow import generate, sync_active, train_round
from studio import views

from .conftest import FAST

ROUND = D3POConfig(epochs=1, batch_size=4, replay=False)


def _labeled_grids(pipe, session, seeds) -> list[int]:
    ids = []
    for seed in seeds:
        grid_id, _ = generate(pipe, session, "a red circle", FAST, seed=seed)
        session.add_pick(grid_id, best=0, worst=1, labeler="ana")
        ids.append(grid_id)
    return ids


def _damage(path) -> None:
    path.write_bytes(b"\x00not what was written" * 8)


def test_a_damaged_database_is_named_with_how_to_go_on(tmp_path, capsys):
    root = tmp_path / "s"
    Session.open(root).close()
    (root / "images" / "kept.png").write_bytes(b"x")
    _damage(root / "session.db")
    for name in ("session.db-wal", "session.db-shm"):
        (root / name).unlink(missing_ok=True)
    with pytest.raises(SessionError) as raised:
        Session.open(root)
    said = str(raised.value)
    assert "session.db is damaged" in said and "check --session" in said and "aside" in said

    code = cli(["label", "--session", str(root), "--scorer", "jpeg_compressibility"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "is damaged" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1

    code = cli(["check", "--session", str(root)])
    out = capsys.readouterr().out
    assert code == 1 and "database: 0 of 1 whole" in out and "1 file(s) in images/" in out

    # going on as the message says: the folder opens as a new session, the old files beside it
    (root / "session.db").rename(root / "session.db.damaged")
    with Session.open(root) as session:
        assert session.picks_df().empty
    assert (root / "images" / "kept.png").exists()


def test_a_round_leaves_out_a_damaged_trajectory_and_trains_on_the_rest(pipe, tmp_path, capsys):
    with Session.open(tmp_path / "s") as session:
        grids = _labeled_grids(pipe, session, (1, 2, 3))
        _damage(session.grid(grids[1])["trajectory_path"])
        events = []
        round_id, metrics = train_round(pipe, session, ROUND, on_progress=events.append)
        assert round_id == 1 and metrics["picks"] == 2
        said = [e.message for e in events if e.message]
        assert len(said) == 1 and f"grid {grids[1]}" in said[0] and "leaves it out" in said[0]
        assert metrics["damaged"] == said
        shown = views.round_saved(round_id, metrics)  # the Train tab's result keeps it
        assert f"**Left out:** The trajectory of grid {grids[1]}" in shown
        # every pick of that round is consumed: the damaged one cannot be trained later
        with pytest.raises(NoPicksError, match="no new picks"):
            train_round(pipe, session, ROUND)
        # when every new pick is on a damaged grid, the round says so and commits nothing
        (grid,) = _labeled_grids(pipe, session, (4,))
        _damage(session.grid(grid)["trajectory_path"])
        with pytest.raises(NoPicksError, match="damaged trajectory"):
            train_round(pipe, session, ROUND)
        assert session.last_round() == 1
    code = cli(["check", "--session", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 1 and "grids: 2 of 4 whole" in out and "rounds: 1 of 1 whole" in out
    assert f"grid {grids[1]}: the trajectory of grid {grids[1]}" in out
    assert "1 pick(s) cannot be trained on" in out


def test_a_damaged_active_adapter_gives_way_to_the_last_whole_round(pipe, tmp_path, capsys):
    root = tmp_path / "s"
    with Session.open(root) as session:
        for seeds in ((1, 2), (3, 4), (5, 6)):
            _labeled_grids(pipe, session, seeds)
            train_round(pipe, session, ROUND)
        assert session.active_round == 3
        _damage(session.round_path(3) / LORA_WEIGHT_NAME)
        (session.round_path(2) / LORA_WEIGHT_NAME).unlink()
    code = cli(["check", "--session", str(root)])
    out = capsys.readouterr().out
    assert code == 1 and "rounds: 1 of 3 whole" in out and "round 3 (active)" in out

    with Session.open(root) as session:
        said = sync_active(pipe, session)
        assert "round 3" in said and "round 2" in said and "round 1, the last whole one" in said
        assert session.active_round == 1 and has_lora(pipe.unet)
        assert sync_active(pipe, session) == ""  # said once: round 1 is whole
        grid_id, _ = generate(pipe, session, "a red circle", FAST, seed=9)  # the user goes on
        assert session.grid(grid_id)["adapter_round"] == 1
        _damage(session.round_path(1) / LORA_WEIGHT_NAME)
        said = sync_active(pipe, session)
        assert "base model is active" in said and session.active_round is None
        assert not has_lora(pipe.unet)


def test_the_studio_says_a_damaged_adapter_was_set_aside_once(pipe, tmp_path):
    """The page that opens first reads the notice; a reload reads "" (the session already
    points at the last whole round)."""
    from studio.controller import StudioController

    root = tmp_path / "s"
    with Session.open(root) as session:
        for seeds in ((1, 2), (3, 4)):
            _labeled_grids(pipe, session, seeds)
            train_round(pipe, session, ROUND)
        _damage(session.round_path(2) / LORA_WEIGHT_NAME)
    ctl = StudioController(root, pipe=pipe, sample_settings=FAST)
    try:
        first = ctl.take_notice()
        assert "round 2" in first and "round 1, the last whole one, is active now" in first
        assert ctl.take_notice() == ""
    finally:
        ctl.close()


def test_generate_on_a_damaged_active_adapter_warns_and_goes_on(tmp_path, capsys):
    from d3po_core.models import default_model, load_pipeline

    root = tmp_path / "s"
    pipe = load_pipeline(default_model(), device="cpu")
    with Session.open(root) as session:
        _labeled_grids(pipe, session, (1, 2))
        train_round(pipe, session, ROUND)
        _damage(session.round_path(1) / LORA_WEIGHT_NAME)
    args = ["generate", "--session", str(root), "--prompt", "a circle", "--steps", "2"]
    code = cli(args)
    err = capsys.readouterr().err
    assert code == 0 and "warning: the adapter of round 1" in err and "base model" in err
    with Session.open(root) as session:
        assert len(session.grids_df()) == 3 and session.active_round is None


def test_check_on_a_whole_session(pipe, tmp_path, capsys):
    with Session.open(tmp_path / "s") as session:
        _labeled_grids(pipe, session, (1, 2))
        train_round(pipe, session, ROUND)
    assert [f.whole for f in check_session(tmp_path / "s")] == [True, True, True, True]
    code = cli(["check", "--session", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert code == 0 and "everything is whole" in out and "grids: 2 of 2 whole" in out
    assert cli(["check", "--session", str(tmp_path / "none")]) == 2
    assert "no session at" in capsys.readouterr().err
