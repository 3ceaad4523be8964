"""Labeling state on the server: clicks judged against what the tab shows now, never a stale
state; ignored, visibly, while the next grid loads."""

from __future__ import annotations

from studio.labeling import LOADING, Labeling


def _grid(ctl, seed=1) -> int:
    return ctl.generate("a red circle", seed=seed).grid_id


def test_best_then_worst_saves_and_clicks_while_loading_are_ignored(ctl):
    labeling = Labeling(ctl)
    first = _grid(ctl)
    labeling.showing("tab", first)
    assert labeling.select("tab", 1, "ana").message.startswith("Best: image 2")
    saved = labeling.select("tab", 3, "ana")
    assert saved.advance and saved.message.startswith("Saved pick 1 (best 2, worst 4)")
    assert LOADING in saved.message
    # keys pressed before the next grid shows: ignored, said, nothing saved
    for index in (0, 2):
        late = labeling.select("tab", index, "ana")
        assert (late.message, late.advance) == (LOADING, False)
    assert labeling.mark("tab", "tie", "ana").message == LOADING
    assert len(ctl.picks()) == 1
    labeling.showing("tab", _grid(ctl, seed=2))
    labeling.select("tab", 0, "ana")
    assert labeling.select("tab", 2, "ana").advance
    picks = ctl.picks()
    assert picks["grid_id"].tolist() == [first, first + 1]
    assert (picks["best"].tolist(), picks["worst"].tolist()) == ([1, 0], [3, 2])


def test_the_worst_must_differ_and_tabs_are_independent(ctl):
    labeling = Labeling(ctl)
    labeling.showing("a", _grid(ctl))
    labeling.showing("b", _grid(ctl, seed=5))
    labeling.select("a", 2, "ana")
    assert "click a different image" in labeling.select("a", 2, "ana").message
    # tab b's first click is its own best, not tab a's worst
    assert labeling.select("b", 0, "ben").message.startswith("Best: image 1")
    assert labeling.select("a", 0, "ana").advance
    assert ctl.picks()["labeler"].tolist() == ["ana"]


def test_a_failed_next_grid_asks_for_a_new_one_instead_of_relabeling(ctl):
    labeling = Labeling(ctl)
    assert labeling.select("tab", 0, "").message == "Generate a grid first."
    labeling.showing("tab", _grid(ctl))
    labeling.select("tab", 0, "")
    labeling.select("tab", 1, "")
    labeling.settled("tab")  # sampling the next grid failed
    assert labeling.select("tab", 0, "").message == "Generate a grid first."
    labeling.showing("tab", _grid(ctl, seed=9))
    assert labeling.mark("tab", "skip", "").advance
    assert ctl.picks()["kind"].tolist() == ["pick", "skip"]


def test_a_sampled_grid_counts_only_once_it_is_on_screen(ctl):
    labeling = Labeling(ctl)
    labeling.showing("tab", _grid(ctl))
    labeling.select("tab", 0, "")
    labeling.loading("tab")  # Generate clicked with a best pending
    assert labeling.select("tab", 1, "").message == LOADING
    labeling.arrived("tab", _grid(ctl, seed=3))  # sampled, not yet shown by the browser
    assert labeling.select("tab", 1, "").message == LOADING
    assert labeling.ready("tab") and not labeling.ready("tab")
    assert labeling.select("tab", 1, "").message.startswith("Best: image 2")  # a fresh best


def test_the_next_grid_is_due_once_per_save(ctl):
    labeling = Labeling(ctl)
    labeling.showing("tab", _grid(ctl))
    labeling.select("tab", 0, "")
    assert not labeling.take_next("tab")  # a best click asks for nothing
    labeling.select("tab", 1, "")
    labeling.select("tab", 2, "")  # a late key, ignored
    assert labeling.take_next("tab") and not labeling.take_next("tab")


def test_switching_sessions_leaves_no_grid_to_pick_on(ctl, tmp_path):
    labeling = Labeling(ctl)
    labeling.showing("tab", _grid(ctl))
    labeling.select("tab", 0, "")
    assert ctl.switch_session(tmp_path / "other") == f"Opened {tmp_path / 'other'}."
    assert labeling.select("tab", 1, "").message == "Generate a grid first."
    assert ctl.picks().empty and ctl.model_info()["session"] == str(tmp_path / "other")
    labeling.showing("tab", _grid(ctl))
    labeling.select("tab", 0, "")
    assert labeling.select("tab", 1, "").advance and len(ctl.picks()) == 1
