"""Subprocess for the one-round-at-a-time test: labels two grids, then trains one very long
round, printing ``training`` at its first step; it runs until killed.

Usage: ``python tests/_long_round_worker.py SESSION MODEL``.
"""

from __future__ import annotations

import sys

from d3po_core.methods import D3POConfig
from d3po_core.models import load_pipeline
from d3po_core.sampling import SampleSettings
from d3po_core.scorers import jpeg_compressibility
from d3po_core.session import Session
from d3po_core.workflow import generate, label_with_scorer, train_round


def main(root: str, model: str) -> None:
    settings = SampleSettings(n=2, steps=4, guidance=5.0)
    with Session.open(root) as session:
        pipe = load_pipeline(model, device="cpu")
        for seed in (0, 2):
            grid_id, _grid = generate(pipe, session, "a red circle", settings, seed=seed)
            label_with_scorer(session, grid_id, jpeg_compressibility)
        told = []

        def on_progress(event) -> None:
            if not told:
                told.append(print("training", flush=True))

        train_round(pipe, session, D3POConfig(epochs=100, batch_size=1), on_progress=on_progress)


if __name__ == "__main__":
    main(*sys.argv[1:3])
