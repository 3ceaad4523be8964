"""SIGKILL in the middle of a round: confirmed picks and finished rounds survive intact."""

from __future__ import annotations

import torch

from d3po_core.models import load_lora, load_pipeline
from d3po_core.session import Session

from .conftest import spawn_worker
from .test_session import _read_until


def test_kill_mid_round_keeps_picks_and_finished_rounds(tmp_path, tiny_eps):
    root = tmp_path / "session"
    proc = spawn_worker("_train_worker.py", root, tiny_eps)

    def mid_second_round(lines: list[list[str]]) -> bool:
        committed = [line for line in lines if line[:1] == ["committed"]]
        steps_after = (
            [line for line in lines[lines.index(committed[0]) :] if line[0] == "step"]
            if committed
            else []
        )
        return len(steps_after) >= 3

    lines = _read_until(proc, mid_second_round)
    confirmed_picks = {int(line[1]) for line in lines if line[0] == "pick"}
    committed = [int(line[1]) for line in lines if line[0] == "committed"]
    assert committed == [1] and len(confirmed_picks) == 4

    with Session.open(root) as session:
        picks = session.picks_df()
        assert confirmed_picks <= set(picks["id"])
        assert session.last_round() == 1 and session.active_round == 1
        rounds = session.rounds_df()
        assert len(rounds) == 1 and rounds.loc[0, "metric_picks"] == 2
        assert [p.name for p in (root / "adapters").iterdir()] == ["round-0001"]
        # the finished round's adapter is whole: it loads and changes the model
        pipe = load_pipeline(tiny_eps, device="cpu")
        load_lora(pipe.unet, session.round_path(1))
        lora = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
        assert lora and any(torch.count_nonzero(p) > 0 for p in lora)
        # the best/worst picks of the killed round are still waiting to be trained
        waiting = picks[(picks["kind"] == "pick") & (picks["id"] > rounds.loc[0, "last_pick_id"])]
        assert {p["pick_id"] for p in session.training_picks()} == set(waiting["id"])
        assert set(waiting["id"]) <= confirmed_picks
