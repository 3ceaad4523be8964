"""Tastes the defaults were not chosen on: do they learn a person's taste they never saw?

    python bench/unseen_tastes.py [--seeds 3] [--only VARIANT,...] [--jobs 2] [--report-only]

The defaults (``bench/tastes.py``'s ``DEFAULT_VARIANT``) were chosen on five scripted tastes.
A person's taste is none of them, so these five, written after the defaults were fixed and
never used to choose anything, check that the choice carries over:

- **light**: a bright image, the mean luma of the whole image / 255 (mostly the background:
  white, beige and sky over gray and black);
- **vivid**: a saturated shape, the mean HSV saturation of its pixels (red and blue over white,
  black and gray; unlike warmth, blue counts as much as orange);
- **bottom_right**: the shape toward the bottom-right corner, the mirror of top-left;
- **dark** and **muted**: light's and vivid's mirrors. Random picks move shapes down and to
  the right and make them more vivid (docs/benchmarks.md §5), so bottom_right and vivid get
  part of their win rate for nothing; a mirror has to be learned against that drift, and the
  mean of a pair of mirrors cancels it.

Each run is the taste benchmark's (the open prompts, 8 grids of 4 a round, 3 rounds, 64
paired evaluation samples, a random-picks control judged by these scorers), with the same
report, in bench/results/tastes-unseen; the plot is docs/img/tastes-unseen.png.
"""

from __future__ import annotations

import numpy as np
import runs
import tastes
from PIL import Image


def light(image: Image.Image, prompt: str = "") -> float:
    """Brightness: the mean luma of the whole image / 255, in [0, 1]."""
    return float(tastes._luma(tastes._rgb(image)).mean() / 255.0)


def _saturation(image: Image.Image) -> float | None:
    """The mean over the shape's pixels of (max − min) / max of its RGB (HSV's saturation),
    in [0, 1]; None for no shape."""
    rgb = tastes._rgb(image)
    mask = tastes.shape_mask(rgb)
    if not mask.any():
        return None
    shape = rgb[mask]
    top = shape.max(axis=1)
    spread = top - shape.min(axis=1)
    return float(np.where(top > 0, spread / np.maximum(top, 1e-9), 0.0).mean())


def vivid(image: Image.Image, prompt: str = "") -> float:
    """Saturation: the shape's mean HSV saturation, in [0, 1]; 0 for no shape."""
    saturation = _saturation(image)
    return 0.0 if saturation is None else saturation


def dark(image: Image.Image, prompt: str = "") -> float:
    """Darkness: light's mirror, 1 − the mean luma / 255."""
    return 1.0 - light(image)


def muted(image: Image.Image, prompt: str = "") -> float:
    """A muted shape: vivid's mirror, 1 − its saturation (white, black and gray shapes over
    red and blue); 0 for no shape."""
    saturation = _saturation(image)
    return 0.0 if saturation is None else 1.0 - saturation


def bottom_right(image: Image.Image, prompt: str = "") -> float:
    """Composition: the shape's centre of mass toward the bottom-right corner (top-left's
    score of the image turned half a circle); 0.5 for no shape."""
    return tastes.top_left(image.rotate(180))


UNSEEN: dict[str, tuple[tastes.Scorer, str]] = {
    "light": (light, "a bright image: mean luma / 255"),
    "vivid": (vivid, "a saturated shape: mean HSV saturation of the shape"),
    "bottom_right": (bottom_right, "shape toward the bottom-right: 1 − distance/diagonal"),
    "dark": (dark, "a dark image: 1 − mean luma / 255"),
    "muted": (muted, "a muted shape: 1 − mean HSV saturation of the shape"),
}
#: the variants worth checking: the defaults, the defaults before them, D3PO's own, and
#: mirrored rounds (whose aim is the drift these tastes showed)
CHECKED = (
    tastes.DEFAULT_VARIANT,
    "kto-replay-b5000-e3",
    "kto-replay-b5000",
    "d3po",
    "kto-replay-b5000-e3-mirror",
    "kto-replay-b5000-e3-mirror-lr2e-3",
)


def specs(seeds: int, rounds: int, prompts: list[str] = tastes.OPEN_PROMPTS) -> list[dict]:
    """The checked variants' runs on the unseen tastes and the control, seed by seed."""
    return [s for s in tastes.specs(seeds, rounds, prompts, UNSEEN) if s["variant"] in CHECKED]


def use_unseen() -> None:
    """Make the taste benchmark label, score and report by the unseen tastes."""
    tastes.TASTES = UNSEEN


if __name__ == "__main__":
    use_unseen()
    runs.main(
        __doc__.splitlines()[0],
        specs,
        tastes.report,
        seeds=3,
        plot="tastes-unseen.png",
        rounds=3,
        out="tastes-unseen",
        runner=tastes.run_taste,
        describe=tastes.describe,
        prompt_sets={"open": (tastes.OPEN_PROMPTS, "tastes-unseen")},
    )
