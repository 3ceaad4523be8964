"""The notebook panels, driven by clicking their buttons as a user would."""

from __future__ import annotations

from d3po_core.methods import D3POConfig
from d3po_core.objectives import METHODS
from d3po_core.settings import DEFAULT_METHOD
from studio.panels import ComparePanel, HistoryPanel, LabelPanel, TrainPanel

from .conftest import FAST


def test_label_train_compare_history_by_clicks(ctl):
    label = LabelPanel(ctl, labeler="ana")
    label.save_button.click()
    assert "Mark exactly one" in label.status.value
    label.prompt.value = "a red circle"
    label.generate_button.click()
    assert label.grid_id == 1 and len(label.grid_box.children) == FAST.n
    for best, worst in ((0, 1), (2, 3)):
        label.choose(best, worst)
        label.save_button.click()
    assert "Saved pick 2" in label.status.value and label.grid_id == 3
    label.tie_button.click()
    label.undo_button.click()
    assert "Undid pick 3" in label.status.value
    assert "<b>2</b> pick(s)" in label.counter.value

    train = TrainPanel(ctl)
    train.epochs.value = 1
    train.train_button.click()
    assert "Round 1 saved" in train.status.value
    assert train.progress.value == train.progress.max > 0 and train.history

    # a second round first measures round 1 on the picks made after it
    label.generate_button.click()
    label.choose(1, 2)
    label.save_button.click()
    train.train_button.click()
    assert "Round 2 saved" in train.status.value
    assert "Held-out agreement of round 1: it ranked" in train.status.value
    assert "of your 1 new picks" in train.status.value

    compare = ComparePanel(ctl, labeler="ana")
    compare.pair_button.click()
    assert compare.left.value and compare.right.value
    compare.left_button.click()
    assert "Left was" in compare.status.value and "win_rate" in compare.rates.value

    history = HistoryPanel(ctl)
    assert "round 1" in str(history.round.options) and "Held-out agreement" in history.tables.value
    history.round.value = None
    history.activate_button.click()
    assert ctl.session.active_round is None and "Base model active" in history.status.value


def test_panels_show_clear_messages(ctl):
    label = LabelPanel(ctl)
    label.prompt.value = ""
    label.generate_button.click()
    assert "prompt is empty" in label.status.value
    train = TrainPanel(ctl)
    train.train_button.click()
    assert "label some grids" in train.status.value
    compare = ComparePanel(ctl)
    compare.pair_button.click()
    assert "Train a round first" in compare.status.value
    assert METHODS[DEFAULT_METHOD].config().epochs == train.epochs.value
    train.method.value = "d3po"
    assert D3POConfig().beta == train.beta.value
