"""A D3PO round: picks → (pair, step) items → batched LoRA updates → metrics.

Many (pair, step) items go through the UNet in one call (winner and loser side by side, with
classifier-free guidance: 4 rows per item). The reference log-probs are computed once at the
start of the round under ``no_grad`` — with the adapter disabled (the base model) or, as an
option, with the adapter as it stood (the previous round). ``accelerate`` provides mixed
precision, gradient accumulation and data parallelism under ``accelerate launch``.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from accelerate import Accelerator

from .d3po import PairMode, Reduction, d3po_loss, pairs_from_pick, select_steps
from .models import LoraSettings, add_lora, has_lora, lora_parameters, set_lora_enabled
from .sampling import Trajectory, ddim_step, guided_model_output


class RoundSettings:
    """What D3PO's and DDPO's round settings share: loading from a dict, the loop's checks.

    Subclasses are dataclasses with the fields learning_rate, epochs, batch_size, grad_accum
    and lora.
    """

    @classmethod
    def from_dict(cls, data: dict):
        data = dict(data)
        lora = LoraSettings(**data.pop("lora", {}))
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(lora=lora, **known)

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("epochs, batch_size and grad_accum must be ≥ 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, not {self.learning_rate}")


@dataclass
class D3POConfig(RoundSettings):
    """Settings of one D3PO round. Every default is chosen to be safe for a first round.

    beta: scale of the margin Δ. With ``reduction="sum"`` the log-ratios are summed over the
        latent's dimensions, so β must be small; 0.1 keeps Δ in the sigmoid's linear range
        for the first steps of a round on the embedded model.
    reduction: "sum" (the true log-density ratio) or "mean" (the official code's per-dimension
        average, which with ε = 0.1 clipping leaves the loss stuck near 0.693).
    ratio_clip: clamp each ratio π_θ/π_ref to [1−ε, 1+ε] (zero gradient outside); None = off.
    pairs: "best-worst" (one pair a pick) or "implied" (2N−3 pairs a pick).
    timestep_fraction: share of the denoising steps trained per pair, drawn at random.
    learning_rate: AdamW learning rate of the LoRA weights.
    epochs: passes over the round's items.
    batch_size: (pair, step) items per UNet call.
    grad_accum: UNet calls per optimizer step (accelerate's gradient accumulation).
    max_grad_norm: gradient clipping norm.
    mixed_precision: accelerate's "no", "fp16" or "bf16"; None follows the UNet's dtype.
    reference: "base" (adapter disabled) or "previous" (the adapter as the round starts).
    gradient_checkpointing: trade compute for memory (SD 1.5 at 512 px on 8 GB GPUs).
    replay: train on all picks so far, not only those since the last round.
    seed: seeds the item order and step selection.
    """

    beta: float = 0.1
    reduction: Reduction = "sum"
    ratio_clip: float | None = None
    pairs: PairMode = "best-worst"
    timestep_fraction: float = 1.0
    learning_rate: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] | None = None
    reference: Literal["base", "previous"] = "base"
    gradient_checkpointing: bool = False
    replay: bool = False
    seed: int = 0
    lora: LoraSettings = field(default_factory=LoraSettings)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> None:
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, not {self.beta}")
        super().validate()
        if self.reference not in ("base", "previous"):
            raise ValueError(f"reference must be 'base' or 'previous', not {self.reference!r}")


@dataclass
class Example:
    """One confirmed pick: a grid's trajectory and the indices of its best and worst image."""

    trajectory: Trajectory
    best: int
    worst: int
    pick_id: int | None = None


@dataclass
class ProgressEvent:
    step: int
    total: int
    loss: float
    accuracy: float
    eta_s: float
    phase: str = "train"


class RoundCancelled(Exception):
    """The round was cancelled; the adapter is back where it stood before the round."""


class NoPicksError(ValueError):
    """There is nothing to train on."""


@dataclass
class RoundResult:
    metrics: dict
    history: list[dict]


@dataclass
class Batch:
    """Items trained in one UNet call; they share the sampling settings ``key``."""

    key: tuple
    items: list[tuple]  # D3PO: (example, winner, loser, step); DDPO: (example, image, step)
    ref_w: torch.Tensor | None = None
    ref_l: torch.Tensor | None = None


def build_items(examples: list[Example], config: D3POConfig) -> list[tuple[int, int, int, int]]:
    """All (example, winner, loser, step) items of a round, steps drawn per pair."""
    generator = torch.Generator().manual_seed(config.seed)
    items = []
    for e, ex in enumerate(examples):
        if ex.trajectory.settings.eta <= 0:
            raise ValueError("grids sampled with eta = 0 have no log-probs; sample with eta > 0")
        steps = ex.trajectory.timesteps.numel()
        for win, lose in pairs_from_pick(ex.trajectory.n, ex.best, ex.worst, config.pairs):
            for k in select_steps(steps, config.timestep_fraction, generator):
                items.append((e, win, lose, k))
    return items


def _batches(examples: list[Example], items: list, config: D3POConfig) -> list[Batch]:
    """Chunk items into batches that share the sampling settings the step math depends on."""
    trajectories = [ex.trajectory for ex in examples]
    return make_batches(trajectories, items, config.batch_size, config.seed)


def make_batches(
    trajectories: list[Trajectory], items: list[tuple], batch_size: int, seed: int
) -> list[Batch]:
    """Shuffled batches of items (``item[0]`` indexes ``trajectories``) with one settings key."""
    groups: dict[tuple, list] = defaultdict(list)
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
    pipe, trajectories: list[Trajectory], key: tuple, rows: list[tuple[int, int, int]]
) -> torch.Tensor:
    """log π(x_{t−1}|x_t) for each (trajectory, image, step) row, in one UNet call.

    ``key`` is the batch's (steps, guidance, eta, has negative prompt), shared by every row.
    """
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    steps, guidance, eta, has_neg = key
    scheduler.set_timesteps(steps, device=device)
    x_t, x_prev, ts, cond, uncond = [], [], [], [], []
    for e, idx, k in rows:
        traj = trajectories[e]
        x_t.append(traj.latents[idx, k])
        x_prev.append(traj.latents[idx, k + 1])
        ts.append(traj.timesteps[k])
        cond.append(traj.prompt_embeds[0])
        if has_neg:
            uncond.append(traj.negative_embeds[0])
    x_t = torch.stack(x_t).to(device)
    x_prev = torch.stack(x_prev).to(device)
    ts = torch.stack(ts).to(device)
    cond = torch.stack(cond).to(device)
    uncond_t = torch.stack(uncond).to(device) if has_neg else None
    out = guided_model_output(unet, x_t, ts, cond, uncond_t, guidance)
    return ddim_step(scheduler, out, ts, x_t, eta, prev_sample=x_prev).log_prob


