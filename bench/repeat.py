"""Does a round repeat? The same picks, settings and seed trained twice, on one device.

    python bench/repeat.py                                  # the CPU
    python bench/repeat.py --device cuda                    # a GPU, as the benchmarks run
    python bench/repeat.py --device cuda --deterministic    # with torch's deterministic kernels

On the embedded model it samples a few picks' 4-grids on the taste benchmark's open prompts
(an x_T per image, the model's recommended guidance), then twice over, from the base model
with the same seed: trains a round at the defaults (Diffusion-KTO) and samples a 4-grid with
its adapter. It reports the largest difference between the two adapters' weights and between
the two grids' pixels, and the same for two grids of the base model alone (sampling without
training). 0 everywhere is a round that repeats bit for bit.

On the CPU a round repeats (``tests/test_repeat.py``). On an H200 the taste benchmark's same
spec, run twice, ended 0.06 apart on a taste's win rate (docs/benchmarks.md §5, "Eight seeds
on the H200"); this is the short check of where that comes from, and of whether
``--deterministic`` (the learning benchmarks' flag too) removes it. It writes JSON to
bench/results/repeat-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from runs import deterministic_kernels, machine
from tastes import OPEN_PROMPTS

from d3po_core.methods import DiffusionKTOConfig
from d3po_core.mirror import adapter_state
from d3po_core.models import default_model, load_pipeline, remove_lora
from d3po_core.objectives.d3po import Example
from d3po_core.objectives.diffusion_dpo import KTOObjective
from d3po_core.rounds import run_round
from d3po_core.sampling import SampleSettings, sample_grid

RESULTS = Path(__file__).parent / "results"


def pixels(grid) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in grid.images])


def round_and_grid(pipe, examples: list[Example], settings: SampleSettings) -> tuple[dict, dict]:
    """A round from the base model at the defaults, then a grid with its adapter."""
    remove_lora(pipe.unet)
    start = time.perf_counter()
    run_round(pipe, KTOObjective(examples, DiffusionKTOConfig()))
    seconds = time.perf_counter() - start
    grid = sample_grid(pipe, OPEN_PROMPTS[0], settings, seed=7)
    return adapter_state(pipe.unet), {"pixels": pixels(grid), "seconds": seconds}


def check(device: str, picks: int, steps: int) -> dict:
    pipe = load_pipeline(default_model(), device=device, dtype=torch.float32)
    settings = SampleSettings(steps=steps, guidance=pipe.recommended.get("guidance", 7.5))
    examples = [
        Example(sample_grid(pipe, OPEN_PROMPTS[i % 4], settings, seed=100 + i).trajectory, 0, 3)
        for i in range(picks)
    ]
    base = [pixels(sample_grid(pipe, OPEN_PROMPTS[0], settings, seed=7)) for _ in range(2)]
    (state_a, a), (state_b, b) = (round_and_grid(pipe, examples, settings) for _ in range(2))
    adapter_diff = max(float((state_a[k] - state_b[k]).abs().max()) for k in state_a)
    return {
        "machine": machine(),
        "device": device,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "picks": picks,
        "steps": steps,
        "round_s": [a["seconds"], b["seconds"]],
        "base_grid_max_pixel_diff": int(np.abs(base[0] - base[1]).max()),
        "adapter_max_diff": adapter_diff,
        "adapter_max_abs": max(float(v.abs().max()) for v in state_a.values()),
        "grid_max_pixel_diff": int(np.abs(a["pixels"] - b["pixels"]).max()),
        "grid_pixels_differing": float((a["pixels"] != b["pixels"]).mean()),
        # the round changed what is drawn: a repeat of 0 is then a real repeat
        "trained_vs_base_max_pixel_diff": int(np.abs(a["pixels"] - base[0]).max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels")
    p.add_argument("--picks", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if args.deterministic:
        deterministic_kernels()  # before CUDA starts: cuBLAS reads its workspace setting then
    r = check(args.device, args.picks, args.steps)
    print(f"machine: {r['machine']}")
    print("| check | largest difference between two runs |")
    print("|---|---|")
    print(f"| a base 4-grid, sampled twice | {r['base_grid_max_pixel_diff']} of 255 |")
    print(
        f"| a round's adapter, trained twice | {r['adapter_max_diff']:.3g} "
        f"(its largest weight {r['adapter_max_abs']:.3g}) |"
    )
    print(
        f"| a 4-grid with that adapter | {r['grid_max_pixel_diff']} of 255 "
        f"({r['grid_pixels_differing']:.1%} of the values differ) |"
    )
    out = args.json or RESULTS / f"repeat-{r['device'].split(':')[0]}.json"
    out.write_text(json.dumps(r, indent=2) + "\n")
    print(f"json: {out}")


if __name__ == "__main__":
    main()
