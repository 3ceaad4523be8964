"""The on-disk session: one folder the user names, holding SQLite metadata and files.

Layout (DESIGN §3.7)::

    session.db        SQLite (WAL, synchronous=FULL, foreign keys on)
    session.lock      advisory lock: tells an opener whether other sessions are live
    config.json       user settings, replaced atomically
    images/           grid-000123-00.png
    trajectories/     grid-000123.safetensors (one file a grid)
    adapters/         round-0001/ (diffusers LoRA folder); .tmp-<uuid>/ while being written

Durability (DESIGN §7): a file is written under a ``*.tmp`` name, fsynced and renamed into place
inside the same write transaction that inserts the row pointing at it, so a kill at any moment
loses nothing a call has returned for. The next open that finds no other live session removes
the leftovers: temp files, ``adapters/.tmp-*`` folders, and grid files or round folders that no
committed row references (the plumbing is in ``files.py``, the tables in ``schema.py``).
Paths are stored relative to the root and checked on every use.
Rows are read by column name (``sqlite3.Row``); the tables come out as pandas DataFrames.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import socket
import sqlite3
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from d3po_core.errors import DamagedFile, SessionBusy, SessionError
from d3po_core.settings import MAX_PROMPT_CHARS, SampleSettings, spec

from .files import (
    fsync_dir,
    fsync_file,
    fsync_tree,
    readable,
    remove_leftovers,
    replace_atomically,
)
from .schema import SCHEMA_VERSION, TABLES

try:
    import fcntl
except ImportError:  # Windows: no flock; recovery then assumes this is the only live session.
    fcntl = None

GRID_SIZE = spec(SampleSettings, "n")
"""The grid-size bounds, as the settings declare them for every front end."""
PICK_KINDS = ("pick", "tie", "skip")
WINNERS = ("a", "b", "tie")
BUSY_TIMEOUT_S = 30.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise SessionError(f"{what} must be JSON-serializable: {e}") from None


def _index(value: Any, what: str) -> int:
    try:
        return operator.index(value)
    except TypeError:
        raise SessionError(f"{what} must be an integer, got {value!r}") from None


def _seed(value: Any) -> int:
    seed = _index(value, "seed")
    if not 0 <= seed < 2**63:
        raise SessionError(f"seed {seed} is out of range (0 to 2**63-1)")
    return seed


def _prompt(text: Any, what: str = "prompt") -> str:
    if not isinstance(text, str):
        raise SessionError(f"{what} must be a string, got {type(text).__name__}")
    text = text.strip()
    if len(text) > MAX_PROMPT_CHARS:
        raise SessionError(f"{what} is too long ({len(text)} characters, max {MAX_PROMPT_CHARS})")
    return text


def damaged_database(root: Path, exc: Exception) -> str:
    """What to tell a user whose session.db cannot be read, and how to go on."""
    db = root / "session.db"
    return (
        f"{db} is damaged ({exc}): its picks, grids and rounds cannot be read. "
        f"`python -m d3po_core check --session {root}` lists what is whole; to go on, move "
        "session.db (and any session.db-wal, session.db-shm) aside and open the folder again, "
        "which starts an empty session beside the old images and adapters"
    )


def _created(df: pd.DataFrame) -> pd.DataFrame:
    df["created"] = pd.to_datetime(df["created"], utc=True, format="ISO8601")
    return df


class Session:
    """One session folder: thread-safe, and safe to share with other processes via SQLite."""

    def __init__(self, root: str | Path, *, create: bool = True) -> None:
        root = Path(root).expanduser().resolve()
        if not (root / "session.db").is_file():
            if not create:
                raise SessionError(f"no session at {root}")
            if root.exists() and not root.is_dir():
                raise SessionError(f"session path {root} is a file, not a folder")
        self.root = root
        try:
            for sub in ("images", "trajectories", "adapters"):
                (root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SessionError(
                f"cannot create the session folder {root} ({exc.strerror}); pass --session a "
                "folder you can write to"
            ) from None
        self._lock = threading.RLock()
        self._lock_fd = os.open(root / "session.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            sole = self._acquire_file_lock()
            self._conn = sqlite3.connect(
                root / "session.db",
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = FULL")
            self._conn.execute("PRAGMA foreign_keys = ON")
            self._init_schema()
            if sole:
                self._recover()
                if fcntl is not None:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # let other openers in
        except sqlite3.DatabaseError as exc:  # not a database, or a damaged one
            self.close()
            raise SessionError(damaged_database(root, exc)) from None
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, root: str | Path, *, create: bool = True) -> Session:
        """Open the session at ``root`` (creating it unless ``create=False``) and recover it."""
        return cls(root, create=create)

    def close(self) -> None:
        """Close the database and release the folder lock; safe to call twice."""
        with self._lock:
            conn = getattr(self, "_conn", None)
            if conn is not None:
                conn.close()
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # also releases the flock
                self._lock_fd = None

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def round_lock(self) -> Iterator[None]:
        """One round at a time on this session, across processes: held from reading the new
        picks to committing the round. A second round is refused at once with
        :class:`SessionBusy`, naming the process that trains (labeling and generating go on).
        """
        path = self.root / "training.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = path.read_text(errors="replace").strip() or "another process"
                    raise SessionBusy(
                        f"a round is already training on {self.root} ({holder}); wait for it "
                        "to finish, or cancel it there — your new picks wait for the next round"
                    ) from None
            since = datetime.now().astimezone().strftime("%H:%M:%S")
            command = " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
            holder = f"pid {os.getpid()} on {socket.gethostname()}, `{command}`, since {since}"
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.encode(), 0)
            try:
                yield
            finally:
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def _acquire_file_lock(self) -> bool:
        """Hold a shared flock while open; return True if no other session is open (exclusive).

        Recovery deletes unreferenced files, which is only safe when nobody else can be midway
        through writing one; an opener that finds others live waits for any running recovery
        (its shared lock blocks on the exclusive one) and then skips its own.
        """
        if fcntl is None:
            return True
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)
            return False

    @contextmanager
    def _write(self) -> Iterator[list[Callable[[], None]]]:
        """One ``BEGIN IMMEDIATE`` transaction under the thread lock.

        Yields a list the body can append undo callbacks to; they run, still holding the write
        lock, if the body or the commit fails (e.g. to remove files renamed into place).
        """
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            undo: list[Callable[[], None]] = []
            try:
                yield undo
                self._conn.execute("COMMIT")
            except BaseException:
                for fn in reversed(undo):
                    fn()
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def _one(self, sql: str, params: tuple = ()) -> sqlite3.Row | None:
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    def _frame(self, sql: str, params: tuple = ()) -> pd.DataFrame:
        with self._lock:
            return pd.read_sql_query(sql, self._conn, params=params)

    def _init_schema(self) -> None:
        with self._write():
            version = self._conn.execute("PRAGMA user_version").fetchone()["user_version"]
            if version > SCHEMA_VERSION:
                raise SessionError(
                    f"session {self.root} has schema {version}, newer than this version "
                    f"({SCHEMA_VERSION}); upgrade d3po-studio"
                )
            if version == 0:
                for statement in TABLES:
                    self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if not (self.root / "config.json").exists():
                self._write_config({})

    def _resolve(self, rel: str | Path) -> Path:
        """Resolve a stored or given path and refuse it unless it lies inside the root."""
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root):
            raise SessionError(f"path {rel} escapes the session folder {self.root}")
        return path

    def _recover(self) -> None:
        """Remove what a crash can leave: temp files and folders, unreferenced grids and rounds."""
        referenced = {r["path"] for r in self._query("SELECT path FROM images")}
        grids = self._query("SELECT trajectory_path FROM grids")
        referenced |= {r["trajectory_path"] for r in grids}
        rounds = {r["path"] for r in self._query("SELECT path FROM rounds")}
        remove_leftovers(self.root, referenced, rounds)

    # -- config ---------------------------------------------------------------------------------

    @property
    def config(self) -> dict[str, Any]:
        """The contents of config.json (a fresh dict each time; edit with update_config)."""
        try:
            return json.loads((self.root / "config.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except json.JSONDecodeError as e:
            raise SessionError(f"config.json in {self.root} is not valid JSON: {e}") from None

    def update_config(self, **kv: Any) -> dict[str, Any]:
        """Merge ``kv`` into config.json atomically and return the new config.

        The database write lock serializes this read-modify-write across processes.
        """
        with self._write():
            config = self.config
            config.update(kv)
            self._write_config(config)
        return config

    def _write_config(self, config: dict[str, Any]) -> None:
        replace_atomically(self.root / "config.json", _dumps(config, "config").encode())

    # -- prompts --------------------------------------------------------------------------------

    def add_prompts(self, texts: list[str]) -> int:
        """Add prompts to the list, skipping blanks and ones already there; return how many new."""
        cleaned = [t for t in (_prompt(t) for t in texts) if t]
        created = _now()
        with self._write():
            before = self._conn.total_changes
            self._conn.executemany(
                "INSERT OR IGNORE INTO prompts (text, created) VALUES (?, ?)",
                [(t, created) for t in cleaned],
            )
            return self._conn.total_changes - before

    def prompts_df(self) -> pd.DataFrame:
        """The prompt list in insertion order: id, text, created."""
        return _created(self._frame("SELECT id, text, created FROM prompts ORDER BY id"))

    def next_prompt(self, after: str | None = None) -> str | None:
        """The prompt after ``after`` in list order, wrapping around; the first if ``after`` is
        None or not in the list; None if the list is empty."""
        texts = [r["text"] for r in self._query("SELECT text FROM prompts ORDER BY id")]
        if not texts:
            return None
        if after is not None and after.strip() in texts:
            return texts[(texts.index(after.strip()) + 1) % len(texts)]
        return texts[0]

    # -- grids ----------------------------------------------------------------------------------

    def add_grid(
        self,
        prompt: str,
        seeds: list[int],
        images: list[Image.Image],
        tensors: dict[str, torch.Tensor],
        *,
        model: str,
        adapter_round: int | None,
        settings: dict,
        negative_prompt: str = "",
    ) -> int:
        """Store a grid: its PNGs, its trajectory tensors and its rows; return the grid id.

        Files are written and fsynced under temp names first (outside the lock, as they can be
        large), then renamed to their id-based names and recorded in one transaction.
        """
        prompt = _prompt(prompt)
        negative_prompt = _prompt(negative_prompt, "negative prompt")
        if not prompt:
            raise SessionError("prompt is empty")
        seeds = [_seed(s) for s in seeds]
        n = len(images)
        low, high = GRID_SIZE.low, GRID_SIZE.high
        if not low <= n <= high:
            raise SessionError(f"grid size {n} is out of range ({low:g} to {high:g})")
        if len(seeds) != n:
            raise SessionError(f"got {len(seeds)} seeds for {n} images")
        if adapter_round is not None:
            adapter_round = _index(adapter_round, "adapter round")
        settings_json = _dumps(settings, "grid settings")
        metadata = {
            "settings": settings_json,
            "prompt": prompt,
            "seeds": json.dumps(seeds),
            "model": str(model),
        }
        tag = uuid.uuid4().hex
        tmp_images = [self.root / "images" / f".{tag}-{i:02d}.png.tmp" for i in range(n)]
        tmp_traj = self.root / "trajectories" / f".{tag}.safetensors.tmp"
        try:
            for image, tmp in zip(images, tmp_images, strict=True):
                image.save(tmp, format="PNG")
                fsync_file(tmp)
            save_file(
                {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
                tmp_traj,
                metadata=metadata,
            )
            readable(tmp_traj)
            fsync_file(tmp_traj)
            with self._write() as undo:
                if adapter_round is not None:
                    self._require_round(adapter_round)
                grid_id = self._next_id("grids")
                rel_images = [f"images/grid-{grid_id:06d}-{i:02d}.png" for i in range(n)]
                rel_traj = f"trajectories/grid-{grid_id:06d}.safetensors"
                finals = zip([*tmp_images, tmp_traj], [*rel_images, rel_traj], strict=True)
                for tmp, rel in finals:
                    os.replace(tmp, self.root / rel)
                    undo.append(partial((self.root / rel).unlink, missing_ok=True))
                fsync_dir(self.root / "images")
                fsync_dir(self.root / "trajectories")
                self._conn.execute(
                    "INSERT INTO grids (id, prompt, negative_prompt, seed, n, model, adapter_round,"
                    " settings_json, trajectory_path, created) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        grid_id,
                        prompt,
                        negative_prompt,
                        seeds[0],
                        n,
                        str(model),
                        adapter_round,
                        settings_json,
                        rel_traj,
                        _now(),
                    ),
                )
                self._conn.executemany(
                    "INSERT INTO images (grid_id, idx, seed, path) VALUES (?, ?, ?, ?)",
                    [(grid_id, i, seeds[i], p) for i, p in enumerate(rel_images)],
                )
        finally:
            for tmp in [*tmp_images, tmp_traj]:
                tmp.unlink(missing_ok=True)
        return grid_id

    def grid(self, grid_id: int) -> dict[str, Any]:
        """A grid's record: id, prompt, negative_prompt, seeds, n, model, adapter_round,
        settings, image_paths and trajectory_path (absolute, checked), created."""
        grid_id = _index(grid_id, "grid id")
        with self._lock:
            row = self._conn.execute(
                "SELECT prompt, negative_prompt, n, model, adapter_round, settings_json,"
                " trajectory_path, created FROM grids WHERE id = ?",
                (grid_id,),
            ).fetchone()
            images = self._conn.execute(
                "SELECT seed, path FROM images WHERE grid_id = ? ORDER BY idx", (grid_id,)
            ).fetchall()
        if row is None:
            raise SessionError(f"no grid with id {grid_id}")
        return {
            "id": grid_id,
            "prompt": row["prompt"],
            "negative_prompt": row["negative_prompt"],
            "seeds": [image["seed"] for image in images],
            "n": row["n"],
            "model": row["model"],
            "adapter_round": row["adapter_round"],
            "settings": json.loads(row["settings_json"]),
            "image_paths": [self._resolve(image["path"]) for image in images],
            "trajectory_path": self._resolve(row["trajectory_path"]),
            "created": row["created"],
        }

    def load_images(self, grid_id: int) -> list[Image.Image]:
        """The grid's images, in index order, fully loaded (no open file handles);
        :class:`DamagedFile` when one is missing or cannot be read."""
        images = []
        for path in self.grid(grid_id)["image_paths"]:
            try:
                with Image.open(path) as im:
                    im.load()
                    images.append(im.copy())
            except (OSError, ValueError) as exc:  # missing, truncated or not an image
                raise DamagedFile(
                    f"an image of grid {grid_id} ({path}) is damaged or missing "
                    f"({type(exc).__name__}: {str(exc)[:120]})"
                ) from None
        return images

    def load_tensors(self, grid_id: int) -> dict[str, torch.Tensor]:
        """The grid's trajectory tensors as saved by add_grid (safetensors, no pickle);
        :class:`DamagedFile` when the file is missing or cannot be read."""
        path = self.grid(grid_id)["trajectory_path"]
        try:
            return load_file(path)
        except Exception as exc:  # safetensors' own error, an OSError, …
            raise DamagedFile(
                f"the trajectory of grid {grid_id} ({path}) is damaged or missing "
                f"({type(exc).__name__}: {str(exc)[:120]})"
            ) from None

    def grids_df(self) -> pd.DataFrame:
        """All grids: id, prompt, negative_prompt, seed (first image's), n, model,
        adapter_round (<NA> = base), settings (dict), trajectory_path, created."""
        df = self._frame(
            "SELECT id, prompt, negative_prompt, seed, n, model, adapter_round, settings_json,"
            " trajectory_path, created FROM grids ORDER BY id"
        )
        df["adapter_round"] = df["adapter_round"].astype("Int64")
        df.insert(7, "settings", df.pop("settings_json").map(json.loads))
        return _created(df)

    # -- picks ----------------------------------------------------------------------------------

    def add_pick(
        self,
        grid_id: int,
        *,
        best: int | None,
        worst: int | None,
        kind: str = "pick",
        labeler: str = "",
    ) -> int:
        """Record a label for a grid and return its id; it is on disk when this returns."""
        grid_id = _index(grid_id, "grid id")
        if kind not in PICK_KINDS:
            raise SessionError(f"unknown pick kind {kind!r} (expected pick, tie or skip)")
        if kind == "pick" and (best is None or worst is None):
            raise SessionError("a pick needs both a best and a worst image")
        if kind != "pick" and (best is not None or worst is not None):
            raise SessionError(f"a {kind} takes neither a best nor a worst image")
        if kind == "pick":
            best, worst = _index(best, "best"), _index(worst, "worst")
            if best == worst:
                raise SessionError("best and worst must be different images")
        with self._write():
            row = self._conn.execute("SELECT n FROM grids WHERE id = ?", (grid_id,)).fetchone()
            if row is None:
                raise SessionError(f"no grid with id {grid_id}")
            n = row["n"]
            for name, idx in (("best", best), ("worst", worst)):
                if idx is not None and not 0 <= idx < n:
                    raise SessionError(
                        f"{name} index {idx} is out of range for a grid of {n} images"
                    )
            cur = self._conn.execute(
                "INSERT INTO picks (grid_id, best_idx, worst_idx, kind, labeler, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (grid_id, best, worst, kind, str(labeler), _now()),
            )
            return cur.lastrowid

    def undo_last_pick(self, labeler: str | None = None) -> int | None:
        """Mark the newest live pick (of ``labeler``, if given) undone; return its id or None."""
        where, params = ("AND labeler = ?", (labeler,)) if labeler is not None else ("", ())
        with self._write():
            pick_id = self._conn.execute(
                f"SELECT MAX(id) AS id FROM picks WHERE undone = 0 {where}", params
            ).fetchone()["id"]
            if pick_id is not None:
                self._conn.execute("UPDATE picks SET undone = 1 WHERE id = ?", (pick_id,))
            return pick_id

    def picks_df(self, include_undone: bool = False) -> pd.DataFrame:
        """Picks joined with their prompt: id, grid_id, prompt, best, worst (<NA> for
        tie/skip), kind, labeler, created, undone (bool)."""
        df = self._frame(
            "SELECT p.id, p.grid_id, g.prompt, p.best_idx AS best, p.worst_idx AS worst, p.kind,"
            " p.labeler, p.created, p.undone FROM picks p JOIN grids g ON g.id = p.grid_id"
            f" {'' if include_undone else 'WHERE p.undone = 0'} ORDER BY p.id"
        )
        df["best"] = df["best"].astype("Int64")
        df["worst"] = df["worst"].astype("Int64")
        df["undone"] = df["undone"].astype(bool)
        return _created(df)

    def training_picks(self, since_last_round: bool = True) -> list[dict[str, Any]]:
        """Live best/worst picks to train on: dicts with pick_id, grid_id, best, worst, labeler.

        With ``since_last_round`` only picks newer than the newest round's last_pick_id.
        """
        with self._lock:
            after = 0
            if since_last_round:
                row = self._conn.execute(
                    "SELECT last_pick_id FROM rounds ORDER BY id DESC LIMIT 1"
                ).fetchone()
                after = row["last_pick_id"] if row else 0
            rows = self._conn.execute(
                "SELECT id AS pick_id, grid_id, best_idx AS best, worst_idx AS worst, labeler"
                " FROM picks WHERE kind = 'pick' AND undone = 0 AND id > ? ORDER BY id",
                (after,),
            ).fetchall()
        return [dict(r) for r in rows]

    # -- rounds ---------------------------------------------------------------------------------

    def new_round_dir(self) -> Path:
        """A fresh empty ``adapters/.tmp-<uuid>`` folder for a trainer to write an adapter into."""
        path = self.root / "adapters" / f".tmp-{uuid.uuid4().hex}"
        path.mkdir()
        return path

    def commit_round(
        self, tmp_dir: Path, *, settings: dict, metrics: dict, last_pick_id: int
    ) -> int:
        """Make a filled ``new_round_dir()`` folder round N, record it, activate it; return N.

        The files are fsynced, then the folder is renamed to ``adapters/round-NNNN`` and the
        row inserted in one write transaction: a crash before the commit leaves an unreferenced
        folder that the next open deletes, after it a complete round.
        """
        tmp_dir = self._resolve(tmp_dir)
        if tmp_dir.parent != self.root / "adapters" or not tmp_dir.name.startswith(".tmp-"):
            raise SessionError(f"{tmp_dir} is not a folder made by new_round_dir()")
        if not tmp_dir.is_dir():
            raise SessionError(f"round folder {tmp_dir} does not exist")
        last_pick_id = _index(last_pick_id, "last_pick_id")
        settings_json = _dumps(settings, "round settings")
        metrics_json = _dumps(metrics, "round metrics")
        fsync_tree(tmp_dir)
        with self._write() as undo:
            round_id = self._next_id("rounds")
            rel = f"adapters/round-{round_id:04d}"
            target = self.root / rel
            if target.exists():  # left by a crash while another session was open
                shutil.rmtree(target)
            os.rename(tmp_dir, target)
            undo.append(lambda: os.rename(target, tmp_dir))
            fsync_dir(self.root / "adapters")
            self._conn.execute(
                "INSERT INTO rounds (id, path, settings_json, metrics_json, last_pick_id, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (round_id, rel, settings_json, metrics_json, last_pick_id, _now()),
            )
            self._set_state("active_round", str(round_id))
        return round_id

    def integrity_problems(self) -> list[str]:
        """SQLite's integrity check of the database: empty when it is whole."""
        with self._lock:
            rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        return [r[0] for r in rows if r[0] != "ok"]

    def round_path(self, round_id: int) -> Path:
        """The adapter folder of a committed round."""
        round_id = _index(round_id, "round id")
        row = self._one("SELECT path FROM rounds WHERE id = ?", (round_id,))
        if row is None:
            raise SessionError(f"no round with id {round_id}")
        return self._resolve(row["path"])

    def last_round(self) -> int | None:
        """The newest round's id, or None before the first round."""
        return self._one("SELECT MAX(id) AS id FROM rounds")["id"]

    @property
    def active_round(self) -> int | None:
        """The round new grids are sampled from; None means the base model."""
        row = self._one("SELECT value FROM state WHERE key = 'active_round'")
        return int(row["value"]) if row is not None and row["value"] is not None else None

    def set_active_round(self, round_id: int | None) -> None:
        """Activate a committed round, or the base model with None (a rollback)."""
        with self._write():
            if round_id is None:
                self._set_state("active_round", None)
            else:
                round_id = _index(round_id, "round id")
                self._require_round(round_id)
                self._set_state("active_round", str(round_id))

    def rounds_df(self) -> pd.DataFrame:
        """All rounds: id, path, last_pick_id, created, active (bool), then one column per
        top-level settings key (``setting_<key>``) and per metrics key (``metric_<key>``)."""
        df = self._frame(
            "SELECT id, path, last_pick_id, created, settings_json, metrics_json"
            " FROM rounds ORDER BY id"
        )
        df["active"] = df["id"] == (self.active_round or 0)
        parts = [df]
        for column, prefix in (("settings_json", "setting_"), ("metrics_json", "metric_")):
            values = [json.loads(v) for v in df.pop(column)]
            parts.append(pd.DataFrame(values, index=df.index).add_prefix(prefix))
        return _created(pd.concat(parts, axis=1))

    def _next_id(self, table: str) -> int:
        """The id the next row of ``table`` gets; call inside a write transaction (rows of
        grids and rounds are never deleted, so ids only grow)."""
        sql = f"SELECT COALESCE(MAX(id), 0) + 1 AS next_id FROM {table}"
        return self._conn.execute(sql).fetchone()["next_id"]

    def _require_round(self, round_id: int) -> None:
        row = self._conn.execute("SELECT 1 FROM rounds WHERE id = ?", (round_id,)).fetchone()
        if row is None:
            raise SessionError(f"no round with id {round_id}")

    def _set_state(self, key: str, value: str | None) -> None:
        self._conn.execute(
            "INSERT INTO state (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- comparisons ----------------------------------------------------------------------------

    def add_comparison(
        self,
        *,
        prompt: str,
        seed: int,
        round_a: int | None,
        round_b: int,
        winner: str,
        labeler: str = "",
        shown_left: str = "a",
    ) -> int:
        """Record a blind A/B vote between round_a (None = base) and round_b; return its id."""
        prompt = _prompt(prompt)
        seed = _seed(seed)
        if winner not in WINNERS:
            raise SessionError(f"unknown winner {winner!r} (expected a, b or tie)")
        if shown_left not in ("a", "b"):
            raise SessionError(f"shown_left must be 'a' or 'b', got {shown_left!r}")
        round_b = _index(round_b, "round_b")
        if round_a is not None:
            round_a = _index(round_a, "round_a")
        if round_a == round_b:
            raise SessionError("a comparison needs two different rounds")
        with self._write():
            for r in (round_a, round_b):
                if r is not None:
                    self._require_round(r)
            cur = self._conn.execute(
                "INSERT INTO comparisons (prompt, seed, round_a, round_b, winner, labeler,"
                " created, shown_left) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (prompt, seed, round_a, round_b, winner, str(labeler), _now(), shown_left),
            )
            return cur.lastrowid

    def comparisons_df(self) -> pd.DataFrame:
        """All votes: id, prompt, seed, round_a (<NA> = base), round_b, winner, shown_left,
        labeler, created."""
        df = self._frame(
            "SELECT id, prompt, seed, round_a, round_b, winner, shown_left, labeler, created"
            " FROM comparisons ORDER BY id"
        )
        df["round_a"] = df["round_a"].astype("Int64")
        return _created(df)
