"""The D3PO authors' training-loop pattern, rebuilt on this engine's step math: the baseline
that ``bench/gpu_check.py`` times beside the engine's round on the same pipeline and picks.

The pattern (the published D3PO training script, as described in the paper's code):

- the reference policy is a deep copy of the base UNet, kept in the half dtype;
- a LoRA of rank 4 with float32 parameters on the policy UNet;
- one pair at a time, with classifier-free guidance in training;
- per denoising step, four UNet calls (policy and reference, on winner and loser) and one
  backward; the optimizer steps once a pair's steps are accumulated;
- the log-prob averaged over latent dimensions, the ratio π_θ/π_ref clamped to [0.9, 1.1],
  loss −log σ(β·(log r_w − log r_l)).

Only the loop's shape matters here (it is a speed and memory baseline); the engine's round
trains the same (pair, step) items with batched UNet calls and the adapter disabled as the
reference.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from d3po_core.models import add_lora, lora_parameters, remove_lora
from d3po_core.rounds import peak_memory_mb
from d3po_core.sampling import ddim_step, guided_model_output
from d3po_core.settings import LoraSettings

CLAMP = 0.1
BETA = 0.1


def _log_prob(unet, scheduler, traj, image: int, k: int) -> torch.Tensor:
    """log π(x_{t−1}|x_t) of one image at one step, averaged over latent dimensions."""
    device = unet.device
    s = traj.settings
    x_t = traj.latents[image, k][None].to(device)
    x_prev = traj.latents[image, k + 1][None].to(device)
    t = traj.timesteps[k].to(device)[None]
    cond = traj.cond.to(device)
    uncond = traj.uncond.to(device) if traj.uncond is not None else None
    out = guided_model_output(unet, x_t, t, cond, uncond, s.guidance)
    log_prob = ddim_step(scheduler, out, t, x_t, s.eta, prev_sample=x_prev).log_prob
    return log_prob / x_t[0].numel()


def original_round(pipe, examples: list, *, epochs: int = 2, learning_rate: float = 1e-3) -> dict:
    """Train a fresh rank-4 adapter the original way on (best, worst) of each example.

    Returns seconds, (pair·step)/s of training passes and the peak memory (MB) of the round,
    the reference copy included.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    remove_lora(unet)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    reference = copy.deepcopy(unet).to(unet.dtype)  # the base, in the half dtype
    reference.requires_grad_(False)
    add_lora(unet, LoraSettings(rank=4, alpha=4.0))
    params = lora_parameters(unet)  # float32
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    steps = examples[0].trajectory.timesteps.numel()
    scheduler.set_timesteps(examples[0].trajectory.settings.steps, device=device)
    pair_steps, losses = 0, []
    try:
        for _ in range(epochs):
            for ex in examples:
                traj = ex.trajectory
                for k in range(steps):
                    with torch.no_grad():
                        ref_w = _log_prob(reference, scheduler, traj, ex.best, k)
                        ref_l = _log_prob(reference, scheduler, traj, ex.worst, k)
                    log_w = _log_prob(unet, scheduler, traj, ex.best, k)
                    log_l = _log_prob(unet, scheduler, traj, ex.worst, k)
                    ratio_w = torch.clamp(torch.exp(log_w - ref_w), 1 - CLAMP, 1 + CLAMP)
                    ratio_l = torch.clamp(torch.exp(log_l - ref_l), 1 - CLAMP, 1 + CLAMP)
                    loss = -F.logsigmoid(BETA * (ratio_w.log() - ratio_l.log())).mean()
                    (loss / steps).backward()
                    losses.append(loss.detach())
                    pair_steps += 1
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = peak_memory_mb(device)
    finally:
        del reference
        remove_lora(unet)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "round_s": seconds,
        "pair_steps": pair_steps,
        "pair_steps_per_s": pair_steps / seconds,
        "peak_memory_mb": peak,
        "loss": float(torch.stack(losses).double().mean()),
    }
