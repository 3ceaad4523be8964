"""D3PO learns on the embedded model: scripted picks move the images toward the preference."""

from __future__ import annotations

import numpy as np

from d3po_core.models import default_model, load_pipeline
from d3po_core.objectives.d3po import D3POConfig
from d3po_core.sampling import SampleSettings
from d3po_core.session import Session
from d3po_core.simulate import EvalSet, simulate


def brightness(image, prompt: str = "") -> float:
    """Mean luminance: a preference for brighter images."""
    return float(np.asarray(image.convert("L"), dtype=float).mean())


def test_rounds_of_bright_preferences_make_images_brighter(tmp_path):
    pipe = load_pipeline(default_model(), device="cpu")
    with Session.open(tmp_path / "s") as session:
        table = simulate(
            pipe,
            session,
            brightness,
            ["a circle", "a square"],
            rounds=2,
            grids=8,
            settings=SampleSettings(n=4, steps=10, guidance=5.0),
            config=D3POConfig(epochs=2),
            eval_set=EvalSet(["a circle", "a square"], list(range(100, 108))),
        )
    base, last = table[0], table[-1]
    assert last["tuned_mean"] > base["base_mean"] + 5  # grey levels, out of 255
    assert last["win_rate"] >= 0.75
