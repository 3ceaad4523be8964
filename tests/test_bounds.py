"""Every declared bound is checked where the input enters: one case per setting and side,
generated from the declarations, so a new setting is covered without a new test."""

from __future__ import annotations

import math

import pytest

from d3po_core.__main__ import main
from d3po_core.errors import SessionError
from d3po_core.objectives import METHODS
from d3po_core.settings import LoraSettings, SampleSettings, specs


def _outside(s) -> list[str]:
    """Values just outside a numeric setting's declared bounds (and NaN for a float)."""
    values = []
    if s.low is not None:
        if s.kind == "int":
            values.append(int(s.low) - (0 if s.low_open else 1))
        else:
            values.append(s.low if s.low_open else s.low - max(1e-3, abs(s.low) * 0.5))
    if s.high is not None:
        values.append(int(s.high) + 1 if s.kind == "int" else s.high * 1.5 + 1)
    if s.kind == "float":
        values.append(math.nan)
    return [str(v) for v in values]


def _cases() -> list[tuple[str, str, str]]:
    seen, cases = set(), []
    for method, m in sorted(METHODS.items()):
        for cls in (SampleSettings, LoraSettings, m.config):
            for s in specs(cls):
                if s.kind not in ("int", "float"):
                    continue
                key = (s.name, s.low, s.high, s.low_open, s.kind)
                if key in seen:
                    continue
                seen.add(key)
                cases += [(method, s.name, value) for value in _outside(s)]
    return cases


CASES = _cases()


def test_the_generated_cases_cover_every_numeric_setting():
    names = {name for _, name, _ in CASES}
    assert {"steps", "n", "guidance", "rank", "beta", "learning_rate", "micro_batch"} <= names
    assert len(CASES) > 40


@pytest.mark.parametrize("method,name,value", CASES, ids=[f"{n}={v}" for _, n, v in CASES])
def test_a_value_outside_its_bounds_is_one_line_and_exit_code_2(
    tmp_path, capsys, method, name, value
):
    args = ["simulate", "--method", method, "--scorer", "jpeg_compressibility"]
    args += ["--prompts", "x", "--session", str(tmp_path / "s"), f"--{name}", value]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "must be" in err and err.count("\n") == 1, err
    assert not (tmp_path / "s").exists()  # refused before anything was written


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_choice_outside_its_declared_options_is_refused(tmp_path, capsys, method):
    choices = [s for s in specs(METHODS[method].config) if s.kind == "choice"]
    for s in choices:
        with pytest.raises(SystemExit) as exit_:
            main(["simulate", "--method", method, "--session", str(tmp_path), f"--{s.name}", "?"])
        assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_paths_and_files_that_cannot_be_used_are_one_line(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("a file where a folder should go")
    assert main(["generate", "--session", str(blocked / "s"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the session folder") and "--session" in err
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"\xff\xfe a red circle\n")
    args = ["simulate", "--scorer", "jpeg_compressibility", "--prompts", str(prompts)]
    assert main([*args, "--session", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {prompts} is not UTF-8 text (byte 0); save it as UTF-8\n"
    # exports into a folder that cannot be created
    from d3po_core.export import export_diffusers
    from d3po_core.session import Session

    with Session.open(tmp_path / "s") as session:
        folder = session.new_round_dir()
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"")
        round_id = session.commit_round(folder, settings={}, metrics={}, last_pick_id=0)
        with pytest.raises(SessionError, match="cannot create the export folder"):
            export_diffusers(session, round_id, blocked / "lora")
    args = ["export", "--session", str(tmp_path / "s"), "--picks", str(blocked / "p.parquet")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot create the export folder") and err.count("\n") == 1
