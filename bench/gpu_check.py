"""One check of speed, memory and precision on whatever device is present: one table, one JSON.

    python bench/gpu_check.py                   # CUDA: SD 1.5 architecture, random weights, 512 px
    python bench/gpu_check.py --sdxl --size 1024  # CUDA: SDXL architecture, random weights
    python bench/gpu_check.py --device cpu      # the same checks on the embedded model

On CUDA it builds a Stable Diffusion 1.5-architecture pipeline with random weights (nothing to
download), samples 8 picks' 4-grids at 20 steps and measures, in one run:

- recording overhead: a recorded 4-grid vs diffusers' own pipeline, same seeds and steps;
- a D3PO round on the 8 picks at the defaults (memory plan from the free memory), with a
  cap (``--cap-gb``, 8: what an 8 GB card gets), and at micro-batch 8 with checkpointing off
  and on;
- a Diffusion-DPO round (the default method) at the defaults;
- the original D3PO loop's pattern (``bench/original_loop.py``) on the same picks;
- model FLOP/s of the round against the eager ceiling (LoRA fwd+bwd of the UNet at 32 rows)
  and the device's matmul peak; FLOPs follow the usual convention (a backward is 2 forwards;
  one UNet forward of a row counted by torch's flop counter);
- rounds at fp16, bf16 and fp32 in one process (CPU: fp32 and bf16 autocast);
- regional ``torch.compile`` of the UNet's blocks and channels-last (CUDA, or ``--compile``).

With ``--sdxl`` (and ``--size 1024 --cap-gb 24``: the largest consumer card) it builds an
SDXL-architecture pipeline with random weights instead and runs the same checks; ``--model``
runs them on any diffusers folder (the tests use a tiny SDXL one on the CPU).

It prints a markdown table (docs/benchmarks.md §6 keeps the last GPU one) and writes JSON to
bench/results/gpu_check-<device>.json. Under 10 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from original_loop import original_round
from speed import build_sd15, build_sdxl, grid_vs_plain

from d3po_core.families import Cond
from d3po_core.methods import D3POConfig, DiffusionDPOConfig
from d3po_core.models import default_model, load_pipeline, remove_lora, speed_up_unet
from d3po_core.objectives.d3po import D3POObjective, Example
from d3po_core.objectives.diffusion_dpo import DiffusionDPOObjective
from d3po_core.rounds import run_round
from d3po_core.sampling import SampleSettings, sample_grid

RESULTS = Path(__file__).parent / "results"
PROMPT = "a red circle"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def picks(pipe, settings: SampleSettings, count: int) -> list[Example]:
    return [
        Example(sample_grid(pipe, PROMPT, settings, seed=100 + 4 * i).trajectory, 0, 1)
        for i in range(count)
    ]


def timed_round(pipe, objective, fresh: bool = True) -> dict:
    """A round (from a fresh adapter): seconds, (pair·step)/s of training passes, peak, plan."""
    if fresh:
        remove_lora(pipe.unet)
    _free(pipe.unet.device)
    m = run_round(pipe, objective).metrics
    config = objective.config
    return {
        "round_s": m["seconds"],
        "pair_steps_per_s": m["items"] * config.epochs / m["seconds"],
        "peak_gb": m["peak_memory_mb"] / 1024,
        "micro_batch": m["micro_batch"],
        "checkpointing": bool(m["gradient_checkpointing"]),
        "items": m["items"],
        "loss": m["loss"],
    }


def unet_row_flops(pipe, latent_hw: tuple[int, int], cond: Cond) -> float:
    """FLOPs of one UNet forward on one row (torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet = pipe.unet
    x = torch.zeros(1, unet.config.in_channels, *latent_hw, device=unet.device, dtype=unet.dtype)
    t = torch.tensor([500], device=unet.device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        unet(x, t, **cond.to(unet.device).unet_kwargs(unet.dtype))
    return float(counter.get_total_flops())


def eager_ceiling(pipe, latent_hw, cond, row_flops: float, rows: int = 32, repeats: int = 3):
    """FLOP/s of LoRA fwd+bwd of the UNet on ``rows`` rows (3 forwards' FLOPs a pass)."""
    from d3po_core.models import add_lora, lora_parameters

    unet = pipe.unet
    device = unet.device
    remove_lora(unet)
    add_lora(unet)
    x = torch.randn(rows, unet.config.in_channels, *latent_hw, device=device, dtype=unet.dtype)
    t = torch.full((rows,), 500, device=device)
    c = cond.to(device).expand(rows).unet_kwargs(unet.dtype)
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        unet(x, t, **c).sample.float().square().mean().backward()
        _sync(device)
        times.append(time.perf_counter() - start)
        for p in lora_parameters(unet):
            p.grad = None
    remove_lora(unet)
    _free(device)
    return 3 * row_flops * rows / statistics.median(times[1:])


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul in ``dtype`` (what the device reaches at best)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(6):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


def precision_switch(pipe, examples: list[Example], device: torch.device) -> dict:
    """Rounds at several precisions, one after another in this process."""
    unet = pipe.unet
    dtype = unet.dtype
    config = D3POConfig(epochs=1, batch_size=4)
    done = []
    if device.type == "cuda":  # the UNet's dtype sets the round's precision
        runs = [(name, DTYPES[name], None) for name in ("fp16", "bf16", "fp32")]
    else:  # a float32 UNet under accelerate's autocast or none
        runs = [(name, torch.float32, p) for name, p in (("fp32", "no"), ("bf16", "bf16"))]
        runs.append(runs[0])
    try:
        for name, run_dtype, precision in runs:
            remove_lora(unet)
            unet.to(run_dtype)
            objective = D3POObjective(examples[:2], replace(config, mixed_precision=precision))
            loss = run_round(pipe, objective).metrics["loss"]
            done.append(name if loss == loss else f"{name} (loss nan)")
    except Exception as exc:  # the check reports what broke
        done.append(f"failed: {type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        remove_lora(unet)
        unet.to(dtype)
        _free(device)
    return done


def run(args) -> dict:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # casts between precisions are the point here
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    result: dict = {
        "device": _device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            folder = args.model
        elif args.sdxl:
            folder = build_sdxl(Path(tmp) / "sdxl-random", args.size, device.type)
        elif cuda:
            folder = build_sd15(Path(tmp) / "sd15-random", args.size)
        else:
            folder = default_model()
        pipe = load_pipeline(folder, device=device, dtype=dtype)
    built = (cuda or args.sdxl) and not args.model
    size = args.size if built else None
    guidance = pipe.recommended.get("guidance", 7.5)
    settings = SampleSettings(
        n=4, steps=args.steps, guidance=guidance, eta=1.0, height=size, width=size
    )
    architecture = "SDXL" if args.sdxl else "SD 1.5"
    result["model"] = f"{architecture} architecture, random weights" if built else folder
    result["image_px"] = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    result["steps"], result["picks"], result["cap_gb"] = args.steps, args.picks, args.cap_gb

    result["sampling"] = grid_vs_plain(pipe, settings, args.repeats)
    examples = picks(pipe, settings, args.picks)
    latent_hw = tuple(examples[0].trajectory.latents.shape[-2:])
    d3po = D3POConfig()
    rounds = {
        "d3po_defaults": d3po,
        "d3po_capped": replace(d3po, max_memory_gb=args.cap_gb),
        "d3po_micro8_checkpointing_off": replace(d3po, micro_batch=8, gradient_checkpointing="off"),
        "d3po_micro8_checkpointing_on": replace(d3po, micro_batch=8, gradient_checkpointing="on"),
    }
    for name, config in rounds.items():
        result[name] = timed_round(pipe, D3POObjective(examples, config))
    result["diffusion_dpo_defaults"] = timed_round(
        pipe, DiffusionDPOObjective(examples, DiffusionDPOConfig())
    )
    _free(device)
    result["original_loop"] = original_round(pipe, examples, epochs=d3po.epochs)
    result["original_loop"]["peak_gb"] = result["original_loop"].pop("peak_memory_mb") / 1024

    cond = examples[0].trajectory.cond  # one row, with a family's added conditioning
    row_flops = unet_row_flops(pipe, latent_hw, cond)
    ours = result["d3po_defaults"]
    round_flops = row_flops * 4 * ours["items"] * (1 + 3 * d3po.epochs)  # 4 rows: pair × CFG
    ceiling = eager_ceiling(pipe, latent_hw, cond, row_flops)
    peak = matmul_peak(device, dtype)
    result["flops"] = {
        "unet_forward_per_row_gflop": row_flops / 1e9,
        "round_pflop": round_flops / 1e15,
        "round_tflops": round_flops / ours["round_s"] / 1e12,
        "eager_ceiling_tflops": ceiling / 1e12,
        "matmul_peak_tflops": peak / 1e12,
        "share_of_ceiling": round_flops / ours["round_s"] / ceiling,
        "share_of_peak": round_flops / ours["round_s"] / peak,
    }
    result["precision_switch"] = precision_switch(pipe, examples, device)
    if cuda or args.compile:
        for name, options in (
            ("compiled", {"compile_blocks": True}),
            ("channels_last", {"channels_last": True}),
        ):
            remove_lora(pipe.unet)
            restore = speed_up_unet(pipe.unet, **options)
            try:
                # the first round compiles (with the adapter in place); the second is timed
                timed_round(pipe, D3POObjective(examples[:1], d3po), fresh=False)
                objective = D3POObjective(examples, d3po)
                result[f"d3po_defaults_{name}"] = timed_round(pipe, objective, fresh=False)
            finally:
                restore()
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(r: dict) -> str:
    """The result as the markdown table of docs/benchmarks.md §6."""

    cuda = r["device_type"] == "cuda"

    def gb(value: float) -> str:  # a CPU's peak is the process's, not the round's
        return f"{value:.1f} GB" if cuda else "– GB"

    def rnd(d: dict) -> str:
        plan = f"micro {d['micro_batch']}, ckpt {'on' if d['checkpointing'] else 'off'}"
        return (
            f"{d['round_s']:.1f} s, {d['pair_steps_per_s']:.1f} pair·step/s, "
            f"{gb(d['peak_gb'])} ({plan})"
        )

    s, o, f = r["sampling"], r["original_loop"], r["flops"]
    ours = r["d3po_defaults"]
    speedup = ours["pair_steps_per_s"] / o["pair_steps_per_s"]
    rows = [
        (
            "recorded 4-grid vs diffusers' pipeline",
            f"{s['grid_s']:.2f} s vs {s['plain_pipeline_s']:.2f} s "
            f"(**{s['recording_overhead_ratio']:.2f}×**)",
            "≤ 1.05×",
        ),
        ("D3PO round, defaults", rnd(ours), "≤ 12 s (H100)"),
        (
            f"D3PO round, --max-memory-gb {r['cap_gb']:g}",
            rnd(r["d3po_capped"]),
            f"≤ {r['cap_gb']:g} GB",
        ),
        (
            "D3PO round, micro-batch 8, checkpointing off",
            rnd(r["d3po_micro8_checkpointing_off"]),
            "",
        ),
        ("D3PO round, micro-batch 8, checkpointing on", rnd(r["d3po_micro8_checkpointing_on"]), ""),
        ("Diffusion-DPO round (the default method)", rnd(r["diffusion_dpo_defaults"]), ""),
        (
            "original D3PO loop's pattern",
            f"{o['round_s']:.1f} s, {o['pair_steps_per_s']:.2f} pair·step/s, {gb(o['peak_gb'])}",
            "",
        ),
        (
            "ours ÷ original: throughput (peak memory)",
            f"**{speedup:.1f}×** ({gb(ours['peak_gb'])} vs {gb(o['peak_gb'])})",
            "≥ 6× at ≤ its memory",
        ),
        (
            "round model FLOP/s",
            f"{f['round_tflops']:.1f} TFLOP/s: {f['share_of_ceiling']:.0%} of the eager ceiling "
            f"({f['eager_ceiling_tflops']:.1f}), {f['share_of_peak']:.0%} of the matmul peak "
            f"({f['matmul_peak_tflops']:.1f})",
            "≥ 80 % of the ceiling",
        ),
        (
            "rounds at several precisions, one process",
            " → ".join(r["precision_switch"]),
            "works",
        ),
    ]
    for name in ("compiled", "channels_last"):
        if f"d3po_defaults_{name}" in r:
            d = r[f"d3po_defaults_{name}"]
            speed = ours["round_s"] / d["round_s"]
            label = f"D3PO round, defaults, {name.replace('_', '-')}"
            rows.append((label, f"{rnd(d)}; {speed:.2f}× eager", "keep if > 1"))
    head = (
        f"{r['device']}; {r['model']}, {r['image_px']} px, {r['dtype']}, {r['steps']} steps, "
        f"{r['picks']} picks\n\n"
    )
    lines = ["| check | measured | goal |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return head + "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--model", default=None, help="a diffusers folder instead of the default")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="bf16 on CUDA")
    parser.add_argument("--size", type=int, default=512, help="image size of the random build")
    parser.add_argument("--sdxl", action="store_true", help="an SDXL-architecture build")
    parser.add_argument("--cap-gb", type=float, default=8.0, help="the capped round's limit")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--picks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also compile on CPU")
    parser.add_argument(
        "--json", default=None, help="default: bench/results/gpu_check-<device>.json"
    )
    args = parser.parse_args()
    result = run(args)
    text = table(result)
    print(text)
    out = Path(args.json or RESULTS / f"gpu_check-{result['device_type']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "table": text}, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
