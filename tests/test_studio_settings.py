"""The studio's settings controls are derived from the declarations, and every setting is
either shown (in the app and in the panels) or hidden on purpose with a reason."""

from __future__ import annotations

from dataclasses import fields

import pytest

from d3po_core.errors import SettingsError
from d3po_core.methods import D3POConfig
from d3po_core.settings import LoraSettings, SampleSettings
from studio import controls
from studio.app import build_app
from studio.panels import LabelPanel, TrainPanel

TRAIN_SHOWN = controls.TRAIN_MAIN + controls.TRAIN_ADVANCED
SAMPLE_SHOWN = controls.LABEL_MAIN + controls.SAMPLING
FORMS = controls.TRAIN_FORMS
SHOWN = [(form.root, p) for form in FORMS.values() for p in form.shown] + [
    (controls.SAMPLE_ROOT, p) for p in SAMPLE_SHOWN
]


def _paths(cls: type, prefix: str = "") -> list[str]:
    """Every leaf setting of a settings class; nested settings by their dotted path."""
    paths = []
    for f in fields(cls):
        if f.name == "lora" and cls is not LoraSettings:
            paths += _paths(LoraSettings, "lora.")
        else:
            paths.append(prefix + f.name)
    return paths


@pytest.mark.parametrize(
    "root,shown,hidden",
    [(form.root, form.shown, form.hidden) for form in FORMS.values()]
    + [(SampleSettings, SAMPLE_SHOWN, controls.SAMPLING_HIDDEN)],
    ids=[*FORMS, "sampling"],
)
def test_every_setting_is_shown_once_or_hidden_with_a_reason(root, shown, hidden):
    assert sorted([*shown, *hidden]) == sorted(_paths(root))  # each exactly once, none unknown
    assert all(len(reason) > 20 for reason in hidden.values())


def test_the_app_and_the_panels_show_every_shown_setting(ctl):
    app = build_app(ctl)
    in_app = {(getattr(b, "label", None), getattr(b, "info", None)) for b in app.blocks.values()}
    for root, path in SHOWN:
        s = controls.field_spec(root, path)
        assert (s.label, s.help) in in_app, path
    panel = TrainPanel(ctl)
    assert tuple(panel.settings) == TRAIN_SHOWN
    for name, form in FORMS.items():
        panel.method.value = name
        assert tuple(panel.settings) == form.shown
    assert tuple(LabelPanel(ctl).sampling) == SAMPLE_SHOWN


def _values(choices) -> list:
    return [c[1] if isinstance(c, tuple) else c for c in choices]


@pytest.mark.parametrize("root,path", SHOWN, ids=[p for _, p in SHOWN])
def test_controls_carry_the_declared_label_help_bounds_and_choices(root, path):
    s = controls.field_spec(root, path)
    control, widget = controls.gradio_control(root, path), controls.widget(root, path)
    assert (control.label, control.info) == (s.label, s.help)
    assert (widget.description, widget.tooltip) == (s.label, s.help)
    kind = type(control).__name__
    if s.kind == "choice":
        none = [controls.NONE_CHOICE] if s.optional else []
        assert _values(control.choices) == [*none, *s.choices]
        assert _values(widget.options) == [None] * len(none) + list(s.choices)
    elif kind == "Slider":
        step = s.step or 1
        assert (control.minimum, control.maximum, control.step) == (s.low, s.high, step)
        assert (widget.min, widget.max, widget.step) == (s.low, s.high, step)
    elif kind == "Number":
        assert control.minimum == (None if s.low_open else s.low)
        assert control.maximum == s.high
    elif s.optional:  # an optional number: empty is "off" or "auto", bounds checked on use
        assert control.placeholder == widget.placeholder == s.none in ("off", "auto")
        assert control.value == widget.value == ""
    else:
        assert s.kind in ("bool", "str"), f"{path} is a {kind}"


@pytest.mark.parametrize("make", [controls.gradio_control, controls.widget])
def test_controls_left_alone_give_the_declared_defaults(make):
    for form in FORMS.values():
        train = {p: make(form.root, p).value for p in form.shown}
        assert controls.settings_from(form.root(), train) == form.root()
    sample = {p: make(controls.SAMPLE_ROOT, p).value for p in SAMPLE_SHOWN}
    assert controls.settings_from(SampleSettings(), sample) == SampleSettings()


def test_control_values_become_typed_settings_and_bad_ones_a_settings_error():
    config = controls.settings_from(
        D3POConfig(),
        {"epochs": 3.0, "ratio_clip": "0.2", "mixed_precision": "bf16", "lora.rank": 8},
    )
    assert (config.epochs, config.ratio_clip, config.mixed_precision) == (3, 0.2, "bf16")
    assert config.lora == LoraSettings(rank=8)
    off = controls.settings_from(config, {"ratio_clip": "", "mixed_precision": "auto"})
    assert off.ratio_clip is None and off.mixed_precision is None
    with pytest.raises(SettingsError, match="ratio clip must be a number"):
        controls.settings_from(D3POConfig(), {"ratio_clip": "tight"})
    with pytest.raises(SettingsError, match="beta"):
        controls.settings_from(D3POConfig(), {"beta": 0})
    with pytest.raises(SettingsError, match="grid size"):
        controls.settings_from(SampleSettings(), {"n": 17})
