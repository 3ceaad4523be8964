"""The one round loop: stored (trajectory, step) items → batched LoRA updates → metrics.

An :class:`Objective` says which items a round trains on, what it computes once before any
update (e.g. reference log-probs) and how a batch of items is scored. The loop owns the rest:
the adapter (added if missing, restored on cancel or error), ``accelerate`` (precision,
gradient accumulation, data parallelism through a prepared DataLoader), batching by sampling
settings, cancel, progress events and the metrics every round reports.

Many items go through the UNet in one call; the log-prob of a stored transition is computed
exactly as in sampling (``guided_model_output`` and ``ddim_step``), so a ratio to the recorded
log-probs is that of the policy that drew the images.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, Sampler

from .errors import NoPicksError, RoundCancelled, SettingsError
from .families import Cond
from .memory import MemoryPlan, plan_round
from .models import (
    add_lora,
    has_lora,
    lora_parameters,
    offloaded,
    scaled_lora,
    set_lora_enabled,
)
from .sampling import Trajectory, ddim_step, guided_model_output
from .settings import RoundSettings

#: share of a round's optimizer steps over which a scheduled step size warms up from 0
_WARMUP = 0.1


@dataclass
class ProgressEvent:
    step: int
    total: int
    loss: float
    accuracy: float
    eta_s: float
    phase: str = "train"
    message: str = ""  # something the user should read now (e.g. a smaller micro-batch)


@dataclass
class RoundResult:
    metrics: dict
    history: list[dict]


@dataclass
class Batch:
    """Items trained in one UNet call; they share the sampling settings ``key``.

    ``item[0]`` of each item indexes the objective's trajectories; ``cache`` holds what the
    objective computed for the batch before the first update (e.g. reference log-probs).
    """

    key: SettingsKey
    items: list[tuple]
    cache: dict[str, torch.Tensor] = field(default_factory=dict)


def split_batch(batch: Batch, size: int) -> list[Batch]:
    """The batch as micro-batches of at most ``size`` items, each with its slice of the
    cache (a cache tensor holds one row per item)."""
    return [
        Batch(
            key=batch.key,
            items=batch.items[i : i + size],
            cache={k: v[i : i + size] for k, v in batch.cache.items()},
        )
        for i in range(0, len(batch.items), size)
    ]


class Objective:
    """How a round scores its items, built from the round's examples (each with a
    ``trajectory``) and settings. Subclasses implement :meth:`items` and :meth:`terms`."""

    empty_message = "nothing to train on"
    #: images an item scores (a pair: 2), and whether its UNet calls use guidance
    sides = 1
    guided = True

    def __init__(self, examples: list, config: RoundSettings) -> None:
        self.examples, self.config = examples, config
        self.trajectories: list[Trajectory] = [ex.trajectory for ex in examples]

    @property
    def latent_dims(self) -> int:
        """Dimensions of one latent (the log-probs are summed over them)."""
        return math.prod(self.trajectories[0].latents.shape[2:])

    def rows_per_item(self) -> int:
        """UNet rows one item takes (its images, twice with classifier-free guidance)."""
        cfg = self.guided and any(
            t.negative_embeds is not None and t.settings.guidance > 1 for t in self.trajectories
        )
        return self.sides * (2 if cfg else 1)

    def items(self) -> list[tuple]:
        """Every item of the round; ``item[0]`` indexes ``trajectories``."""
        raise NotImplementedError

    def prepare(self, pipe, batches: list[Batch]) -> None:
        """Called once before any update, with the adapter enabled."""

    def terms(self, pipe, batch: Batch) -> dict[str, torch.Tensor]:
        """Per-item tensors: ``loss`` (minimised through its mean), ``accuracy`` (shown in
        progress) and any other terms; the round reports each term's mean over its last epoch."""
        raise NotImplementedError

    def summary(self) -> dict:
        """Metrics of the round's data (counts, reward statistics)."""
        return {}


def require_log_probs(trajectories: list[Trajectory]) -> None:
    if any(t.settings.eta <= 0 for t in trajectories):
        raise SettingsError("grids sampled with eta = 0 have no log-probs; sample with eta > 0")


def select_steps(
    num_steps: int, fraction: float, generator: torch.Generator | None = None
) -> list[int]:
    """Indices of the denoising steps trained for one item: all, or a random fraction."""
    if not 0 < fraction <= 1:
        raise SettingsError(f"timestep_fraction must be in (0, 1], not {fraction}")
    if fraction == 1:
        return list(range(num_steps))
    count = max(1, round(num_steps * fraction))
    return sorted(torch.randperm(num_steps, generator=generator)[:count].tolist())


