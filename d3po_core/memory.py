"""How a round fits the device: its micro-batch and gradient checkpointing, from memory.

A round trains on batches of ``batch_size`` items (an optimizer step every ``grad_accum``
batches). Each batch goes through the UNet in micro-batches of at most ``micro_batch`` items
whose gradients add up to the batch's, so the effective batch (and the round's result) is the
same at any micro-batch; only speed and peak memory change.

The plan is a pure function of the memory budget, what stays on the device (weights), and
the activation memory one UNet row keeps for the backward pass, with and without gradient
checkpointing. That row estimate scales with the latent area, the UNet's widths and depth and
the dtype's size, and is calibrated on measurements of a Stable Diffusion 1.5-architecture
UNet at 512 px in bf16 on an H100 (peak = 2.09 GiB + 1.10 GiB a row without checkpointing,
+ 0.26 GiB a row with it; docs/benchmarks.md §6). An out-of-memory error during a round halves
the micro-batch and retries the batch (``d3po_core.rounds``), so an estimate that is off costs
time, never the round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .models import side_modules

GiB = 2**30

#: activation bytes a UNet row keeps for backward, per (latent pixel × width unit × byte of
#: dtype), without / with gradient checkpointing; from the SD 1.5 measurements above
_SD15_SCALE = 64 * 64 * 2280 * 2  # latent area × width units (see _width_units) × bf16 bytes
ROW_FACTOR = 1.10 * GiB / _SD15_SCALE
ROW_FACTOR_CHECKPOINTED = 0.26 * GiB / _SD15_SCALE
#: the share of the device's free memory a round plans to use (the rest: allocator slack)
FREE_SHARE = 0.9
#: checkpointing is chosen automatically when it saves at least this much at the micro-batch
#: (at 8 D3PO items on SD 1.5 it was both 3.6× smaller and 1.25× faster on an H100)
CHECKPOINT_SAVING = 1 * GiB


@dataclass(frozen=True)
class MemoryPlan:
    """How a round runs: items a UNet call, gradient checkpointing, and why."""

    micro_batch: int
    gradient_checkpointing: bool
    offload: bool  # the VAE and text encoder leave the device while the round trains
    budget_bytes: int | None  # None: no limit known (CPU without --max-memory-gb)
    peak_bytes: int  # the estimated peak
    reason: str


def _width_units(unet_config) -> float:
    """Σ over the UNet's resolution levels of channels × layers × (1 + transformer depth),
    each level at a quarter of the area of the one above: what one latent pixel costs."""
    channels = list(unet_config.block_out_channels)
    layers = unet_config.layers_per_block
    layers = list(layers) if isinstance(layers, list | tuple) else [layers] * len(channels)
    depth = getattr(unet_config, "transformer_layers_per_block", 1)
    depth = list(depth) if isinstance(depth, list | tuple) else [depth] * len(channels)
    kinds = list(unet_config.down_block_types)
    total = 0.0
    for i, (c, n, d, kind) in enumerate(zip(channels, layers, depth, kinds, strict=False)):
        attention = d if "CrossAttn" in kind else 0
        total += c * n * (1 + attention) / 4**i
    return total


def row_bytes(unet, latent_hw: tuple[int, int], *, checkpointed: bool) -> int:
    """Activation bytes one UNet row (one image at one step) keeps for the backward pass."""
    itemsize = torch.finfo(unet.dtype).bits // 8
    factor = ROW_FACTOR_CHECKPOINTED if checkpointed else ROW_FACTOR
    return int(factor * latent_hw[0] * latent_hw[1] * _width_units(unet.config) * itemsize)


def module_bytes(*modules) -> int:
    """Bytes of the parameters and buffers of the given modules (None is skipped)."""
    return sum(
        t.numel() * t.element_size()
        for m in modules
        if m is not None
        for t in (*m.parameters(), *m.buffers())
    )


def plan_memory(
    *,
    budget_bytes: int | None,
    fixed_bytes: int,
    row_bytes_plain: int,
    row_bytes_checkpointed: int,
    rows_per_item: int,
    batch_size: int,
    checkpointing: bool | None = None,
    micro_batch: int | None = None,
    offload_bytes: int = 0,
) -> MemoryPlan:
    """The micro-batch and checkpointing of a round.

    budget_bytes: the peak the round may reach (None: no limit); fixed_bytes: what stays on
    the device whatever the batch (weights); offload_bytes: the part of it that may leave the
    device while training (VAE, text encoder). ``checkpointing`` and ``micro_batch`` force
    a choice (None: automatic).

    Automatic: the largest micro-batch (the batch, halved until it fits) with checkpointing
    when it saves ≥ 1 GiB there or the micro-batch would otherwise shrink; the VAE and text
    encoder leave the device only when that lets a larger micro-batch fit.
    """
    rows_per_item = max(1, rows_per_item)
    cap = min(micro_batch or batch_size, batch_size)

    def peak(m: int, ckpt: bool, off: bool) -> int:
        per_row = row_bytes_checkpointed if ckpt else row_bytes_plain
        return fixed_bytes - (offload_bytes if off else 0) + m * rows_per_item * per_row

    def fits(m: int, ckpt: bool, off: bool) -> bool:
        return budget_bytes is None or peak(m, ckpt, off) <= budget_bytes

    sizes = [cap]
    while sizes[-1] > 1:
        sizes.append(math.ceil(sizes[-1] / 2))
    modes = [checkpointing] if checkpointing is not None else [False, True]
    for off in (False, True) if offload_bytes else (False,):
        for m in sizes:
            fitting = [c for c in modes if fits(m, c, off)]
            if not fitting:
                continue
            if checkpointing is not None:
                ckpt, why = checkpointing, "checkpointing as set"
            elif False not in fitting:
                ckpt, why = True, "checkpointing makes it fit"
            else:
                saving = m * rows_per_item * (row_bytes_plain - row_bytes_checkpointed)
                ckpt = saving >= CHECKPOINT_SAVING
                why = "checkpointing saves ≥ 1 GiB" if ckpt else "fits without checkpointing"
            if m < cap:
                why += f"; the batch of {cap} does not fit"
            return MemoryPlan(m, ckpt, off, budget_bytes, peak(m, ckpt, off), why)
    # nothing fits: the smallest plan, and the round's out-of-memory handling reports it
    ckpt = modes[-1]
    smallest = peak(1, ckpt, bool(offload_bytes))
    return MemoryPlan(
        1, ckpt, bool(offload_bytes), budget_bytes, smallest, "even one item exceeds the budget"
    )


def device_budget(device: torch.device, max_memory_gb: float | None) -> int | None:
    """The peak a round may reach: the user's cap, and on CUDA what is allocated now plus
    90 % of what is free (None on other devices without a cap)."""
    cap = None if max_memory_gb is None else int(max_memory_gb * GiB)
    if device.type != "cuda":
        return cap
    free, _total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    available = allocated + int(FREE_SHARE * (free + cached))
    return available if cap is None else min(cap, available)


def plan_round(
    pipe,
    *,
    latent_hw: tuple[int, int],
    rows_per_item: int,
    batch_size: int,
    max_memory_gb: float | None = None,
    checkpointing: bool | None = None,
    micro_batch: int | None = None,
) -> MemoryPlan:
    """The plan of a round of ``pipe`` on its device (see :func:`plan_memory`)."""
    unet = pipe.unet
    device = unet.device
    on_device = [m for m in side_modules(pipe) if next(m.parameters()).device == device]
    if device.type == "cuda":
        fixed = torch.cuda.memory_allocated(device)
    else:
        fixed = module_bytes(unet, *on_device)
    return plan_memory(
        budget_bytes=device_budget(device, max_memory_gb),
        fixed_bytes=fixed,
        row_bytes_plain=row_bytes(unet, latent_hw, checkpointed=False),
        row_bytes_checkpointed=row_bytes(unet, latent_hw, checkpointed=True),
        rows_per_item=rows_per_item,
        batch_size=batch_size,
        checkpointing=checkpointing,
        micro_batch=micro_batch,
        offload_bytes=module_bytes(*on_device) if device.type == "cuda" else 0,
    )
