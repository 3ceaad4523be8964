"""The headless CLI: help, the label/train/export loop, simulate, errors, accelerate launch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import fields

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from d3po_core.__main__ import main
from d3po_core.objectives import METHODS
from d3po_core.session import Session
from d3po_core.settings import LoraSettings, SampleSettings, spec

from .conftest import repo_env

COMMANDS = ["generate", "label", "train", "simulate", "export"]
SMALL = ["--grid-size", "2", "--steps", "4", "--guidance", "5"]


def test_module_help_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "d3po_core", "--help"],
        capture_output=True,
        text=True,
        env=repo_env(),
    )
    assert out.returncode == 0
    for command in COMMANDS:
        assert command in out.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--session" in capsys.readouterr().out


def test_generate_label_train_export(tiny_eps, tmp_path, capsys):
    session, model = str(tmp_path / "s"), str(tiny_eps)
    base = ["--session", session]
    assert (
        main(
            [
                "generate",
                *base,
                "--model",
                model,
                "--prompt",
                "a red circle",
                "--grids",
                "2",
                "--seed",
                "3",
                *SMALL,
            ]
        )
        == 0
    )
    assert main(["label", *base, "--scorer", "jpeg_incompressibility"]) == 0
    assert "labeled 2 grid(s)" in capsys.readouterr().out
    assert main(["train", *base, "--model", model, "--epochs", "1", "--batch-size", "4"]) == 0
    assert "round 1 committed" in capsys.readouterr().out
    lora, kohya, picks = tmp_path / "lora", tmp_path / "k.safetensors", tmp_path / "p.parquet"
    code = main(
        [
            "export",
            *base,
            "--model",
            model,
            "--lora",
            str(lora),
            "--kohya",
            str(kohya),
            "--picks",
            str(picks),
        ]
    )
    assert code == 0
    assert (lora / "pytorch_lora_weights.safetensors").is_file()
    assert all(k.startswith("lora_unet_") for k in load_file(kohya))
    assert len(pd.read_parquet(picks)) == 2
    # the files written for the user get the mode any new file gets (safetensors writes 0600)
    umask = os.umask(0)
    os.umask(umask)
    for written in (lora / "pytorch_lora_weights.safetensors", kohya, picks):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written
    with Session.open(session) as s:
        assert s.grids_df()["seed"].tolist() == [3, 5]
        assert s.picks_df()["labeler"].tolist() == ["scorer", "scorer"]
        trained = load_file(s.round_path(1) / "pytorch_lora_weights.safetensors")
    # the LoRA is exported at the strength grids sample at (1.25 unless told): up weights
    # scaled by it, the rest as trained; --strength 1 gives the round's file as it is
    exported = load_file(lora / "pytorch_lora_weights.safetensors")
    assert exported.keys() == trained.keys()
    for key, value in trained.items():
        scale = 1.25 if ".up." in key or "lora_B" in key else 1.0
        torch.testing.assert_close(exported[key], value * scale)
    plain = tmp_path / "plain"
    assert main(["export", *base, "--lora", str(plain), "--strength", "1"]) == 0
    again = load_file(plain / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(again[k], v) for k, v in trained.items())


@pytest.mark.parametrize("method", ["diffusion-dpo", "sft", "kto"])
def test_train_takes_another_method_on_picks(tiny_eps, tmp_path, method, capsys):
    base = ["--session", str(tmp_path / "s")]
    model = ["--model", str(tiny_eps)]
    grids = ["--prompt", "a red circle", "--grids", "2", "--seed", "3", *SMALL]
    assert main(["generate", *base, *model, *grids]) == 0
    assert main(["label", *base, "--scorer", "jpeg_incompressibility"]) == 0
    args = ["train", *base, *model, "--method", method, "--noise-draws", "2", "--epochs", "1"]
    assert main(args) == 0
    assert "round 1 committed" in capsys.readouterr().out
    with Session.open(tmp_path / "s", create=False) as session:
        rounds = session.rounds_df()
        assert rounds["setting_method"].tolist() == [method]
        assert rounds["setting_noise_draws"].tolist() == [2]
    assert main(["train", *base, *model, "--method", "ddpo"]) == 2  # rewards, not picks
    assert "needs rewards" in capsys.readouterr().err


def test_simulate_prints_a_table_and_writes_json(tiny_eps, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "sim.json"
    args = ["simulate", "--session", str(tmp_path / "s"), "--model", str(tiny_eps)]
    args += [
        "--scorer",
        "jpeg_compressibility",
        "--rounds",
        "2",
        "--grids",
        "2",
        "--prompts",
        str(prompts),
    ]
    args += ["--eval-seeds", "2", "--epochs", "1", "--json", str(out), *SMALL]
    assert main(args) == 0
    table = json.loads(out.read_text())["rounds"]
    assert [row["round"] for row in table] == [0, 1, 2]
    assert table[0]["win_rate"] == 0.5 and table[0]["tuned_mean"] == table[0]["base_mean"]
    for row in table[1:]:
        assert row["loss"] is not None and 0 <= row["win_rate"] <= 1
        assert row["base_mean"] == table[0]["base_mean"]  # the same fixed eval set
    # held-out agreement: none for the base model; each round's on the picks made after it
    assert table[0]["heldout_agreement"] is None
    assert all(0 <= row["heldout_agreement"] <= 1 for row in table[1:])
    with Session.open(tmp_path / "s", create=False) as session:
        assert session.rounds_df()["metric_heldout_round"].tolist()[1] == 1
        assert len(session.training_picks()) == 2  # the last row's held-out picks wait
    printed = capsys.readouterr().out
    assert "win rate" in printed and "held-out" in printed and len(printed.splitlines()) >= 5


def test_simulate_evaluates_64_paired_samples_by_default():
    from d3po_core.__main__ import SimulateArgs

    assert 4 * spec(SimulateArgs, "eval_seeds").default >= 64  # the first 4 prompts × seeds


@pytest.mark.parametrize("method", ["ddpo", "p3o"])
def test_simulate_a_reward_method_trains_on_the_scorer_values(tiny_eps, tmp_path, method):
    out = tmp_path / f"{method}.json"
    args = ["simulate", "--session", str(tmp_path / "s"), "--model", str(tiny_eps)]
    args += ["--method", method, "--scorer", "jpeg_compressibility", "--rounds", "2"]
    args += ["--grids", "2", "--prompts", "a red circle", "--eval-seeds", "2"]
    args += ["--clip-range", "0.001", "--json", str(out), *SMALL]
    assert main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["method"] == method and payload[method]["clip_range"] == 1e-3
    table = payload["rounds"]
    assert [row["images_sampled"] for row in table] == [0, 2 * 2, 4 * 2]  # 2 grids of 2 a round
    with Session.open(tmp_path / "s", create=False) as session:
        rounds = session.rounds_df()
        assert list(rounds["setting_method"]) == [method, method]
        assert rounds["metric_clipfrac"].notna().all()
        # reward methods use rewards, not picks: no pick was made, none consumed
        assert len(session.picks_df()) == 0 and list(rounds["last_pick_id"]) == [0, 0]


CLI_HIDDEN = {"lora": "nested settings: rank, alpha and targets are flags of their own"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_setting_has_a_flag_with_its_help_and_bounds(method, capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--method", method, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for cls in (SampleSettings, LoraSettings, METHODS[method].config):
        for f in fields(cls):
            if f.name in CLI_HIDDEN:
                assert not f.metadata["cli"]
                continue
            s = spec(cls, f.name)
            assert f"--{f.name}" in text, f"{cls.__name__}.{f.name} has no flag"
            assert " ".join(s.help.split()) in text
            if s.low is not None and s.high is not None and not s.low_open:
                assert f"between {s.low:g} and {s.high:g}" in text


def test_flags_parse_into_checked_settings(tiny_eps, tmp_path, capsys):
    args = ["train", "--session", str(tmp_path / "s"), "--model", str(tiny_eps)]
    assert main([*args, "--beta", "0"]) == 2
    assert "beta must be > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's own check of the declared choices
        main([*args, "--method", "d3po", "--reduction", "median"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_an_unexpected_error_is_short_on_screen_and_logged_in_the_session(
    tmp_path, capsys, monkeypatch
):
    from d3po_core import workflow

    def broken(session):
        raise RuntimeError("a bug deep inside")

    monkeypatch.setattr(workflow, "unlabeled_grids", broken)
    session = tmp_path / "s"
    assert main(["label", "--session", str(session), "--scorer", "jpeg_compressibility"]) == 1
    err = capsys.readouterr().err
    assert "unexpected error (RuntimeError: a bug deep inside)" in err
    assert "Traceback" not in err
    log = (session / "logs" / "errors.log").read_text()
    assert "Traceback" in log and "a bug deep inside" in log and "broken" in log


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "/no/such/model", "--prompt", "x"], "model folder not found"),
        (["generate", "--prompt", "x", "--grid-size", "40"], "grid size must be between 2 and 16"),
        (["simulate", "--method", "nope", "--scorer", "x", "--prompts", "x"], "unknown --method"),
        (["label", "--scorer", "nope"], "not a built-in"),
        (["export", "--picks", "x.csv"], "no session"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    assert main([*args, "--session", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_train_without_picks_is_a_clear_error(tiny_eps, tmp_path, capsys):
    assert main(["train", "--session", str(tmp_path / "s"), "--model", str(tiny_eps)]) == 2
    assert "no new picks" in capsys.readouterr().err


def test_train_runs_under_accelerate_launch(tiny_eps, tmp_path):
    session = str(tmp_path / "s")
    gen = [
        "generate",
        "--session",
        session,
        "--model",
        str(tiny_eps),
        "--prompt",
        "a circle",
        "--seed",
        "3",  # a fixed grid: a random one can tie (no pick to train on)
        *SMALL,
    ]
    assert main(gen) == 0
    assert main(["label", "--session", session, "--scorer", "jpeg_compressibility"]) == 0
    launcher = shutil.which("accelerate") or "accelerate"
    cmd = [launcher, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "d3po_core", "train"]
    cmd += ["--session", session, "--model", str(tiny_eps), "--epochs", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "round 1 committed" in out.stdout
    with Session.open(session) as s:
        assert s.last_round() == 1
