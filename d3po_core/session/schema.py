"""The session's SQLite tables (DESIGN §3.7); ``PRAGMA user_version`` holds SCHEMA_VERSION."""

from __future__ import annotations

SCHEMA_VERSION = 1

TABLES = (
    """CREATE TABLE prompts (
        id INTEGER PRIMARY KEY,
        text TEXT NOT NULL UNIQUE,
        created TEXT NOT NULL)""",
    """CREATE TABLE rounds (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        settings_json TEXT NOT NULL,
        metrics_json TEXT NOT NULL,
        last_pick_id INTEGER NOT NULL,
        created TEXT NOT NULL)""",
    """CREATE TABLE grids (
        id INTEGER PRIMARY KEY,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER NOT NULL,
        n INTEGER NOT NULL,
        model TEXT NOT NULL,
        adapter_round INTEGER REFERENCES rounds(id),
        settings_json TEXT NOT NULL,
        trajectory_path TEXT NOT NULL,
        created TEXT NOT NULL)""",
    """CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        grid_id INTEGER NOT NULL REFERENCES grids(id),
        idx INTEGER NOT NULL,
        seed INTEGER NOT NULL,
        path TEXT NOT NULL,
        UNIQUE (grid_id, idx))""",
    """CREATE TABLE picks (
        id INTEGER PRIMARY KEY,
        grid_id INTEGER NOT NULL REFERENCES grids(id),
        best_idx INTEGER,
        worst_idx INTEGER,
        kind TEXT NOT NULL CHECK (kind IN ('pick', 'tie', 'skip')),
        labeler TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL,
        undone INTEGER NOT NULL DEFAULT 0 CHECK (undone IN (0, 1)))""",
    "CREATE INDEX picks_grid ON picks(grid_id)",
    """CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        prompt TEXT NOT NULL,
        seed INTEGER NOT NULL,
        round_a INTEGER REFERENCES rounds(id),
        round_b INTEGER NOT NULL REFERENCES rounds(id),
        winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie')),
        labeler TEXT NOT NULL DEFAULT '',
        created TEXT NOT NULL,
        shown_left TEXT NOT NULL CHECK (shown_left IN ('a', 'b')))""",
    "CREATE TABLE state (key TEXT PRIMARY KEY, value TEXT)",
)
