"""Subprocess for the round kill test: labels grids, then trains rounds, printing what is done.

Usage: ``python tests/_train_worker.py SESSION MODEL``. Prints ``pick ID`` after each confirmed
pick, ``step K`` after each optimizer step and ``committed N`` after each committed round; it
trains round after round until killed.
"""

from __future__ import annotations

import sys

from d3po_core.methods import D3POConfig
from d3po_core.models import load_pipeline
from d3po_core.sampling import SampleSettings
from d3po_core.scorers import jpeg_compressibility
from d3po_core.session import Session
from d3po_core.workflow import generate, label_with_scorer, sync_active, train_round


def say(line: str) -> None:
    print(line, flush=True)


def main(root: str, model: str) -> None:
    settings = SampleSettings(n=2, steps=4, guidance=5.0)
    config = D3POConfig(epochs=2, batch_size=1)
    with Session.open(root) as session:
        pipe = load_pipeline(model, device="cpu")
        sync_active(pipe, session)
        seed = 0
        while True:
            for _ in range(2):
                grid_id, _grid = generate(pipe, session, "a red circle", settings, seed=seed)
                seed += 2
                say(f"pick {label_with_scorer(session, grid_id, jpeg_compressibility)}")
            round_id, _ = train_round(
                pipe, session, config, on_progress=lambda e: say(f"step {e.step}")
            )
            say(f"committed {round_id}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
