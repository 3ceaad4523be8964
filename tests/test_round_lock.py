"""One round at a time on a session, across processes: a second round is refused, naming the
process that trains; labeling and generating go on; a killed round frees the session."""

from __future__ import annotations

import signal

from d3po_core.__main__ import main
from d3po_core.session import Session

from .conftest import spawn_worker

SMALL = ["--grid-size", "2", "--steps", "4", "--guidance", "5"]


def test_a_second_round_is_refused_while_another_process_trains(tmp_path, tiny_eps, capsys):
    root = tmp_path / "session"
    worker = spawn_worker("_long_round_worker.py", root, tiny_eps)
    try:
        while (line := worker.stdout.readline()) != "training\n":  # its round has begun
            assert line, "the worker ended before its round began"
        base = ["--session", str(root), "--model", str(tiny_eps)]
        # labeling and generating in another process go on while the round trains
        grids = ["--prompt", "a blue square", "--grids", "1", "--seed", "7", *SMALL]
        assert main(["generate", *base, *grids]) == 0
        assert main(["label", "--session", str(root), "--scorer", "jpeg_compressibility"]) == 0
        capsys.readouterr()
        # a second round is refused, in one line naming who trains
        assert main(["train", *base, "--epochs", "1"]) != 0
        err = capsys.readouterr().err
        assert "a round is already training on" in err and f"pid {worker.pid}" in err
        assert "_long_round_worker.py" in err and "Traceback" not in err
        with Session.open(root) as session:
            assert session.last_round() is None and len(session.picks_df()) == 3
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    # the killed round committed nothing and holds nothing: the next round trains every pick
    assert main(["train", *base, "--epochs", "1", "--batch-size", "4"]) == 0
    assert "round 1 committed" in capsys.readouterr().out
    with Session.open(root) as session:
        assert session.last_round() == 1
        assert session.rounds_df().loc[0, "metric_picks"] == 3
