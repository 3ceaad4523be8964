"""Tests for the on-disk session (DESIGN §3.7, §7): round trips, validation, recovery, kills."""

from __future__ import annotations

import math
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from d3po_core.errors import D3POError
from d3po_core.session import Session, SessionError, reports
from d3po_core.settings import MAX_PROMPT_CHARS, SampleSettings, spec

from .conftest import spawn_worker

WORKER = Path(__file__).with_name("_session_worker.py")


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (8, 8), (30 * i, 255 - 30 * i, 7)) for i in range(n)]


def _add_grid(session: Session, prompt: str = "a cat", n: int = 4, **kw) -> int:
    tensors = {"latents": torch.randn(n, 3, 4, 2), "log_probs": torch.randn(n, 3).double()}
    kw.setdefault("adapter_round", None)
    return session.add_grid(
        prompt,
        list(range(10, 10 + n)),
        _images(n),
        tensors,
        model="tiny",
        settings={"steps": 3},
        **kw,
    )


def _commit_round(session: Session, last_pick_id: int = 0, loss: float = 0.5) -> int:
    folder = session.new_round_dir()
    (folder / "adapter_config.json").write_text('{"r": 4}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    return session.commit_round(
        folder,
        settings={"lr": 1e-4, "beta": 0.1},
        metrics={"loss": loss, "acc": 0.75},
        last_pick_id=last_pick_id,
    )


@pytest.fixture
def session(tmp_path: Path):
    with Session.open(tmp_path / "s") as s:
        yield s


def test_open_creates_layout_and_schema(tmp_path: Path) -> None:
    with Session.open(tmp_path / "new") as s:
        for sub in ("images", "trajectories", "adapters"):
            assert (s.root / sub).is_dir()
        assert s.config == {}
        conn = sqlite3.connect(s.root / "session.db")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        conn.close()


def test_open_without_create_refuses_missing_session(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match="no session at"):
        Session.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()


def test_config_updates_merge_and_persist(tmp_path: Path) -> None:
    with Session.open(tmp_path / "s") as s:
        s.update_config(model="tiny", grid_size=4)
        assert s.update_config(grid_size=6) == {"model": "tiny", "grid_size": 6}
    with Session.open(tmp_path / "s") as s:
        assert s.config == {"model": "tiny", "grid_size": 6}
        assert not list(s.root.glob("*.tmp"))
        with pytest.raises(SessionError, match="JSON-serializable"):
            s.update_config(bad=object())


def test_grid_round_trip(session: Session) -> None:
    tensors = {"latents": torch.randn(4, 3, 4, 2), "log_probs": torch.randn(4, 3).double()}
    images = _images(4)
    gid = session.add_grid(
        "a cat",
        [5, 6, 7, 8],
        images,
        tensors,
        model="tiny",
        adapter_round=None,
        settings={"steps": 3, "eta": 1.0},
        negative_prompt="blurry",
    )
    g = session.grid(gid)
    assert g["prompt"] == "a cat" and g["negative_prompt"] == "blurry"
    assert g["seeds"] == [5, 6, 7, 8] and g["n"] == 4 and g["model"] == "tiny"
    assert g["adapter_round"] is None and g["settings"] == {"steps": 3, "eta": 1.0}
    assert [p.relative_to(session.root).as_posix() for p in g["image_paths"]] == [
        f"images/grid-{gid:06d}-{i:02d}.png" for i in range(4)
    ]
    loaded = session.load_images(gid)
    assert [im.tobytes() for im in loaded] == [im.tobytes() for im in images]
    back = session.load_tensors(gid)
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    df = session.grids_df()
    assert list(df.columns) == [
        "id",
        "prompt",
        "negative_prompt",
        "seed",
        "n",
        "model",
        "adapter_round",
        "settings",
        "trajectory_path",
        "created",
    ]
    assert df.loc[0, "seed"] == 5 and df.loc[0, "settings"] == {"steps": 3, "eta": 1.0}
    assert not list(session.root.rglob("*.tmp"))


