"""The fault campaign: SIGKILL the studio's verbs at each phase, reopen the session, go on.

Used by tests/test_faults.py (each kill point once) and bench/faults.py (repeats, and the
figures in docs/reliability.md). A run spawns ``_campaign_worker.py``, kills it when it prints
the phase named by the kill point, then runs a second worker on the same session for a whole
cycle (generate, pick, train, export, compare) and counts, over everything either worker
confirmed: picks lost, duplicated or mis-attributed, grids, rounds and votes lost, and parts
that ``check`` finds damaged.
"""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ._procs import spawn_worker

#: a worker whose stderr the campaign reads when it fails
_spawn = partial(spawn_worker, stderr=subprocess.PIPE)


def _first_step(line: list[str]) -> bool:
    return line[:2] == ["at", "train-step"] and line[2].startswith("1/")


def _last_step(line: list[str]) -> bool:
    if line[:2] != ["at", "train-step"]:
        return False
    step, total = line[2].split("/")
    return step == total


@dataclass(frozen=True)
class KillPoint:
    name: str  # what the worker is doing when it is killed
    at: Callable[[list[str]], bool]  # a line the worker printed: the phase has begun
    occurrence: int = 1  # the n-th such line

    def reached(self, lines: list[list[str]]) -> bool:
        return sum(self.at(line) for line in lines) >= self.occurrence


def _phase(name: str) -> Callable[[list[str]], bool]:
    return lambda line: line[:2] == ["at", name]


KILL_POINTS = [
    KillPoint("generate: denoising", lambda ln: ln[:3] == ["at", "sampling-step", "2"]),
    KillPoint("generate: storing the grid", lambda ln: ln[:3] == ["at", "sampling-step", "4"], 2),
    KillPoint("label: the first pick", _phase("pick")),
    KillPoint("label: the second pick", _phase("pick"), 2),
    KillPoint("train: held-out agreement, reference", _phase("train")),
    KillPoint("train: an optimizer step", _first_step),
    KillPoint("train: saving and committing", _last_step),
    KillPoint("export: diffusers LoRA", _phase("export-lora")),
    KillPoint("export: kohya LoRA", _phase("export-kohya")),
    KillPoint("export: picks", _phase("export-picks")),
    KillPoint("compare: side by side", _phase("compare")),
    KillPoint("compare: blind pair", _phase("blind-pair")),
    KillPoint("compare: the vote", _phase("vote")),
    KillPoint("label: a pick on a tuned model's grid", _phase("pick"), 3),
    KillPoint("train: committing a second round", _last_step, 2),
]


def run_until(proc: subprocess.Popen, point: KillPoint | None) -> list[list[str]]:
    """The worker's lines; SIGKILL as soon as ``point`` is reached (None: to its end). Lines
    still in the pipe after the kill were confirmed too and are kept."""
    lines: list[list[str]] = []
    try:
        while point is None or not point.reached(lines):
            line = proc.stdout.readline()
            if not line:
                if point is not None:
                    raise AssertionError(f"worker ended before {point.name}: {proc.stderr.read()}")
                break
            lines.append(line.split())
    finally:
        if point is not None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    lines += [
        ln.split() for ln in proc.stdout.read().splitlines(keepends=True) if ln.endswith("\n")
    ]
    if point is None and proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return lines


@dataclass
class Tally:
    """What one run confirmed, and what of it the session lost."""

    point: str
    confirmed_picks: int = 0
    picks_lost: int = 0
    picks_duplicated: int = 0
    picks_misattributed: int = 0
    picks_in_flight: int = 0  # unconfirmed picks that landed: at most one a kill
    grids_lost: int = 0
    rounds_lost: int = 0
    votes_lost: int = 0
    damaged: int = 0  # parts `check` finds damaged after the kill
    went_on: bool = False  # the next worker did a whole cycle on the session

    @property
    def lost(self) -> int:
        return (
            self.picks_lost
            + self.picks_duplicated
            + self.picks_misattributed
            + self.grids_lost
            + self.rounds_lost
            + self.votes_lost
            + self.damaged
        )


