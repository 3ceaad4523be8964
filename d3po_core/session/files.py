"""Durable files for the session: fsync, write-then-rename, and the sweep after a crash.

A file is written under a temporary name, fsynced and renamed into place; the folder is fsynced
so the rename itself survives a power cut. What a kill can leave behind (``*.tmp`` files,
``adapters/.tmp-*`` folders, grid files and round folders no committed row references) is
removed by :func:`remove_leftovers` when no other session is open.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

GRID_FILE = re.compile(r"grid-(\d+)(-\d+)?\.(png|safetensors)")
_UMASK = os.umask(0)  # read once: the mode a plain file of this process gets
os.umask(_UMASK)


def readable(path: Path) -> Path:
    """Give a file the mode any file this process creates gets (safetensors writes 0600, so
    other users and tools could not read an exported LoRA)."""
    os.chmod(path, 0o666 & ~_UMASK)
    return path


ROUND_DIR = re.compile(r"round-\d+")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX only: Windows cannot open a folder)."""
    if os.name == "posix":
        fsync_file(path)


def fsync_tree(path: Path) -> None:
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            fsync_file(Path(dirpath, name))
        fsync_dir(Path(dirpath))


def replace_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new, never a part."""
    tmp = path.with_name(f".{path.stem}-{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def remove_leftovers(root: Path, referenced: set[str], rounds: set[str]) -> None:
    """Remove temp files and folders, and grid files or round folders no row references.

    ``referenced``: the image and trajectory paths of committed grids; ``rounds``: the folders
    of committed rounds; both relative to ``root`` in POSIX form, as the database stores them.
    """
    for sub in ("", "images", "trajectories", "adapters"):
        folder = root / sub
        for entry in folder.iterdir():
            rel = entry.relative_to(root).as_posix()
            if entry.is_file() and entry.name.endswith(".tmp"):
                entry.unlink()
            elif sub in ("images", "trajectories") and GRID_FILE.fullmatch(entry.name):
                if rel not in referenced:
                    entry.unlink()
            elif sub == "adapters" and entry.is_dir() and not entry.is_symlink():
                temp = entry.name.startswith(".tmp-")
                if temp or (ROUND_DIR.fullmatch(entry.name) and rel not in rounds):
                    shutil.rmtree(entry)