def test_grid_validation(session: Session) -> None:
    with pytest.raises(SessionError, match="grid size 1 is out of range"):
        _add_grid(session, n=1)
    with pytest.raises(SessionError, match="got 3 seeds for 2 images"):
        session.add_grid("x", [1, 2, 3], _images(2), {}, model="m", adapter_round=None, settings={})
    with pytest.raises(SessionError, match="no round with id 3"):
        _add_grid(session, adapter_round=3)
    with pytest.raises(SessionError, match="prompt is empty"):
        _add_grid(session, prompt="  ")
    with pytest.raises(SessionError, match="prompt is too long"):
        _add_grid(session, prompt="x" * 5000)
    assert session.grids_df().empty
    assert not [p for p in session.root.rglob("*") if p.is_file() and "grid-" in p.name]
    with pytest.raises(SessionError, match="no grid with id 99"):
        session.grid(99)


def test_grid_and_prompt_limits_are_the_settings_limits(session: Session) -> None:
    grid_size = spec(SampleSettings, "n")
    with pytest.raises(SessionError, match=r"grid size 17 is out of range \(2 to 16\)"):
        _add_grid(session, n=int(grid_size.high) + 1)
    _add_grid(session, prompt="x" * MAX_PROMPT_CHARS, n=int(grid_size.high))
    with pytest.raises(SessionError, match=f"max {MAX_PROMPT_CHARS}"):
        _add_grid(session, prompt="x" * (MAX_PROMPT_CHARS + 1))
    assert session.grids_df()["n"].tolist() == [grid_size.high]


def test_picks_round_trip_and_undo(session: Session) -> None:
    gid = _add_grid(session)
    p1 = session.add_pick(gid, best=0, worst=3, labeler="ann")
    p2 = session.add_pick(gid, best=None, worst=None, kind="tie", labeler="bob")
    p3 = session.add_pick(gid, best=None, worst=None, kind="skip", labeler="ann")
    df = session.picks_df()
    assert list(df.columns) == [
        "id",
        "grid_id",
        "prompt",
        "best",
        "worst",
        "kind",
        "labeler",
        "created",
        "undone",
    ]
    assert df["id"].tolist() == [p1, p2, p3]
    assert df.loc[0, ["best", "worst", "kind"]].tolist() == [0, 3, "pick"]
    assert df["best"].isna().tolist() == [False, True, True]
    assert session.undo_last_pick(labeler="bob") == p2
    assert session.undo_last_pick() == p3
    assert session.picks_df()["id"].tolist() == [p1]
    full = session.picks_df(include_undone=True)
    assert full["undone"].tolist() == [False, True, True]
    assert session.undo_last_pick(labeler="bob") is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"best": 1, "worst": 1}, "best and worst must be different images"),
        ({"best": 4, "worst": 0}, "best index 4 is out of range for a grid of 4 images"),
        ({"best": 0, "worst": -1}, "worst index -1 is out of range for a grid of 4 images"),
        ({"best": 0, "worst": None}, "a pick needs both a best and a worst image"),
        ({"best": 0, "worst": 1, "kind": "tie"}, "a tie takes neither a best nor a worst image"),
        ({"best": None, "worst": None, "kind": "meh"}, "unknown pick kind 'meh'"),
        ({"best": 0.5, "worst": 1}, "best must be an integer"),
    ],
)
def test_pick_validation_messages(session: Session, kwargs: dict, message: str) -> None:
    gid = _add_grid(session)
    with pytest.raises(SessionError, match=message):
        session.add_pick(gid, **kwargs)
    assert session.picks_df(include_undone=True).empty


def test_pick_on_unknown_grid_is_refused(session: Session) -> None:
    with pytest.raises(SessionError, match="no grid with id 42"):
        session.add_pick(42, best=0, worst=1)
    assert issubclass(SessionError, D3POError)


