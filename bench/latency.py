"""CPU/GPU latency of the interactive loop: a 4-grid at 20 steps, and a round on 8 picks.

    python bench/latency.py [--model PATH] [--repeats 5] [--json out.json]

Also times diffusers' plain pipeline on the same prompt, steps and batch, so the overhead of
recording trajectories and log-probs is a ratio measured in the same run. Medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from d3po_core.models import default_model, load_pipeline, remove_lora
from d3po_core.sampling import SampleSettings, sample_grid
from d3po_core.trainer import D3POConfig, Example, run_round


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    pipe = load_pipeline(args.model or default_model(), device=args.device)
    settings = SampleSettings(n=4, steps=20, guidance=args.guidance, eta=1.0)
    prompt = "a red circle"
    sample_grid(pipe, prompt, settings, seed=0)  # warm-up
    grid_s = _median_seconds(lambda: sample_grid(pipe, prompt, settings, seed=1), args.repeats)

    def plain() -> None:
        pipe(
            prompt,
            num_images_per_prompt=settings.n,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            eta=settings.eta,
            generator=[torch.Generator().manual_seed(i) for i in range(settings.n)],
        )

    plain()
    plain_s = _median_seconds(plain, args.repeats)

    examples = [
        Example(sample_grid(pipe, prompt, settings, seed=100 + 4 * i).trajectory, 0, 1)
        for i in range(8)
    ]
    config = D3POConfig()
    rounds = []
    for _ in range(max(1, args.repeats // 2)):
        remove_lora(pipe.unet)
        rounds.append(run_round(pipe, examples, config).metrics)
    round_s = statistics.median(m["seconds"] for m in rounds)
    items = rounds[0]["items"] * config.epochs

    result = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
        f"threads, {pipe.unet.device}",
        "model": pipe.model_id,
        "grid_4x20_s": round(grid_s, 3),
        "plain_pipeline_4x20_s": round(plain_s, 3),
        "recording_overhead_ratio": round(grid_s / plain_s, 3),
        "round_8_picks_s": round(round_s, 2),
        "round_pair_steps_per_s": round(items / round_s, 1),
        "round_settings": {"epochs": config.epochs, "batch_size": config.batch_size},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
