"""Subprocess for kill tests: does session work and prints each confirmed result, flushed.

Usage: ``python tests/_session_worker.py ROOT MODE [COUNT [LABELER]]``. A line is printed only
after the call it reports has returned, so the parent can SIGKILL at any moment and then check
that every printed result survived. Modes:

- ``picks``: COUNT picks over the session's grids by LABELER (default "worker"); prints
  ``pick ID GRID BEST WORST LABELER``.
- ``grids``: COUNT 2-image grids; prints ``grid ID``.
- ``round-slow``: fills a new_round_dir() slowly and never commits; prints ``dir PATH`` then
  ``chunk I`` per chunk written.
- ``round-commit``: writes a round and commits it, prints ``committed N``, then starts a
  second round slowly like ``round-slow``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from PIL import Image

from d3po_core.session import Session

ADAPTER_CHUNKS = 50
CHUNK = b"x" * 4096


def say(line: str) -> None:
    print(line, flush=True)


def write_adapter_slowly(session: Session, chunks: int) -> Path:
    """Write a fake adapter folder chunk by chunk, reporting each chunk written."""
    folder = session.new_round_dir()
    say(f"dir {folder}")
    (folder / "adapter_config.json").write_text('{"r": 4}')
    with open(folder / "adapter_model.safetensors", "wb") as f:
        for i in range(chunks):
            f.write(CHUNK)
            f.flush()
            say(f"chunk {i}")
            time.sleep(0.01)
    return folder


def main(root: str, mode: str, count: int, labeler: str = "worker") -> None:
    with Session.open(root) as session:
        if mode == "picks":
            grids = session.grids_df()[["id", "n"]].itertuples(index=False)
            grids = list(grids)
            for i in range(count):
                grid_id, n = grids[i % len(grids)]
                best, worst = i % n, (i + 1) % n
                pick_id = session.add_pick(grid_id, best=best, worst=worst, labeler=labeler)
                say(f"pick {pick_id} {grid_id} {best} {worst} {labeler}")
        elif mode == "grids":
            image = Image.new("RGB", (8, 8), (10, 20, 30))
            for i in range(count):
                grid_id = session.add_grid(
                    f"prompt {i}",
                    [i, i + 1],
                    [image, image],
                    {"latents": torch.full((2, 4), float(i))},
                    model="tiny",
                    adapter_round=None,
                    settings={"i": i},
                )
                say(f"grid {grid_id}")
        elif mode == "round-slow":
            write_adapter_slowly(session, ADAPTER_CHUNKS)
        elif mode == "round-commit":
            folder = write_adapter_slowly(session, 4)
            round_id = session.commit_round(
                folder, settings={"lr": 1e-4}, metrics={"loss": 0.5}, last_pick_id=0
            )
            say(f"committed {round_id}")
            write_adapter_slowly(session, ADAPTER_CHUNKS)
        else:
            raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1, *sys.argv[4:5])