def settings_key(traj: Trajectory) -> tuple:
    """What the step math of a trajectory depends on; a UNet call mixes only equal keys."""
    s = traj.settings
    return (s.steps, s.guidance, s.eta, traj.negative_embeds is not None)


def _policy_log_probs(
    pipe, examples: list[Example], batch: Batch
) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_{t−1}|x_t) of the winner and loser side of each item, one UNet call."""
    rows = [(e, win, k) for e, win, _lose, k in batch.items]
    rows += [(e, lose, k) for e, _win, lose, k in batch.items]
    trajectories = [ex.trajectory for ex in examples]
    return log_probs_of(pipe, trajectories, batch.key, rows).chunk(2)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def run_round(
    pipe,
    examples: list[Example],
    config: D3POConfig | None = None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accelerator: Accelerator | None = None,
) -> RoundResult:
    """Train the pipeline's LoRA adapter on the given picks for one round.

    Adds an adapter if the UNet has none. On cancel or error the adapter weights are restored
    to their state before the round, so a cancelled round leaves nothing half-trained.
    """
    config = config or D3POConfig()
    config.validate()
    if not examples:
        raise NoPicksError("no picks to train on: label some grids (best and worst) first")
    return train_adapter(
        pipe,
        config,
        lambda params: _train(
            pipe, examples, config, params, on_progress, should_cancel, accelerator
        ),
    )


def train_adapter(pipe, config, train: Callable[[list[torch.nn.Parameter]], RoundResult]):
    """Run ``train(lora_params)`` on the pipeline's adapter (added if missing); on cancel or
    error the adapter weights are restored to their state before the call."""
    unet = pipe.unet
    if not has_lora(unet):
        add_lora(unet, config.lora)
    set_lora_enabled(unet, True)
    params = lora_parameters(unet)
    snapshot = [p.detach().clone() for p in params]
    try:
        return train(params)
    except BaseException:
        with torch.no_grad():
            for p, saved in zip(params, snapshot, strict=True):
                p.copy_(saved)
        raise
    finally:
        set_lora_enabled(unet, True)
        if config.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.eval()


def make_accelerator(config, unet) -> Accelerator:
    """accelerate's Accelerator for a round's precision and gradient accumulation."""
    device = unet.device
    precision = config.mixed_precision or _precision_of(unet.dtype, device)
    return Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=device.type == "cpu",
    )


@dataclass
class _Loop:
    history: list[dict]
    final: dict[str, torch.Tensor]  # per-item terms of the last epoch, concatenated
    grad_norm: float
    optimizer_steps: int


def optimize(
    pipe,
    batches: list[Batch],
    config,
    params: list[torch.nn.Parameter],
    objective: Callable[[Batch], dict[str, torch.Tensor]],
    *,
    accelerator: Accelerator,
    start: float,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> _Loop:
    """Epochs of AdamW steps on the LoRA ``params``.

    ``objective(batch)`` returns per-item tensors: ``loss`` (minimised through its mean),
    ``accuracy`` (shown in progress) and any other terms; each history record averages them
    over an optimizer step. ``config`` gives learning_rate, epochs, grad_accum, max_grad_norm,
    gradient_checkpointing and seed.
    """
    unet = pipe.unet
    model = accelerator.prepare_model(unet) if accelerator.num_processes > 1 else unet
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    optimizer = accelerator.prepare_optimizer(optimizer)
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    total = math.ceil(len(batches) / config.grad_accum) * config.epochs
    history: list[dict] = []
    rng = random.Random(config.seed + 1)
    step, window, norms = 0, [], []
    final: list[dict[str, torch.Tensor]] = []
    for p in params:  # nothing left over from an earlier round's accumulation
        p.grad = None
    for epoch in range(config.epochs):
        order = list(batches)
        rng.shuffle(order)
        for i, batch in enumerate(order):
            if should_cancel is not None and should_cancel():
                raise RoundCancelled("round cancelled; the adapter is unchanged")
            if epoch == config.epochs - 1 and i == len(order) - 1:
                # the round's last batch closes a partial accumulation group with a step
                accelerator.step = accelerator.gradient_accumulation_steps - 1
            with accelerator.accumulate(model):
                terms = objective(batch)
                loss = terms["loss"].mean()
                if not torch.isfinite(loss):
                    raise FloatingPointError("the loss is not finite; lower the learning rate")
                accelerator.backward(loss)
                detached = {k: v.detach() for k, v in terms.items()}
                window.append(detached)
                if epoch == config.epochs - 1:
                    final.append(detached)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    norms.append(float(norm))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients or i == len(order) - 1:
                step += 1
                record = {"step": step, "epoch": epoch}
                for k in window[0]:
                    record[k] = float(torch.cat([w[k] for w in window]).double().mean())
                history.append(record)
                window = []
                elapsed = time.perf_counter() - start
                if on_progress is not None:
                    eta = elapsed / step * max(total - step, 0)
                    on_progress(ProgressEvent(step, total, record["loss"], record["accuracy"], eta))
    final_terms = {k: torch.cat([f[k] for f in final]).double() for k in final[0]}
    return _Loop(history, final_terms, sum(norms) / max(len(norms), 1), step)


def _train(pipe, examples, config, params, on_progress, should_cancel, accelerator) -> RoundResult:
    start = time.perf_counter()
    unet = pipe.unet
    device = unet.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    accelerator = accelerator or make_accelerator(config, unet)
    items = build_items(examples, config)
    batches = _batches(examples, items, config)
    # Each process of a multi-GPU launch trains on its own share of the batches.
    batches = batches[accelerator.process_index :: accelerator.num_processes] or batches[:1]
    dims = math.prod(examples[0].trajectory.latents.shape[2:])

    with torch.no_grad():  # reference log-probs, once, before any update
        set_lora_enabled(unet, config.reference == "previous")
        for batch in batches:
            batch.ref_w, batch.ref_l = _policy_log_probs(pipe, examples, batch)
        set_lora_enabled(unet, True)

    def objective(batch: Batch) -> dict[str, torch.Tensor]:
        logp_w, logp_l = _policy_log_probs(pipe, examples, batch)
        terms = d3po_loss(
            logp_w,
            batch.ref_w,
            logp_l,
            batch.ref_l,
            dims=dims,
            beta=config.beta,
            reduction=config.reduction,
            ratio_clip=config.ratio_clip,
        )
        return {
            "loss": terms.loss,
            "accuracy": (terms.delta > 0).float(),
            "mean_delta": terms.delta,
            "half_sq_ratio": 0.25 * (terms.log_ratio_w**2 + terms.log_ratio_l**2),
        }

    loop = optimize(
        pipe,
        batches,
        config,
        params,
        objective,
        accelerator=accelerator,
        start=start,
        on_progress=on_progress,
        should_cancel=should_cancel,
    )
    history = [{k: v for k, v in h.items() if k != "half_sq_ratio"} for h in loop.history]
    final = loop.final
    metrics = {
        "loss": sum(h["loss"] for h in history) / len(history),
        "loss_last": history[-1]["loss"],
        "accuracy": float(final["accuracy"].mean()),
        "mean_delta": float(final["mean_delta"].mean()),
        "grad_norm": loop.grad_norm,
        "kl": float(final["half_sq_ratio"].mean()),
        "seconds": time.perf_counter() - start,
        "peak_memory_mb": peak_memory_mb(device),
        "picks": len(examples),
        "items": len(items),
        "optimizer_steps": loop.optimizer_steps,
    }
    return RoundResult(metrics=metrics, history=history)


def _precision_of(dtype: torch.dtype, device: torch.device) -> str:
    if device.type != "cuda":
        return "no"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
