"""Example scorer plug-ins: ``--scorer examples/scorers.py:brightness``."""

from __future__ import annotations

import numpy as np
from PIL import Image


def brightness(image: Image.Image, prompt: str) -> float:
    """Mean luminance (0–255): a preference for brighter images."""
    return float(np.asarray(image.convert("L"), dtype=float).mean())


def redness(image: Image.Image, prompt: str) -> float:
    """How much the red channel exceeds the other two, on average."""
    rgb = np.asarray(image.convert("RGB"), dtype=float)
    return float((rgb[..., 0] - rgb[..., 1:].mean(-1)).mean())
