"""Does a round stay fast as picks pile up? Round 5 against round 1 at the defaults.

    python bench/round_cost.py [--rounds 5] [--seeds 3] [--method diffusion-dpo] [--dora]

Each seed runs R rounds of 8 grids of 4 (20 steps), labeled by a scripted taste, at the
method's defaults (replay draws as many earlier picks as there are new ones, so a round trains
on at most twice its new picks). A round's time is what the user waits for between labeling
sessions: sampling its grids, the held-out measure and training; the loop's own time
(``train_seconds``) is shown too. Prints a markdown table of the medians over seeds and the
ratio of the last round to the first, both measured in the same runs.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from runs import PROMPTS, machine
from tastes import contrast

from d3po_core.models import default_model, load_pipeline
from d3po_core.objectives import METHODS
from d3po_core.sampling import SampleSettings
from d3po_core.session import Session
from d3po_core.settings import DEFAULT_METHOD, LoraSettings
from d3po_core.simulate import EvalSet, simulate


def run(method: str, rounds: int, seed: int, dora: bool = False) -> list[dict]:
    pipe = load_pipeline(default_model(), device="cpu")
    pipe.set_progress_bar_config(disable=True)
    settings = SampleSettings(n=4, steps=20, guidance=pipe.recommended.get("guidance", 7.5))
    adapter = {"lora": LoraSettings(dora=True)} if dora else {}  # else the method's own
    config = METHODS[method].config(seed=seed, **adapter)
    with tempfile.TemporaryDirectory() as tmp, Session.open(Path(tmp) / "s") as session:
        return simulate(
            pipe,
            session,
            contrast,
            PROMPTS,
            rounds=rounds,
            grids=8,
            settings=settings,
            config=config,
            eval_set=EvalSet(PROMPTS[:1], [0]),  # one image: the cost is the round's
            seed=1_000_000 * (seed + 1),
            heldout_last=False,
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--method", default=DEFAULT_METHOD)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dora", action="store_true", help="a DoRA adapter instead of LoRA")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for seed in range(args.seeds):
        for row in run(args.method, args.rounds, seed, args.dora)[1:]:
            rows.append({"seed": seed, **row})
    df = pd.DataFrame(rows)
    per_round = df.groupby("round")[["seconds", "train_seconds"]].median()
    adapter = " with DoRA" if args.dora else ""
    print(f"{args.method} at its defaults{adapter}, {args.seeds} seeds; {machine()}\n")
    print("| round | round (s, median) | training loop (s, median) |")
    print("|---|---|---|")
    for r, row in per_round.iterrows():
        print(f"| {r} | {row.seconds:.1f} | {row.train_seconds:.1f} |")
    last, first = per_round.iloc[-1], per_round.iloc[0]
    ratios = df.pivot(index="seed", columns="round", values="seconds")
    each = ratios.iloc[:, -1] / ratios.iloc[:, 0]
    print(
        f"\nround {per_round.index[-1]} / round 1: {last.seconds / first.seconds:.2f}× "
        f"(per seed {', '.join(f'{x:.2f}' for x in each)}; training loop "
        f"{last.train_seconds / first.train_seconds:.2f}×), max {np.max(each):.2f}×"
    )


if __name__ == "__main__":
    main()
