"""Subprocess of the fault campaign: the studio's verbs on a session, saying where it is.

Usage: ``python tests/_campaign_worker.py SESSION MODEL LABELER CYCLES``. Through the
studio's controller, each cycle generates two grids, picks best and worst on each, trains a
round, exports it three ways and compares it with the base (side by side and a blind vote).
Before each phase it prints ``at PHASE``; after each result is confirmed (the call returned),
``pick ID GRID BEST WORST LABELER``, ``round ID``, ``vote ROUND`` …; lines are flushed, so the
parent can SIGKILL it at any phase and then check that every confirmed result survived.
"""

from __future__ import annotations

import sys
from pathlib import Path

from d3po_core.methods import D3POConfig
from d3po_core.sampling import SampleSettings
from studio.controller import StudioController

FAST = SampleSettings(n=2, steps=4, guidance=5.0, eta=1.0)
ROUND = D3POConfig(epochs=2, batch_size=1, replay=False)


def say(line: str) -> None:
    print(line, flush=True)


def cycle(ctl: StudioController, labeler: str, k: int, out: Path) -> None:
    for g in range(2):
        say("at generate")
        view = ctl.generate(
            f"a red circle {k}.{g}", on_step=lambda s, t: say(f"at sampling-step {s}")
        )
        say(f"grid {view.grid_id}")
        say("at pick")
        best, worst = (g, 1 - g)
        pick_id = ctl.pick(view.grid_id, best, worst, labeler)
        say(f"pick {pick_id} {view.grid_id} {best} {worst} {labeler}")
    say("at train")
    round_id, _ = ctl.train(ROUND, on_progress=lambda e: say(f"at train-step {e.step}/{e.total}"))
    say(f"round {round_id}")
    say("at export-lora")
    ctl.export_lora(out / f"lora-{round_id}")
    say("at export-kohya")
    ctl.export_kohya(out / f"kohya-{round_id}.safetensors")
    say("at export-picks")
    ctl.export_picks(out / f"picks-{round_id}.parquet")
    say("at compare")
    ctl.compare(round_id, "a blue square", [0, 1])
    say("at blind-pair")
    pair = ctl.blind_pair(round_id, "a blue square", seed=3)
    say("at vote")
    ctl.vote(pair, "left", labeler)
    say(f"vote {round_id}")


def main(root: str, model: str, labeler: str, cycles: int) -> None:
    ctl = StudioController(root, model=model, device="cpu", sample_settings=FAST)
    notice = ctl.notice.replace("\n", " ")
    say(f"opened {ctl.active_round()} {notice}")
    out = Path(root).parent / f"exports-{labeler}"
    out.mkdir(exist_ok=True)
    try:
        for k in range(cycles):
            cycle(ctl, labeler, k, out)
    finally:
        ctl.close()
    say("finished")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