class SettingsKey(NamedTuple):
    """What the step math of a trajectory depends on; a UNet call mixes only equal keys."""

    steps: int
    guidance: float
    eta: float
    negative: bool  # the grid has unconditional rows (a negative prompt)
    strength: float = 1.0  # the adapter's weight the grid was sampled at


def settings_key(traj: Trajectory) -> SettingsKey:
    """The trajectory's :class:`SettingsKey`."""
    s = traj.settings
    return SettingsKey(s.steps, s.guidance, s.eta, traj.negative_embeds is not None, s.strength)


def make_batches(
    trajectories: list[Trajectory], items: list[tuple], batch_size: int, seed: int
) -> list[Batch]:
    """Shuffled batches of items (``item[0]`` indexes ``trajectories``) with one settings key."""
    groups: dict[SettingsKey, list] = defaultdict(list)
    for item in items:
        groups[settings_key(trajectories[item[0]])].append(item)
    rng = random.Random(seed)
    batches = []
    for key, group in groups.items():
        rng.shuffle(group)
        for i in range(0, len(group), batch_size):
            batches.append(Batch(key=key, items=group[i : i + batch_size]))
    rng.shuffle(batches)
    return batches


def log_probs_of(
    pipe, trajectories: list[Trajectory], key: SettingsKey, rows: list[tuple[int, int, int]]
) -> torch.Tensor:
    """log π(x_{t−1}|x_t) for each (trajectory, image, step) row, in one UNet call; ``key``
    is the batch's, shared by every row."""
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    has_neg = key.negative
    scheduler.set_timesteps(key.steps, device=device)
    x_t, x_prev, ts, cond, uncond = [], [], [], [], []
    for e, idx, k in rows:
        traj = trajectories[e]
        x_t.append(traj.latents[idx, k])
        x_prev.append(traj.latents[idx, k + 1])
        ts.append(traj.timesteps[k])
        cond.append(traj.cond[0])
        if has_neg:
            uncond.append(traj.uncond[0])
    x_t = torch.stack(x_t).to(device)
    x_prev = torch.stack(x_prev).to(device)
    ts = torch.stack(ts).to(device)
    cond_b = Cond.stack(cond).to(device)
    uncond_b = Cond.stack(uncond).to(device) if has_neg else None
    out = guided_model_output(unet, x_t, ts, cond_b, uncond_b, key.guidance)
    return ddim_step(scheduler, out, ts, x_t, key.eta, prev_sample=x_prev).log_prob


def pair_rows(items: list[tuple[int, int, int, int]]) -> list[tuple[int, int, int]]:
    """(trajectory, image, step) rows of (trajectory, winner, loser, step) items: every
    winner's row, then every loser's, so a batch's log-probs split in two with ``chunk(2)``."""
    return [(e, win, k) for e, win, _lose, k in items] + [
        (e, lose, k) for e, _win, lose, k in items
    ]


def sampling_policy_log_probs(
    pipe, trajectories: list[Trajectory], key: SettingsKey, rows: list[tuple[int, int, int]]
) -> torch.Tensor:
    """:func:`log_probs_of` with the adapter at the strength the batch's grids were drawn at:
    the policy whose log-probs were recorded (a PPO ratio's numerator)."""
    with scaled_lora(pipe.unet, key.strength):
        return log_probs_of(pipe, trajectories, key, rows)


def recorded_log_probs(trajectories: list[Trajectory], rows: list[tuple[int, int, int]]):
    """The log-probs recorded while sampling (the sampling policy's) of each row."""
    return torch.stack([trajectories[e].log_probs[i, k] for e, i, k in rows])


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def make_accelerator(config: RoundSettings, unet) -> Accelerator:
    """accelerate's Accelerator for a round's precision and gradient accumulation; the
    precision follows the UNet's dtype unless the config names one.

    accelerate keeps one precision a process; in a single process a round at another precision
    than the last (fp16, then bf16 or fp32: the studio and notebooks live long) starts it anew.
    """
    device = unet.device
    precision = config.mixed_precision or _precision_of(unet.dtype, device)
    cpu = device.type == "cpu"
    shared = AcceleratorState._shared_state
    if shared:
        state_device = shared.get("device")
        changed = shared.get("_mixed_precision") != precision or (
            cpu and state_device is not None and state_device.type != "cpu"
        )
        if changed:
            if shared.get("num_processes", 1) > 1:
                raise SettingsError(
                    f"a multi-process launch keeps one precision ({shared.get('_mixed_precision')}"
                    f"); launch again to train at {precision}"
                )
            AcceleratorState._reset_state()  # the process group (PartialState) stays
    return Accelerator(
        mixed_precision=precision, gradient_accumulation_steps=config.grad_accum, cpu=cpu
    )