def tally(root: Path, point: str, lines: list[list[str]], went_on: bool, kills: int = 1) -> Tally:
    """Count, against the session at ``root``, what the workers' ``lines`` confirmed. A pick
    stored but never confirmed is the one a kill interrupted (at most one a kill); any more
    count as duplicated."""
    from d3po_core.session import Session
    from d3po_core.session.check import check_session

    t = Tally(point, went_on=went_on)
    picks = [ln for ln in lines if ln[0] == "pick"]
    t.confirmed_picks = len(picks)
    findings = check_session(root)
    t.damaged = sum(not f.whole for f in findings)
    with Session.open(root) as session:
        stored = session.picks_df().set_index("id")
        confirmed_ids = set()
        for _, pick_id, grid, best, worst, labeler in picks:
            confirmed_ids.add(int(pick_id))
            if int(pick_id) not in stored.index:
                t.picks_lost += 1
                continue
            row = stored.loc[int(pick_id)]
            if (int(row.grid_id), int(row.best), int(row.worst), row.labeler) != (
                int(grid),
                int(best),
                int(worst),
                labeler,
            ):
                t.picks_misattributed += 1
        unconfirmed = len(set(stored.index) - confirmed_ids)
        t.picks_in_flight = min(unconfirmed, kills)
        t.picks_duplicated = unconfirmed - t.picks_in_flight
        grids = set(session.grids_df()["id"])
        t.grids_lost = sum(int(ln[1]) not in grids for ln in lines if ln[0] == "grid")
        rounds = set(session.rounds_df()["id"])
        t.rounds_lost = sum(int(ln[1]) not in rounds for ln in lines if ln[0] == "round")
        votes = session.comparisons_df()
        for round_id in {int(ln[1]) for ln in lines if ln[0] == "vote"}:
            said = sum(1 for ln in lines if ln[:2] == ["vote", str(round_id)])
            t.votes_lost += max(0, said - int((votes["round_b"] == round_id).sum()))
    return t


def run_point(root: Path, model: str | Path, point: KillPoint) -> Tally:
    """Kill a worker at ``point``, then have a second worker go on for a whole cycle."""
    killed = run_until(_spawn("_campaign_worker.py", root, model, "ana", 2), point)
    after = run_until(_spawn("_campaign_worker.py", root, model, "ben", 1), None)
    return tally(root, point.name, killed + after, went_on=after[-1:] == [["finished"]])


def run_two_labelers(root: Path, picks: int = 100, kill_one_at: int | None = None) -> Tally:
    """Two processes add ``picks`` picks each to one session at once (one SIGKILLed after
    ``kill_one_at`` confirmed picks, then started again to finish its share)."""
    grids = run_until(_spawn("_session_worker.py", root, "grids", 20), None)
    assert len([ln for ln in grids if ln[0] == "grid"]) == 20
    results: dict[str, list[list[str]]] = {}

    def labeler(name: str) -> None:
        proc = _spawn("_session_worker.py", root, "picks", picks, name)
        if kill_one_at is not None and name == "ana":
            point = KillPoint("", lambda ln: ln[0] == "pick", kill_one_at)
            lines = run_until(proc, point)
            done = sum(ln[0] == "pick" for ln in lines)
            rest = _spawn("_session_worker.py", root, "picks", picks - done, name)
            lines += run_until(rest, None)
        else:
            lines = run_until(proc, None)
        results[name] = lines

    threads = [threading.Thread(target=labeler, args=(n,)) for n in ("ana", "ben")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = results["ana"] + results["ben"]
    point = "2 processes × 100 picks" + (f", one killed at {kill_one_at}" if kill_one_at else "")
    return tally(root, point, lines, went_on=True, kills=int(kill_one_at is not None))
