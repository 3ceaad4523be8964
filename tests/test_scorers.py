"""Scorers: JPEG (in)compressibility, plug-ins, scripted picks."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from d3po_core.scorers import (
    ScorerError,
    jpeg_compressibility,
    jpeg_incompressibility,
    load_scorer,
    scripted_pick,
)


def _flat():
    return Image.new("RGB", (64, 64), (200, 30, 30))


def _noisy():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_jpeg_scores_order_flat_and_noisy_images():
    assert jpeg_compressibility(_flat(), "") > jpeg_compressibility(_noisy(), "")
    assert jpeg_incompressibility(_noisy(), "") > jpeg_incompressibility(_flat(), "")
    assert jpeg_incompressibility(_flat(), "") == -jpeg_compressibility(_flat(), "")


def test_builtin_module_and_file_plugins(tmp_path):
    assert load_scorer("jpeg_compressibility") is jpeg_compressibility
    assert load_scorer("d3po_core.scorers:jpeg_incompressibility") is jpeg_incompressibility
    plugin = tmp_path / "my_scorer.py"
    plugin.write_text(
        "def redness(image, prompt):\n"
        "    r, g, b = image.convert('RGB').resize((1, 1)).getpixel((0, 0))\n"
        "    return float(r - (g + b) / 2)\n"
    )
    redness = load_scorer(f"{plugin}:redness")
    assert redness(_flat(), "a red circle") > 0


@pytest.mark.parametrize(
    "spec,message",
    [
        ("nonsense", "not a built-in"),
        ("no_such_module_xyz:fn", "cannot be imported"),
        ("d3po_core.scorers:nope", "has no callable 'nope'"),
        ("missing/file.py:fn", "scorer file not found"),
    ],
)
def test_unresolved_specs_give_clear_errors(spec, message):
    with pytest.raises(ScorerError, match=message):
        load_scorer(spec)


def test_scripted_pick_is_argmax_argmin_and_tie_when_equal():
    assert scripted_pick([0.1, 0.9, -0.2, 0.3]) == (1, 2)
    assert scripted_pick([1.0, 1.0, 1.0]) is None