def test_rounds_training_picks_and_active_round(session: Session) -> None:
    gid = _add_grid(session)
    assert session.last_round() is None and session.active_round is None
    a = session.add_pick(gid, best=0, worst=1, labeler="ann")
    session.add_pick(gid, best=None, worst=None, kind="skip")
    b = session.add_pick(gid, best=2, worst=3, labeler="ann")
    session.undo_last_pick()
    assert session.training_picks() == [
        {"pick_id": a, "grid_id": gid, "best": 0, "worst": 1, "labeler": "ann"}
    ]
    r1 = _commit_round(session, last_pick_id=b, loss=0.7)
    assert r1 == 1 and session.active_round == 1 and session.last_round() == 1
    assert session.round_path(1) == session.root / "adapters" / "round-0001"
    assert (session.round_path(1) / "adapter_model.safetensors").read_bytes() == b"weights"
    assert session.training_picks() == []
    c = session.add_pick(gid, best=3, worst=0)
    assert [p["pick_id"] for p in session.training_picks()] == [c]
    assert [p["pick_id"] for p in session.training_picks(since_last_round=False)] == [a, c]
    r2 = _commit_round(session, last_pick_id=c, loss=0.4)
    assert r2 == 2 and session.active_round == 2
    session.set_active_round(None)
    assert session.active_round is None
    session.set_active_round(1)
    assert session.active_round == 1
    with pytest.raises(SessionError, match="no round with id 7"):
        session.set_active_round(7)
    with pytest.raises(SessionError, match="no round with id 7"):
        session.round_path(7)
    df = session.rounds_df()
    assert list(df.columns) == [
        "id",
        "path",
        "last_pick_id",
        "created",
        "active",
        "setting_beta",
        "setting_lr",
        "metric_acc",
        "metric_loss",
    ]
    assert df["metric_loss"].tolist() == [0.7, 0.4]
    assert df["active"].tolist() == [True, False]
    assert df["path"].tolist() == ["adapters/round-0001", "adapters/round-0002"]
    assert not [p for p in (session.root / "adapters").iterdir() if p.name.startswith(".tmp-")]
    gid2 = _add_grid(session, adapter_round=2)
    assert session.grid(gid2)["adapter_round"] == 2