def _precision_of(dtype: torch.dtype, device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


@contextmanager
def trained_adapter(unet, config: RoundSettings) -> Iterator[list[torch.nn.Parameter]]:
    """The UNet's LoRA parameters (an adapter is added if missing); on cancel or error the
    adapter weights are restored to their state before the block."""
    if not has_lora(unet):
        add_lora(unet, config.lora, seed=config.seed)
    set_lora_enabled(unet, True)
    params = lora_parameters(unet)
    snapshot = [p.detach().clone() for p in params]
    try:
        yield params
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(params, snapshot, strict=True):
                p.copy_(saved)
        raise
    finally:
        set_lora_enabled(unet, True)
        if getattr(unet, "is_gradient_checkpointing", False):
            unet.disable_gradient_checkpointing()
        unet.eval()


class OutOfMemory(SettingsError):
    """A round ran out of device memory even one item at a time."""


class _MicroBatches:
    """Runs a batch's items through a function in micro-batches; on an out-of-memory error it
    frees the cache, halves the micro-batch (then turns gradient checkpointing on) and tells
    the caller to run the batch again."""

    def __init__(self, unet, plan: MemoryPlan, on_message: Callable[[str], None]) -> None:
        self.unet, self.size, self.on_message = unet, plan.micro_batch, on_message
        self.checkpointing = plan.gradient_checkpointing
        self.retries = 0
        self._set_checkpointing(self.checkpointing)

    def _set_checkpointing(self, on: bool) -> None:
        if on:
            self.unet.enable_gradient_checkpointing()
            self.unet.train()
        elif getattr(self.unet, "is_gradient_checkpointing", False):
            self.unet.disable_gradient_checkpointing()
            self.unet.eval()

    def run(self, batch: Batch, fn: Callable[[Batch, int], object], undo=None) -> list:
        """``fn(micro_batch, batch_items)`` for each micro-batch of ``batch``; ``undo()``
        before a retry restores what the failed attempt changed."""
        while True:
            try:
                return [fn(part, len(batch.items)) for part in split_batch(batch, self.size)]
            except torch.OutOfMemoryError:
                failed = self.size
            # out of the except block, so the failed attempt's tensors can be freed
            if undo is not None:
                undo()
            if self.unet.device.type == "cuda":
                torch.cuda.empty_cache()
            if failed > 1:
                self.size = max(1, failed // 2)
                change = f"micro-batch {failed} → {self.size}"
            elif not self.checkpointing:
                self.checkpointing = True
                self._set_checkpointing(True)
                change = "gradient checkpointing on"
            else:
                raise OutOfMemory(
                    "out of device memory even one item at a time with gradient checkpointing; "
                    "free memory on the device (other programs), or lower the resolution"
                )
            self.retries += 1
            self.on_message(f"out of memory: retrying the batch with {change}")


class _RoundOrder(Sampler[int]):
    """Batch indices for the whole round: each epoch a fresh shuffle, epochs back to back, so
    one DataLoader pass is the round and its end closes the last accumulation group."""

    def __init__(self, count: int, epochs: int, seed: int) -> None:
        self.count, self.epochs, self.seed = count, epochs, seed

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed)
        for _ in range(self.epochs):
            order = list(range(self.count))
            rng.shuffle(order)
            yield from order

    def __len__(self) -> int:
        return self.count * self.epochs


def _records(length: int, epochs: int, grad_accum: int) -> int:
    """How many history records a round of ``length`` batches writes (see :func:`run_round`)."""
    records, pending = 0, 0
    for j in range(length):
        pending += 1
        sync = pending == grad_accum or j == length - 1
        pending = 0 if sync else pending
        records += sync or _epoch(j + 1, length, epochs) != _epoch(j, length, epochs)
    return records


def _epoch(j: int, length: int, epochs: int) -> int:
    return min(j * epochs // length, epochs - 1)


def plan_of(pipe, objective: Objective, config: RoundSettings) -> MemoryPlan:
    """The memory plan of a round of ``objective`` on ``pipe`` (see ``d3po_core.memory``)."""
    return plan_round(
        pipe,
        latent_hw=tuple(objective.trajectories[0].latents.shape[-2:]),
        rows_per_item=objective.rows_per_item(),
        batch_size=config.batch_size,
        max_memory_gb=config.max_memory_gb,
        checkpointing=config.checkpointing,
        micro_batch=config.micro_batch,
    )


def run_round(
    pipe,
    objective: Objective,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> RoundResult:
    """Train the pipeline's LoRA adapter on the objective's items for one round.

    AdamW on the LoRA parameters for ``config.epochs`` passes; a history record averages the
    terms over each optimizer step (and closes at each epoch's end). Each batch runs in
    micro-batches that fit the device's memory (``d3po_core.memory``), halved on an
    out-of-memory error. A cancelled or failed round leaves the adapter as it was.
    """
    config = objective.config
    config.validate()
    items = objective.items()
    if not items:
        raise NoPicksError(objective.empty_message)
    unet = pipe.unet
    plan = plan_of(pipe, objective, config)
    with offloaded(pipe, plan.offload), trained_adapter(unet, config) as params:
        start = time.perf_counter()
        if unet.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(unet.device)
        accelerator = accelerator or make_accelerator(config, unet)
        history: list[dict] = []

        def tell(message: str) -> None:
            if on_progress is not None:
                last = history[-1] if history else {"loss": math.nan, "accuracy": math.nan}
                on_progress(
                    ProgressEvent(
                        len(history), total, last["loss"], last["accuracy"], 0.0, "memory", message
                    )
                )

        batches = make_batches(objective.trajectories, items, config.batch_size, config.seed)
        total = 1
        micro = _MicroBatches(unet, plan, tell)
        with torch.no_grad():
            for batch in batches:
                parts = micro.run(batch, lambda part, _n: objective.prepare(pipe, [part]) or part)
                batch.cache = {
                    k: torch.cat([part.cache[k] for part in parts]) for k in parts[0].cache
                }
        model = accelerator.prepare_model(unet) if accelerator.num_processes > 1 else unet
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        optimizer = accelerator.prepare_optimizer(optimizer)
        loader = DataLoader(
            batches,
            batch_size=1,
            sampler=_RoundOrder(len(batches), config.epochs, config.seed + 1),
            collate_fn=lambda one: one[0],
        )
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
        for p in params:  # nothing left over from an earlier round's accumulation
            p.grad = None
        ema = None if config.ema_decay is None else EMAModel(params, decay=config.ema_decay)
        length = len(loader)
        total = _records(length, config.epochs, config.grad_accum)
        steps = math.ceil(length / config.grad_accum)
        schedule = get_scheduler(
            config.lr_schedule,
            optimizer,
            num_warmup_steps=math.ceil(_WARMUP * steps),  # unused by constant
            num_training_steps=steps,
        )
        window: list[dict[str, torch.Tensor]] = []
        final: list[dict[str, torch.Tensor]] = []
        norms: list[float] = []

        def step(part: Batch, batch_items: int) -> dict[str, torch.Tensor]:
            """Forward and backward of one micro-batch; its share of the batch's mean loss."""
            terms = objective.terms(pipe, part)
            loss = terms["loss"].sum() / batch_items
            if not torch.isfinite(loss):
                raise FloatingPointError("the loss is not finite; lower the learning rate")
            accelerator.backward(loss)
            return {k: v.detach() for k, v in terms.items()}

        for j, batch in enumerate(loader):
            if should_cancel is not None and should_cancel():
                raise RoundCancelled("round cancelled; the adapter is unchanged")
            epoch = _epoch(j, length, config.epochs)
            with accelerator.accumulate(model):
                grads = [None if p.grad is None else p.grad.clone() for p in params]

                def undo(grads=grads) -> None:
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g

                parts = micro.run(batch, step, undo)
                detached = {k: torch.cat([part[k] for part in parts]) for k in parts[0]}
                window.append(detached)
                if epoch == config.epochs - 1:
                    final.append(detached)
                if accelerator.sync_gradients:
                    norms.append(float(accelerator.clip_grad_norm_(params, config.max_grad_norm)))
                lr = optimizer.param_groups[0]["lr"]  # the step size this update took
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if accelerator.sync_gradients:
                    schedule.step()
                    if ema is not None:
                        ema.step(params)
            if accelerator.sync_gradients or _epoch(j + 1, length, config.epochs) != epoch:
                record = {"step": len(history) + 1, "epoch": epoch, "lr": lr}
                for k in window[0]:
                    record[k] = float(torch.cat([w[k] for w in window]).double().mean())
                history.append(record)
                window = []
                if on_progress is not None:
                    elapsed = time.perf_counter() - start
                    eta = elapsed / len(history) * max(total - len(history), 0)
                    on_progress(
                        ProgressEvent(len(history), total, record["loss"], record["accuracy"], eta)
                    )
        if ema is not None:
            ema.copy_to(params)
        last = {k: torch.cat([f[k] for f in final]).double() for k in final[0]}
        metrics = {
            "loss": sum(h["loss"] for h in history) / len(history),
            "loss_last": history[-1]["loss"],
            **{k: float(v.mean()) for k, v in last.items() if k != "loss"},
            "grad_norm": sum(norms) / max(len(norms), 1),
            "seconds": time.perf_counter() - start,
            "peak_memory_mb": peak_memory_mb(unet.device),
            "items": len(items),
            "optimizer_steps": len(norms),
            "micro_batch": micro.size,
            "gradient_checkpointing": int(micro.checkpointing),
            "oom_retries": micro.retries,
            **objective.summary(),
        }
    return RoundResult(metrics=metrics, history=history)
