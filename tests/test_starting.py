"""The studio serves its page before the model loads: the page needs no engine import, shows
"Loading the model…", and fills in the model line, sampling defaults and pick count when the
model is in; an action started meanwhile waits for it; a failed load is one line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from d3po_core.errors import D3POError
from d3po_core.models import default_model
from d3po_core.settings import SampleSettings, spec
from studio import views
from studio.app import build_app
from studio.starting import Starting

from .conftest import REPO, free_port, repo_env


def _callback(app, name: str):
    fn = next(f for f in app.fns.values() if f.name == name)
    return fn.fn, fn.outputs


def test_the_page_needs_neither_torch_nor_diffusers():
    code = (
        "import sys; import studio.app, studio.__main__, studio.starting; "
        "print(sorted(m for m in ('torch', 'diffusers', 'peft', 'accelerate') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=repo_env(), cwd=REPO
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_page_laid_out_while_loading_fills_in_when_the_model_is_in(tmp_path):
    model = str(default_model())  # recommends its own guidance (2.0, not the declared 7.5)
    starting = Starting(tmp_path / "s", model=model, device="cpu")
    assert not starting.is_loaded
    assert starting.peek(lambda c: c.model_info(), "not yet") == "not yet"
    app = build_app(starting)  # nothing is loaded to lay out the page
    assert not starting.is_loaded
    model_info = next(b for b in app.blocks.values() if getattr(b, "elem_id", "") == "model-info")
    assert model_info.value == views.LOADING_MODEL
    label = spec(SampleSettings, "guidance").label
    guidance = next(b for b in app.blocks.values() if getattr(b, "label", "") == label)
    assert guidance.value == SampleSettings().guidance  # the declared default, until loaded

    when_loaded, outputs = _callback(app, "when_loaded")
    values = dict(zip(outputs, when_loaded(), strict=True))  # starts the load, waits for it
    try:
        assert starting.is_loaded
        real = starting.wait()
        assert values[model_info] == views.model_line(real.model_info())
        assert values[guidance] == real.sample_settings.guidance != SampleSettings().guidance
        assert starting.session_root == real.session_root == (tmp_path / "s")  # forwarded
        assert starting.peek(lambda c: c.model, None) == model
    finally:
        starting.close()


def test_a_loaded_controller_is_started_already(ctl):
    starting = Starting.loaded(ctl)
    assert starting.is_loaded and starting.start() is starting and starting.wait() is ctl
    assert starting.peek(lambda c: c.session_root, None) == ctl.session_root


def test_an_action_before_the_model_is_in_waits_for_it(tmp_path, tiny_eps):
    starting = Starting(tmp_path / "s", model=str(tiny_eps), device="cpu").start()
    try:
        view = starting.generate("a circle", n=2, settings=SampleSettings(steps=2, n=2))
        assert len(view.images) == 2 and starting.is_loaded
    finally:
        starting.close()


def test_a_failed_load_is_raised_by_every_action(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    starting = Starting(blocker / "s").start()
    with pytest.raises(D3POError):
        starting.wait()
    with pytest.raises(D3POError):
        starting.generate("a circle")
    assert not starting.is_loaded
    assert starting.peek(lambda c: c.model, "none") == "none"


def test_the_studio_stops_with_one_line_when_its_session_cannot_open(tmp_path, capsys, monkeypatch):
    from studio import __main__ as studio_main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(studio_main, "FIRST_PAGE_GRACE_S", 0.0)  # no browser comes
    code = studio_main.main(["--session", str(blocker / "s"), "--port", str(free_port())])
    out, err = capsys.readouterr()
    assert code == 2 and "ready at" in out
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1
