"""The fault campaign (tests/_campaign.py): SIGKILL at each phase of generate, label, train,
export and compare, then reopen the session and go on; two processes labeling one session at
once. Nothing confirmed is lost, duplicated or mis-attributed, and `check` finds it whole.
The figures over repeats: ``python bench/faults.py`` (docs/reliability.md)."""

from __future__ import annotations

import pytest

from ._campaign import KILL_POINTS, KillPoint, run_point, run_two_labelers


@pytest.mark.parametrize("point", KILL_POINTS, ids=[p.name for p in KILL_POINTS])
def test_a_kill_at_each_phase_loses_nothing_confirmed(tmp_path, tiny_eps, point: KillPoint):
    t = run_point(tmp_path / "session", tiny_eps, point)
    assert t.went_on, "the session did not go on after the kill"
    assert t.confirmed_picks >= 2  # the run after the kill confirmed its own
    assert t.lost == 0, t
    assert t.picks_in_flight <= 1


@pytest.mark.parametrize("kill_one_at", [None, 50])
def test_two_processes_label_one_session(tmp_path, kill_one_at):
    t = run_two_labelers(tmp_path / "session", picks=100, kill_one_at=kill_one_at)
    assert t.confirmed_picks == 200 and t.lost == 0, t
