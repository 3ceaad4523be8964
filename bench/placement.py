"""Where do random picks move the shapes? A round of random picks against random adapters.

    python bench/placement.py [--seeds 3] [--first-seed 0] [--draws 3] [--scales 0.03,0.06,0.1]
                              [--variant V] [--labeler random|TASTE] [--update-scales 1,-1]

The taste benchmark's control (random best and worst) moves shapes away from the top-left
(docs/benchmarks.md §5). Is any change of the weights enough, or is it what training does?

- Random adapters: the default adapter (rank 4 on the attention projections) with its
  ``lora_B`` weights drawn from N(0, scale²), nothing trained.
- Random picks: the taste benchmark's control run of the variant (the defaults unless told),
  seed by seed, as ``bench/tastes.py`` runs it; or with ``--labeler`` a taste's run, to see
  what picks by one taste move besides it. ``--update-scales 1,-1`` also measures the run's
  adapter with its update reversed (every ``lora_B`` times −1): a drift the picks taught
  reverses with it, while one that any change of the layout causes does not.

Each is measured on the taste benchmark's evaluation set (4 open prompts x 16 seeds, each
image on the base model's noise): the top-left win rate against the base, the mean shift of
the shape's centre of mass (x right, y down, in px of the 64 px image), the median distance
it moved, the share of images whose placement (the nearest of the embedded world's five:
center, left, right, top, bottom) changed, the top-left win rate of those that kept theirs,
and how many images landed in each placement. Prints a markdown table; ~10 s an adapter and
~4 min a control run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import runs
import tastes
import torch
from runs import CONTROL, machine, prompts_of

from d3po_core.embedded.world import PLACEMENTS
from d3po_core.models import add_lora, base_model, remove_lora
from d3po_core.sampling import sample_grid
from d3po_core.simulate import paired_win_rate


def centres(pipe, settings, evals) -> tuple[np.ndarray, np.ndarray]:
    """Each eval image's shape centre (x, y; NaN where no shape) and top-left score."""
    one_by_one = replace(settings, shared_noise=False)
    xy, score = [], []
    for prompt in evals.prompts:
        for image in sample_grid(pipe, prompt, one_by_one, seeds=evals.seeds).images:
            mask = tastes.shape_mask(tastes._rgb(image))
            ys, xs = np.nonzero(mask)
            xy.append((xs.mean(), ys.mean()) if len(xs) else (np.nan, np.nan))
            score.append(tastes.top_left(image))
    return np.array(xy), np.array(score)


def placements(xy: np.ndarray) -> np.ndarray:
    """Each centre's nearest of the world's placements (its index in PLACEMENTS; −1 for no
    shape): which layout a seed's noise landed in."""
    anchors = np.array(list(PLACEMENTS.values()))
    nearest = ((xy[:, None, :] - anchors[None]) ** 2).sum(-1).argmin(1)
    return np.where(np.isnan(xy).any(1), -1, nearest)


def row(what: str, base: tuple, tuned: tuple) -> dict:
    shift = tuned[0] - base[0]
    landed = placements(tuned[0])
    kept = landed == placements(base[0])
    return {
        "what": what,
        "top_left win rate": paired_win_rate(tuned[1], base[1]),
        "dx": float(np.nanmean(shift[:, 0])),
        "dy": float(np.nanmean(shift[:, 1])),
        "median distance": float(np.nanmedian(np.hypot(shift[:, 0], shift[:, 1]))),
        "placement changed": float((~kept).mean()),
        "top_left win rate, same placement": (
            paired_win_rate(tuned[1][kept], base[1][kept]) if kept.any() else float("nan")
        ),
        "placements (" + ", ".join(PLACEMENTS) + ")": counts(landed),
    }


def lora_b(unet) -> list[torch.nn.Parameter]:
    """The adapter's ``lora_B`` weights: a plain LoRA's update is linear in them."""
    return [w for n, w in unet.named_parameters() if "lora_B" in n]


def counts(landed: np.ndarray) -> str:
    """How many images landed in each of the world's placements (indices from
    :func:`placements`), in PLACEMENTS' order."""
    return " / ".join(str(int((landed == i).sum())) for i in range(len(PLACEMENTS)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="control runs (0 skips them)")
    p.add_argument("--first-seed", type=int, default=0, help="the runs' seeds start here")
    p.add_argument("--draws", type=int, default=3, help="random adapters a scale")
    p.add_argument("--scales", default="0.03,0.06,0.1", help="sd of the random lora_B weights")
    # the documented runs were the defaults' before they sampled at strength 1.25
    p.add_argument("--variant", default="kto-replay-b5000-e3")
    p.add_argument(
        "--update-scales",
        default="1",
        help="the trained adapter's update times each of these (lora_B scaled; -1 is the "
        "opposite update): does the top-left move with the update's sign, or either way?",
    )
    p.add_argument(
        "--labeler",
        default=CONTROL,
        choices=[CONTROL, *tastes.TASTES],
        help="who picks: at random (the control), or a taste",
    )
    args = p.parse_args()
    rows = []
    for seed in range(args.first_seed, args.first_seed + max(args.seeds, 1)):
        s = tastes.variant_spec(args.variant, args.labeler, seed)
        run = runs.Run.of(s, None)
        pipe, settings = run.pipe, run.settings
        evals = tastes.eval_set(prompts_of(s))
        with base_model(pipe.unet):
            base = centres(pipe, settings, evals)
        if seed == args.first_seed:
            centre, base_counts = np.nanmean(base[0], axis=0), counts(placements(base[0]))
            add_lora(pipe.unet, seed=0)
            weights = lora_b(pipe.unet)
            for scale in (float(x) for x in args.scales.split(",")):
                for draw in range(args.draws):
                    gen = torch.Generator().manual_seed(1000 + draw)
                    with torch.no_grad():
                        for w in weights:
                            w.copy_(torch.randn(w.shape, generator=gen) * scale)
                    tuned = centres(pipe, settings, evals)
                    rows.append(row(f"random adapter, sd {scale}, draw {draw}", base, tuned))
                    print(rows[-1], flush=True)
            remove_lora(pipe.unet)
        if args.seeds:  # the run as tastes.py runs it
            who = "random picks" if args.labeler == CONTROL else f"{args.labeler}'s picks"
            run.simulate(tastes.labeler_of(s), tastes._SIM_EVAL)
            trained = lora_b(pipe.unet)
            saved = [w.detach().clone() for w in trained]
            for factor in (float(x) for x in args.update_scales.split(",")):
                with torch.no_grad():
                    for w, w0 in zip(trained, saved, strict=True):
                        w.copy_(w0 * factor)
                tuned = centres(pipe, settings, evals)
                times = "" if factor == 1 else f", its update × {factor:g}"
                rows.append(row(f"{who}, 3 rounds, seed {seed}{times}", base, tuned))
                print(rows[-1], flush=True)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for r in rows:
        cells = (f"{v:.2f}" if isinstance(v, float) else v for v in r.values())
        print("| " + " | ".join(cells) + " |")
    print(f"\nthe base's mean shape centre: x {centre[0]:.1f}, y {centre[1]:.1f} px; its")
    print(f"placements ({', '.join(PLACEMENTS)}): {base_counts}; {machine()}")


if __name__ == "__main__":
    main()
