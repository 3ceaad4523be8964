"""``python -m d3po_core check``: what of a session folder is whole, and what is not.

Reads the database (SQLite's own integrity check), every grid's trajectory and images, and
every round's adapter files, as the commands that use them would. Opening the session is the
only write, as for any command (it clears what an interrupted command left half-written).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from PIL import Image
from safetensors.torch import load_file

from d3po_core.errors import DamagedFile, SessionError

from ..models import LORA_WEIGHT_NAME
from .store import Session


@dataclass(frozen=True)
class Finding:
    part: str  # "database", "grid", "round"
    item: str  # "session.db", "grid 3", "round 2"
    whole: bool
    detail: str = ""


def check_session(root: str | Path) -> list[Finding]:
    """A finding per part of the session at ``root``: the database, each grid, each round."""
    root = Path(root).expanduser().resolve()
    if not (root / "session.db").is_file():
        raise SessionError(f"no session at {root} (no session.db)")
    try:
        session = Session.open(root, create=False)
    except SessionError as exc:
        on_disk = {sub: _count(root / sub) for sub in ("images", "trajectories", "adapters")}
        left = ", ".join(f"{n} file(s) in {sub}/" for sub, n in on_disk.items())
        return [Finding("database", "session.db", False, f"{exc} (on disk: {left})")]
    with session:
        problems = session.integrity_problems()
        findings = [Finding("database", "session.db", not problems, "; ".join(problems[:3]))]
        picks = session.picks_df()
        for grid_id in session.grids_df()["id"]:
            findings.append(_check_grid(session, int(grid_id), picks))
        active = session.active_round
        for round_id in session.rounds_df()["id"]:
            finding = _check_round(session.round_path(int(round_id)), int(round_id))
            if round_id == active:
                finding = replace(finding, item=f"{finding.item} (active)")
            findings.append(finding)
    return findings


def _count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _check_grid(session: Session, grid_id: int, picks: pd.DataFrame) -> Finding:
    problems = []
    try:
        session.load_tensors(grid_id)
    except DamagedFile as exc:
        problems.append(str(exc))
    for i, path in enumerate(session.grid(grid_id)["image_paths"]):
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as exc:
            problems.append(f"image {i} ({path}) cannot be read ({type(exc).__name__})")
    if not problems:
        return Finding("grid", f"grid {grid_id}", True)
    n_picks = int((picks["grid_id"] == grid_id).sum()) if len(picks) else 0
    lost = f"; its {n_picks} pick(s) cannot be trained on" if n_picks else ""
    return Finding("grid", f"grid {grid_id}", False, "; ".join(problems) + lost)


def _check_round(folder: Path, round_id: int) -> Finding:
    weights = folder / LORA_WEIGHT_NAME
    try:
        load_file(weights)
        settings = folder / "lora_settings.json"
        if settings.is_file():
            json.loads(settings.read_text())
    except Exception as exc:
        detail = f"adapter {weights} cannot be read ({type(exc).__name__}: {str(exc)[:100]})"
        return Finding("round", f"round {round_id}", False, detail)
    return Finding("round", f"round {round_id}", True)


def report(findings: list[Finding]) -> str:
    """Lines for a person: a count of what is whole per part, then each thing that is not,
    then how to go on."""
    lines = []
    for part, label in (("database", "database"), ("grid", "grids"), ("round", "rounds")):
        found = [f for f in findings if f.part == part]
        if not found:
            continue
        whole = sum(f.whole for f in found)
        lines.append(f"{label}: {whole} of {len(found)} whole")
        lines += [f"  ✗ {f.item}: {f.detail}" for f in found if not f.whole]
    damaged = [f for f in findings if not f.whole]
    if not damaged:
        lines.append("everything is whole")
    elif any(f.part == "round" for f in damaged):
        lines.append(
            "a damaged round's adapter is skipped: the session opens on the last whole round "
            "before it (or the base model)"
        )
    if any(f.part == "grid" for f in damaged):
        lines.append("rounds leave out the picks of damaged grids and train on the rest")
    return "\n".join(lines)
