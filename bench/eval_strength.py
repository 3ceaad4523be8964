"""Where does the adapter's strength act: on the evaluation set, or on the grids a round draws?

    python bench/eval_strength.py [--seeds 2] [--first-seed 0] [--labelers warmth,detail,...]
                                  [--variant V] [--split 500] [--out bench/results/eval-strength]

The defaults sample at adapter strength 1.25, grids and evaluation set alike (docs/benchmarks.md
§5). This runs the taste benchmark's run of a variant (the defaults unless told) once per
labeler and seed, as ``bench/tastes.py`` does, then scores the same trained adapter on the same
evaluation set (4 open prompts x 16 seeds, on the base model's noise) at other strengths, and
at schedules that take one strength on the noisier steps (timestep >= ``--split``: layout,
shape, colour) and another on the rest (texture, edges). Rounds are the same in every row, so
the differences are the evaluation's strength alone. One JSON a run in ``--out``; prints each
schedule's own-taste win rate, its paired difference with the run's own strength, and the
random picks' win rates. ~2.5 min a run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import runs
import tastes
import torch
from runs import CONTROL, machine, prompts_of

from d3po_core.models import ADAPTER_NAME, base_model

#: (noisier steps, the rest): uniform strengths first, then the split schedules
SCHEDULES = [
    (1.0, 1.0),
    (1.25, 1.25),
    (1.5, 1.5),
    (1.25, 1.5),
    (1.25, 1.75),
    (1.25, 2.0),
    (1.0, 1.25),
    (1.0, 1.5),
    (1.5, 1.25),
]


@contextmanager
def schedule(unet, early: float, late: float, split: int):
    """Within the block the adapter acts at ``early`` on UNet calls at timestep >= ``split``
    and at ``late`` below it (a forward pre-hook reads each call's timestep)."""
    current = [None]

    def at_step(_module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        weight = early if float(torch.as_tensor(t).flatten()[0]) >= split else late
        if weight != current[0]:
            unet.set_adapters([ADAPTER_NAME], weights=[weight])
            current[0] = weight

    handle = unet.register_forward_pre_hook(at_step, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        unet.set_adapters([ADAPTER_NAME], weights=[1.0])


def run_one(variant: str, labeler: str, seed: int, split: int) -> dict:
    s = tastes.variant_spec(variant, labeler, seed)
    run = runs.Run.of(s, None)
    pipe, settings = run.pipe, run.settings
    evals = tastes.eval_set(prompts_of(s))
    with base_model(pipe.unet):
        base = tastes.score_eval_set(pipe, settings, evals)
    run.simulate(tastes.labeler_of(s), tastes._SIM_EVAL)
    at_one = replace(settings, strength=1.0)  # the hook sets the weight instead
    rates = {}
    for early, late in SCHEDULES:
        with schedule(pipe.unet, early, late, split):
            scores = tastes.score_eval_set(pipe, at_one, evals)
        rates[f"{early:g}/{late:g}"] = {
            k: v["win_rate"] for k, v in tastes.taste_rows(scores, base).items()
        }
    return {
        "id": s["id"],
        "labeler": labeler,
        "seed": seed,
        "trained_at": settings.strength,
        "split": split,
        "win_rates": rates,
        "machine": machine(),
    }


def report(results: list[dict]) -> None:
    own = [r for r in results if r["labeler"] != CONTROL]
    control = [r for r in results if r["labeler"] == CONTROL]
    print(f"{len(own)} taste runs, {len(control)} random-picks runs; {machine()}\n")
    if not own:
        return
    print(
        "| strength: noisier steps / the rest | own taste's win rate (mean) | paired with "
        "the run's own strength (mean ± se) | random picks: " + ", ".join(tastes.TASTES) + " |"
    )
    print("|---|---|---|---|")
    for early, late in SCHEDULES:
        key = f"{early:g}/{late:g}"
        mean = np.mean([r["win_rates"][key][r["labeler"]] for r in own])
        diffs = [
            r["win_rates"][key][r["labeler"]]
            - r["win_rates"][f"{r['trained_at']:g}/{r['trained_at']:g}"][r["labeler"]]
            for r in own
        ]
        se = np.std(diffs, ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
        drift = ", ".join(
            f"{np.mean([r['win_rates'][key][t] for r in control]):.2f}" if control else "–"
            for t in tastes.TASTES
        )
        print(f"| {key} | {mean:.3f} | {np.mean(diffs):+.3f} ± {se:.3f} | {drift} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--labelers", default=",".join([*tastes.TASTES, CONTROL]))
    p.add_argument("--variant", default=tastes.DEFAULT_VARIANT)
    p.add_argument("--split", type=int, default=500, help="timestep where 'the rest' begins")
    p.add_argument("--out", type=Path, default=runs.ROOT / "bench/results/eval-strength")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for labeler in args.labelers.split(","):
            path = args.out / f"{args.variant}--{labeler}--s{seed}.json"
            if not path.exists():
                if args.report_only:
                    continue
                path.write_text(json.dumps(run_one(args.variant, labeler, seed, args.split)))
            results.append(json.loads(path.read_text()))
    report(results)


if __name__ == "__main__":
    main()
