"""A user error is shown as its message; anything else as a short line, with its traceback
logged to the session's logs/errors.log (the app's callbacks and the notebook panels)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from studio.app import build_app
from studio.panels import LabelPanel, TrainPanel


def _boom(*args, **kwargs):
    raise RuntimeError("boom inside the UNet")


def _log(ctl) -> str:
    path = ctl.session_root / "logs" / "errors.log"
    return path.read_text(encoding="utf-8") if path.exists() else ""


def _assert_logged(ctl, said: str) -> None:
    assert said.startswith("⚠️ unexpected error (RuntimeError: boom inside the UNet)")
    assert "errors.log" in said and "Traceback" not in said
    log = _log(ctl)
    assert "Traceback (most recent call last)" in log and "RuntimeError: boom" in log


def _callback(app, name: str):
    """The app's callback by its function's name, with its inputs at their initial values."""
    fn = next(f for f in app.fns.values() if f.name == name)
    return fn.fn, {c: c.value for c in fn.inputs}, {c.elem_id: c for c in fn.inputs}


def test_controller_attempt_shows_user_errors_as_is_and_logs_the_rest(ctl, monkeypatch):
    assert ctl.attempt(ctl.generate, "") == (None, "⚠️ the prompt is empty")
    assert _log(ctl) == ""
    monkeypatch.setattr("d3po_core.workflow.sample_grid", _boom)
    result, said = ctl.attempt(ctl.generate, "a circle")
    assert result is None
    _assert_logged(ctl, said)


def test_app_generate_shows_a_user_error_and_logs_an_unexpected_one(ctl, monkeypatch):
    show_grid, data, by_id = _callback(build_app(ctl), "show_grid")
    tab = SimpleNamespace(session_hash="tab")  # what Gradio passes as the request
    *_, said = show_grid({**data, by_id["prompt"]: "   "}, tab)
    assert said == "⚠️ the prompt is empty" and _log(ctl) == ""
    monkeypatch.setattr("d3po_core.workflow.sample_grid", _boom)
    *unchanged, said = show_grid({**data, by_id["prompt"]: "a circle"}, tab)
    _assert_logged(ctl, said)
    assert all(u == {"__type__": "update"} for u in unchanged)  # the grid on screen stays
    assert ctl.session.grids_df().empty


def test_app_train_shows_a_user_error_and_logs_an_unexpected_one(ctl, monkeypatch):
    train, data, _ = _callback(build_app(ctl), "train")
    said, *_ = list(train(data))[-1]
    assert said.startswith("⚠️") and "label some grids" in said and _log(ctl) == ""
    monkeypatch.setattr("d3po_core.workflow.train_round", _boom)
    said, *_ = list(train(data))[-1]
    _assert_logged(ctl, said)


@pytest.mark.parametrize("where", ["label", "train"])
def test_panels_show_a_short_line_and_log_an_unexpected_error(ctl, monkeypatch, where):
    if where == "label":
        monkeypatch.setattr("d3po_core.workflow.sample_grid", _boom)
        panel = LabelPanel(ctl)
        panel.generate_button.click()
    else:
        monkeypatch.setattr("d3po_core.workflow.train_round", _boom)
        panel = TrainPanel(ctl)
        panel.train_button.click()
    _assert_logged(ctl, panel.status.value)


def test_panel_settings_out_of_bounds_are_a_clear_message(ctl):
    panel = TrainPanel(ctl)
    panel.method.value = "d3po"
    panel.settings["ratio_clip"].value = "tight"
    panel.train_button.click()
    assert panel.status.value == "⚠️ ratio clip must be a number, not 'tight'"
    label = LabelPanel(ctl)
    label.sampling["negative_prompt"].value = "x" * 5000
    label.generate_button.click()
    assert label.status.value.startswith("⚠️") and "negative" in label.status.value
    assert _log(ctl) == "" and ctl.session.grids_df().empty