def test_commit_round_refuses_foreign_folders(session: Session, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(SessionError, match="escapes the session folder"):
        session.commit_round(outside, settings={}, metrics={}, last_pick_id=0)
    inside = session.root / "adapters" / "mine"
    inside.mkdir()
    with pytest.raises(SessionError, match="not a folder made by new_round_dir"):
        session.commit_round(inside, settings={}, metrics={}, last_pick_id=0)
    assert session.rounds_df().empty


def test_comparisons_and_win_rates(session: Session) -> None:
    assert reports.win_rates(session).empty
    _commit_round(session)
    _commit_round(session)
    for winner in ["b", "b", "a", "tie", "b"]:
        session.add_comparison(prompt="a cat", seed=1, round_a=None, round_b=1, winner=winner)
    session.add_comparison(
        prompt="a cat", seed=1, round_a=1, round_b=2, winner="tie", labeler="ann", shown_left="b"
    )
    df = session.comparisons_df()
    assert list(df.columns) == [
        "id",
        "prompt",
        "seed",
        "round_a",
        "round_b",
        "winner",
        "shown_left",
        "labeler",
        "created",
    ]
    assert df["round_a"].isna().sum() == 5
    rates = reports.win_rates(session)
    assert list(rates.columns) == ["round_a", "round_b", "wins", "losses", "ties", "n", "win_rate"]
    base = rates.iloc[0]
    assert pd.isna(base["round_a"]) and base["round_b"] == 1
    assert (base["wins"], base["losses"], base["ties"], base["n"]) == (3, 1, 1, 5)
    assert base["win_rate"] == pytest.approx(0.75)
    assert rates["win_rate"].dtype == float and math.isnan(rates["win_rate"].iloc[1])
    with pytest.raises(SessionError, match="unknown winner 'c'"):
        session.add_comparison(prompt="x", seed=1, round_a=None, round_b=1, winner="c")
    with pytest.raises(SessionError, match="no round with id 9"):
        session.add_comparison(prompt="x", seed=1, round_a=None, round_b=9, winner="a")
    with pytest.raises(SessionError, match="two different rounds"):
        session.add_comparison(prompt="x", seed=1, round_a=1, round_b=1, winner="a")


def test_agreement_between_labelers(session: Session) -> None:
    assert reports.agreement_df(session).empty
    g1, g2, g3 = _add_grid(session), _add_grid(session), _add_grid(session)
    session.add_pick(g1, best=0, worst=1, labeler="ann")
    session.add_pick(g1, best=0, worst=1, labeler="bob")
    session.add_pick(g2, best=2, worst=3, labeler="ann")
    session.add_pick(g2, best=2, worst=0, labeler="bob")
    session.add_pick(g3, best=1, worst=0, labeler="ann")  # only one labeler: not counted
    session.add_pick(g3, best=3, worst=0, labeler="bob")
    session.undo_last_pick(labeler="bob")
    df = reports.agreement_df(session)
    assert list(df.columns) == ["labeler_a", "labeler_b", "n_grids", "agreement", "best_agreement"]
    row = df.iloc[0]
    assert (row["labeler_a"], row["labeler_b"], row["n_grids"]) == ("ann", "bob", 2)
    assert row["agreement"] == pytest.approx(0.5) and row["best_agreement"] == pytest.approx(1.0)


def test_prompts_dedupe_and_cycle(session: Session) -> None:
    assert session.next_prompt() is None
    assert session.add_prompts(["a cat", "a dog", "a cat", "  ", "a fox"]) == 3
    assert session.add_prompts(["a dog", "an owl"]) == 1
    assert session.prompts_df()["text"].tolist() == ["a cat", "a dog", "a fox", "an owl"]
    assert session.next_prompt() == "a cat"
    assert session.next_prompt("a cat") == "a dog"
    assert session.next_prompt("an owl") == "a cat"
    assert session.next_prompt("not in list") == "a cat"


def test_paths_escaping_the_root_are_refused(session: Session) -> None:
    gid = _add_grid(session)
    conn = sqlite3.connect(session.root / "session.db")
    conn.execute(
        "UPDATE images SET path = '../../etc/passwd' WHERE grid_id = ? AND idx = 0", (gid,)
    )
    conn.commit()
    conn.close()
    with pytest.raises(SessionError, match="escapes the session folder"):
        session.load_images(gid)


def test_recovery_removes_leftovers_but_keeps_committed_data(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Session.open(root) as s:
        gid = _add_grid(s)
        pick = s.add_pick(gid, best=0, worst=1)
        _commit_round(s)
        half = s.new_round_dir()
        (half / "adapter_model.safetensors").write_bytes(b"half")
    (root / "adapters" / "round-0002").mkdir()  # renamed, but its row never committed
    (root / "adapters" / "round-0002" / "adapter_model.safetensors").write_bytes(b"x")
    (root / "images" / ".abc-00.png.tmp").write_bytes(b"x")
    (root / "trajectories" / ".abc.safetensors.tmp").write_bytes(b"x")
    (root / "images" / "grid-000002-00.png").write_bytes(b"x")  # uncommitted grid 2
    (root / "trajectories" / "grid-000002.safetensors").write_bytes(b"x")
    (root / ".config-1.tmp").write_text("{}")
    with Session.open(root) as s:
        adapters = sorted(p.name for p in (root / "adapters").iterdir())
        assert adapters == ["round-0001"]
        assert sorted(p.name for p in (root / "images").iterdir()) == [
            f"grid-000001-{i:02d}.png" for i in range(4)
        ]
        assert [p.name for p in (root / "trajectories").iterdir()] == ["grid-000001.safetensors"]
        assert not list(root.glob("*.tmp"))
        assert s.picks_df()["id"].tolist() == [pick]
        assert len(s.load_images(gid)) == 4
        assert s.round_path(1).is_dir()
        assert _add_grid(s) == 2  # the reclaimed id is reused cleanly


def test_recovery_waits_while_another_session_is_open(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Session.open(root) as first:
        live = first.new_round_dir()
        with Session.open(root):
            assert live.is_dir()  # another session may still be writing it
    with Session.open(root):
        assert not live.exists()


def test_two_sessions_add_picks_concurrently(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Session.open(root) as s:
        gid = _add_grid(s)
    per_thread, ids = 40, []
    errors: list[BaseException] = []
    ids_lock = threading.Lock()

    def work(session: Session, labeler: str) -> None:
        try:
            for i in range(per_thread):
                pid = session.add_pick(gid, best=i % 4, worst=(i + 1) % 4, labeler=labeler)
                with ids_lock:
                    ids.append(pid)
        except BaseException as e:  # surfaced below
            errors.append(e)

    with Session.open(root) as a, Session.open(root) as b:
        threads = [
            threading.Thread(target=work, args=(sess, f"{name}{k}"))
            for name, sess in (("a", a), ("b", b))
            for k in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    assert len(ids) == len(set(ids)) == 4 * per_thread
    with Session.open(root) as s:
        df = s.picks_df()
    assert sorted(df["id"]) == sorted(ids)
    assert df.groupby("labeler").size().tolist() == [per_thread] * 4


# -- kill tests -----------------------------------------------------------------------------------


def _spawn(root: Path, mode: str, count: int = 1) -> subprocess.Popen:
    return spawn_worker(WORKER.name, root, mode, count, stderr=subprocess.PIPE)


def _read_until(proc: subprocess.Popen, done: Callable[[list[list[str]]], bool]) -> list[list[str]]:
    """Read the worker's stdout until ``done(lines)``, SIGKILL it, and return every complete
    line it printed (also those still in the pipe at the kill: they were confirmed too)."""
    lines: list[list[str]] = []
    try:
        while not lines or not done(lines):
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"worker ended early: {proc.stderr.read()}")
            lines.append(line.split())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    rest = proc.stdout.read()
    lines += [line.split() for line in rest.splitlines(keepends=True) if line.endswith("\n")]
    return lines


def test_kill_during_pick_burst_loses_no_confirmed_pick(tmp_path: Path) -> None:
    root = tmp_path / "s"
    with Session.open(root) as s:
        grids = [_add_grid(s, n=n) for n in (2, 4, 7)]
    proc = _spawn(root, "picks", 100_000)
    lines = _read_until(proc, lambda ls: len(ls) >= 40)
    assert proc.returncode == -signal.SIGKILL
    confirmed = {int(pid): (int(g), int(b), int(w)) for _, pid, g, b, w, _who in lines}
    with Session.open(root) as s:
        df = s.picks_df().set_index("id")
    assert set(confirmed) <= set(df.index)
    for pid, (grid_id, best, worst) in confirmed.items():
        assert grid_id in grids
        assert (df.loc[pid, "grid_id"], df.loc[pid, "best"], df.loc[pid, "worst"]) == (
            grid_id,
            best,
            worst,
        )
        assert df.loc[pid, "labeler"] == "worker"
    assert len(df) <= len(confirmed) + 1  # at most the one in flight when killed


def test_kill_during_grid_burst_keeps_confirmed_grids_whole(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Session.open(root).close()
    proc = _spawn(root, "grids", 100_000)
    lines = _read_until(proc, lambda ls: len(ls) >= 10)
    confirmed = [int(gid) for _, gid in lines]
    with Session.open(root) as s:
        ids = s.grids_df()["id"].tolist()
        assert set(confirmed) <= set(ids)
        for gid in ids:
            assert len(s.load_images(gid)) == 2
            assert s.load_tensors(gid)["latents"].shape == (2, 4)
        on_disk = {p.name for p in (root / "images").iterdir()}
        assert on_disk == {f"grid-{g:06d}-{i:02d}.png" for g in ids for i in range(2)}
        assert len(list((root / "trajectories").iterdir())) == len(ids)


def test_kill_while_writing_round_leaves_no_round(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Session.open(root).close()
    proc = _spawn(root, "round-slow")
    lines = _read_until(proc, lambda ls: ls[-1][0] == "chunk" and int(ls[-1][1]) >= 5)
    half = Path(lines[0][1])
    assert half.is_dir()  # the kill left a half-written folder behind
    with Session.open(root) as s:
        assert s.rounds_df().empty and s.last_round() is None and s.active_round is None
        assert not half.exists()
        assert list((root / "adapters").iterdir()) == []


def test_kill_after_commit_keeps_round_and_drops_next_half(tmp_path: Path) -> None:
    root = tmp_path / "s"
    Session.open(root).close()
    proc = _spawn(root, "round-commit")
    lines = _read_until(
        proc, lambda ls: ls[-1][0] == "chunk" and ls[-2][0] == "dir" and len(ls) > 3
    )
    assert ["committed", "1"] in lines
    with Session.open(root) as s:
        assert s.last_round() == 1 and s.active_round == 1
        path = s.round_path(1)
        assert (path / "adapter_config.json").read_text() == '{"r": 4}'
        assert (path / "adapter_model.safetensors").stat().st_size == 4 * 4096
        assert s.rounds_df()["metric_loss"].tolist() == [0.5]
        assert [p.name for p in (root / "adapters").iterdir()] == ["round-0001"]
