"""History an artist can read: human names, rounded numbers, local time, a plot point for
every round, the picks as best-beside-worst pictures, per-labeler agreement."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from d3po_core.errors import DamagedFile
from d3po_core.methods import D3POConfig
from studio import views


def _label(ctl, grids, labeler, best=0, worst=1, seed=0):
    ids = []
    for i in range(grids):
        view = ctl.generate("a red circle", seed=seed + 10 * i)
        ctl.pick(view.grid_id, best=best, worst=worst, labeler=labeler)
        ids.append(view.grid_id)
    return ids


def test_rounds_and_picks_read_like_a_report(ctl):
    _label(ctl, 2, "ana")
    ctl.train(D3POConfig(epochs=1, batch_size=4))
    table = views.round_table(ctl.rounds())
    assert list(table.columns) == [
        "Round", "Active", "Trained", "Method", "Picks", "Loss", "Accuracy",
        "Held-out agreement", "Seconds",
    ]  # fmt: skip
    row = table.iloc[0]
    assert row["Active"] == "yes" and row["Method"] == "d3po"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", row["Trained"])
    assert row["Loss"] == round(row["Loss"], 3)
    picks = views.picks_table(ctl.picks())
    assert list(picks.columns) == [
        "Pick", "Grid", "Prompt", "Best", "Worst", "Kind", "Labeler", "Made"
    ]  # fmt: skip
    assert picks["Best"].tolist() == [1, 1] and picks["Worst"].tolist() == [2, 2]  # 1-based


def test_the_metrics_plot_has_a_point_for_a_single_round(ctl):
    assert views.metrics_figure(ctl.rounds()).axes[0].texts  # "no rounds yet"
    _label(ctl, 2, "ana")
    ctl.train(D3POConfig(epochs=1, batch_size=4))
    axes = views.metrics_figure(ctl.rounds()).axes[0]
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert {"loss", "accuracy"} <= set(lines)
    assert all(len(line.get_xdata()) == 1 and line.get_marker() == "o" for line in lines.values())


def test_gallery_shows_best_beside_worst_by_round_and_labeler(ctl):
    _label(ctl, 2, "ana")
    ctl.train(D3POConfig(epochs=1, batch_size=4))
    _label(ctl, 1, "ben", best=2, worst=3, seed=5)
    everyone = ctl.pick_gallery()
    assert len(everyone) == 3
    image, caption = everyone[0]  # the latest first
    assert image.size == (2 * 192 + 8, 192)
    assert caption == "Pick 3 · ben · not trained yet · “a red circle”: best | worst"
    # crisp: a 32 px image scaled 6× by nearest neighbour keeps 6×6 blocks of one colour
    block = image.crop((0, 0, 6, 6))
    assert len(block.getcolors()) == 1
    assert [c for _, c in ctl.pick_gallery(1)] == [
        "Pick 2 · ana · round 1 · “a red circle”: best | worst",
        "Pick 1 · ana · round 1 · “a red circle”: best | worst",
    ]
    assert len(ctl.pick_gallery("new")) == 1 and len(ctl.pick_gallery(labeler="ana")) == 2


def test_a_damaged_image_file_keeps_its_pick_in_the_gallery_and_names_the_file(ctl):
    grids = _label(ctl, 2, "ana")
    pick = ctl.picks().iloc[0]
    best = ctl.session.grid(int(pick["grid_id"]))["image_paths"][int(pick["best"])]
    best.write_bytes(b"not a png")  # damaged on disk; the pick's row is whole
    shown = ctl.pick_gallery()
    assert len(shown) == 2
    damaged = [caption for _, caption in shown if "cannot read" in caption]
    assert len(damaged) == 1 and best.name in damaged[0] and "damaged or missing" in damaged[0]
    with pytest.raises(DamagedFile, match=f"an image of grid {grids[0]} .*damaged or missing"):
        ctl.session.load_images(grids[0])
    assert len(ctl.picks()) == 2  # nothing lost


def test_per_labeler_agreement_for_a_small_team(ctl):
    grids = _label(ctl, 2, "ana")
    ctl.pick(grids[0], best=0, worst=1, labeler="ben")  # agrees
    ctl.pick(grids[1], best=0, worst=3, labeler="ben")  # same best only
    table = views.labelers_table(ctl.labelers()).set_index("Labeler")
    assert table.loc["ana", "Picks"] == 2 and table.loc["ben", "Grids shared with others"] == 2
    assert table.loc["ben", "Same best and worst"] == 0.5 and table.loc["ben", "Same best"] == 1


def test_grids_of_any_size_fill_their_rows():
    for n in range(2, 17):
        columns = views.grid_columns(n)
        rows = -(-n // columns)
        assert columns <= 8 and rows * columns - n < rows  # at most one empty cell a row
    assert [views.grid_columns(n) for n in (2, 4, 6, 9, 12, 16)] == [2, 4, 6, 5, 6, 8]
    assert views.metrics_long(pd.DataFrame()).empty


def test_agreement_between_two_labelers_reads_in_words(ctl):
    grids = _label(ctl, 1, "ana")
    ctl.pick(grids[0], best=0, worst=1, labeler="ben")
    table = views.agreement_table(ctl.agreement())
    assert table.to_dict("records") == [
        {
            "Labeler": "ana",
            "and labeler": "ben",
            "Grids both picked": 1,
            "Same best and worst": 1.0,
            "Same best": 1.0,
        }
    ]


def test_small_images_are_shown_crisp():
    from PIL import Image

    small = Image.new("RGB", (64, 64), "white")
    small.putpixel((0, 0), (255, 0, 0))
    (big,) = views.crisp([small])
    assert big.size == (256, 256)
    assert {big.getpixel((x, y)) for x in range(4) for y in range(4)} == {(255, 0, 0)}
    assert big.getpixel((4, 4)) == (255, 255, 255)  # no smoothing across the pixel's edge
    large = Image.new("RGB", (512, 512))
    assert views.crisp([large])[0] is large
