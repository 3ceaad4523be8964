"""Mirrored rounds: keep only what flips when the picks flip.

A round on a few dozen picks moves the model in two ways: toward what the picks ask for, and
in ways that come from training on these grids at all, whichever image was picked (random
picks move shapes down-right and turn them more vivid, on every loss the taste benchmark
measured). The first changes sign when every pick's best and worst are swapped; the second
does not. A mirrored round trains two twin adapters from the same start, with the same seed,
batches and noise draws: ``plus`` on the picks as made, ``minus`` on the same picks with best
and worst swapped (each twin continuing from its own last round), and the pipeline samples
from half their difference,

    ΔW = (ΔW_plus − ΔW_minus) / 2,

which is exactly the part of the adapter that is odd in the labels: what is common to
learning a taste and its opposite cancels. For LoRA twins (rank r, scale α/r) the difference
is itself a LoRA of rank 2r and the same α (``A = [A₊; A₋]``, ``B = [B₊, −B₋]``), so the
round's adapter saves, loads and exports as any other; the twins are kept beside it in
``mirror.safetensors`` so the next mirrored round continues them. A round costs twice the
training (sampling is unchanged). DoRA's magnitudes do not subtract, so it is not offered.

An **ensemble** round is the same machinery with K members on the same picks, each from its
own seed (its fresh starting weights, batches and noise draws), and the pipeline samples their
mean, ``ΔW = (ΔW_1 + … + ΔW_K) / K``: a LoRA of rank K·r and the same α. What one seed's
draws teach by chance averages out; what the picks share stays. The taste benchmark's win
rate counts the evaluation pairs a round improves, so an update that points the same way on
more of them wins, however far it goes (docs/benchmarks.md §5). A round costs K times the
training; the members are kept beside the adapter in ``ensemble.safetensors``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import DamagedAdapter, SettingsError
from .models import ADAPTER_NAME, add_lora, has_lora, lora_parameters, lora_settings_of, remove_lora
from .rounds import ProgressEvent, RoundResult, run_round
from .settings import LoraSettings

MIRROR_FILE = "mirror.safetensors"
ENSEMBLE_FILE = "ensemble.safetensors"
SIDES = ("plus", "minus")

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Members:
    """How a round of several adapters trains them and keeps their combination: each member's
    name, sign in the combination, whether it trains on the picks swapped, and the step its
    seed takes from the round's."""

    kind: str
    names: tuple[str, ...]
    signs: tuple[float, ...]
    flipped: tuple[bool, ...]
    seed_steps: tuple[int, ...]

    @property
    def file(self) -> str:
        return MIRROR_FILE if self.kind == "mirror" else ENSEMBLE_FILE


MIRROR = Members("mirror", SIDES, (1.0, -1.0), (False, True), (0, 0))


def ensemble(k: int) -> Members:
    """K members on the same picks, each from its own seed; their mean is kept."""
    return Members(
        "ensemble", tuple(f"m{i}" for i in range(k)), (1.0,) * k, (False,) * k, tuple(range(k))
    )


def members_of(config) -> Members | None:
    """The members a round's settings ask for; None for a round of one adapter."""
    if getattr(config, "mirror", False):
        return MIRROR
    k = getattr(config, "ensemble", 1)
    return ensemble(k) if k > 1 else None


def flipped(examples: list) -> list:
    """The same picks with each best and worst swapped."""
    return [dataclasses.replace(ex, best=ex.worst, worst=ex.best) for ex in examples]


def adapter_state(unet) -> State:
    """A copy of our adapter's weights (peft's names, without the adapter's)."""
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    return {k: v.detach().clone() for k, v in state.items()}


def put_adapter(unet, settings: LoraSettings, state: State | None, seed: int | None = None) -> None:
    """Make our adapter one of ``settings`` holding ``state`` (fresh weights, drawn from
    ``seed``, when None); add_lora replaces the adapter the UNet had."""
    add_lora(unet, settings, seed=seed)
    if state is not None:
        set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
        for param in lora_parameters(unet):
            param.data = param.data.float()


def combined(
    twins: dict[str, State], settings: LoraSettings, members: Members = MIRROR
) -> tuple[LoraSettings, State]:
    """The members' signed mean as one LoRA: rank K·r, their α and targets (the scale α/(K·r)
    is 1/K of each member's). For mirror twins that is half their difference."""
    states = [twins[name] for name in members.names]
    state: State = {}
    for key in states[0]:
        if "lora_A" in key:
            state[key] = torch.cat([m[key] for m in states], dim=0)
        elif "lora_B" in key:
            signed = [sign * m[key] for m, sign in zip(states, members.signs, strict=True)]
            state[key] = torch.cat(signed, dim=1)
        else:
            raise SettingsError(f"a {members.kind} round's adapter cannot hold {key}")
    return dataclasses.replace(settings, rank=len(states) * settings.rank), state


def write_twins(
    folder: Path, twins: dict[str, State], settings: LoraSettings, members: Members = MIRROR
) -> Path:
    """The members beside a round's adapter (safetensors), with their adapter settings."""
    tensors = {
        f"{name}.{k}": v.contiguous() for name in members.names for k, v in twins[name].items()
    }
    path = Path(folder) / members.file
    save_file(tensors, path, metadata={"lora": json.dumps(dataclasses.asdict(settings))})
    return path


def read_twins(
    folder: Path, members: Members = MIRROR
) -> tuple[dict[str, State], LoraSettings] | None:
    """A round's members and their adapter settings; None for a round without them."""
    path = Path(folder) / members.file
    if not path.is_file():
        return None
    twins: dict[str, State] = {}
    try:  # one read of the file: its tensors and the settings in its metadata
        with safe_open(path, "pt") as f:
            settings = LoraSettings(**json.loads(f.metadata()["lora"]))
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                name, _, weight = key.partition(".")
                twins.setdefault(name, {})[weight] = f.get_tensor(key)
    except Exception as exc:
        raise DamagedAdapter(
            f"the {members.kind} round's adapters {path} cannot be read ({str(exc)[:100]}): "
            f"the round's adapter still samples, but a {members.kind} round cannot continue it; "
            f"train without {members.kind}, or activate the base model to start "
            f"{members.kind} rounds anew"
        ) from None
    if set(twins) != set(members.names):
        raise SettingsError(
            f"the active round kept {len(twins)} {members.kind} adapters and this round asks "
            f"for {len(members.names)}: train with {len(twins)}, or activate the base model "
            f"to start anew"
        )
    return twins, settings


def run_members(
    pipe,
    make_objective: Callable[[list, object], object],
    examples: list,
    config,
    start: tuple[dict[str, State], LoraSettings] | None,
    members: Members,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accelerator=None,
) -> tuple[RoundResult, dict[str, State], LoraSettings]:
    """Train each member on the picks (or on their mirror image) with its own settings'
    seed, then put their signed mean in the pipeline; (the round's result, the members, the
    members' adapter settings). ``make_objective(picks, config)`` builds a member's loss.

    ``start`` is the active round's members (None: each starts from fresh weights drawn from
    its seed). A failed or cancelled round leaves the pipeline's adapter as it was.
    """
    unet = pipe.unet
    kind = members.kind
    if start is None and has_lora(unet):
        raise SettingsError(
            f"a {kind} round continues the base model or a {kind} round, and the active "
            f"round was not one: activate the base model, or train without {kind}"
        )
    settings = start[1] if start is not None else config.lora
    if settings.dora:
        raise SettingsError(f"{kind} needs a plain LoRA: DoRA's magnitudes do not combine")
    before = (lora_settings_of(unet), adapter_state(unet)) if has_lora(unet) else None
    twins: dict[str, State] = {}
    results: list[RoundResult] = []
    k = len(members.names)
    try:
        for i, name in enumerate(members.names):
            own = dataclasses.replace(config, seed=config.seed + members.seed_steps[i])
            picks = flipped(examples) if members.flipped[i] else examples
            # a member starts from its last round's weights, or fresh ones drawn from its seed
            put_adapter(unet, settings, start[0][name] if start else None, seed=own.seed)
            results.append(
                run_round(
                    pipe,
                    make_objective(picks, own),
                    on_progress=_part(on_progress, i, k),
                    should_cancel=should_cancel,
                    accelerator=accelerator,
                )
            )
            twins[name] = adapter_state(unet)
        put_adapter(unet, *combined(twins, settings, members))
    except BaseException:
        if before is None:
            remove_lora(unet)
        else:
            put_adapter(unet, *before)
        raise
    first, *others = results
    metrics = {**first.metrics, "seconds": sum(r.metrics["seconds"] for r in results)}
    if kind == "mirror":
        metrics["mirror_loss"] = others[0].metrics["loss"]
        metrics["mirror_accuracy"] = others[0].metrics.get("accuracy")
        # the loss and accuracy are the twin's on the picks as made; how far the round moved
        # from the reference (what the KL warning reads) is both twins' mean, each its own
        if "kl" in first.metrics:
            metrics["mirror_kl"] = others[0].metrics["kl"]
            metrics["kl"] = (first.metrics["kl"] + others[0].metrics["kl"]) / 2
    else:
        metrics["ensemble_losses"] = [r.metrics["loss"] for r in results]
        # the round's figures (its loss, accuracy, KL: what the KL warning reads) are the
        # members' mean, not the first member's; memory is the most any member took
        for key, value in first.metrics.items():
            if key == "peak_memory_mb":
                metrics[key] = max(r.metrics[key] for r in results)
            elif key != "seconds" and isinstance(value, float):
                metrics[key] = sum(r.metrics[key] for r in results) / k
    return RoundResult(metrics=metrics, history=first.history), twins, settings


def _part(on_progress, i: int, k: int):
    """Progress of member i as the i-th of k parts of the round's (its estimate of time left
    counts the later members' steps too)."""
    if on_progress is None:
        return None

    def tell(event: ProgressEvent) -> None:
        left = event.total - event.step
        per_step = event.eta_s / left if left > 0 else 0.0
        eta = per_step * (left + event.total * (k - 1 - i))
        step = event.step + event.total * i
        on_progress(dataclasses.replace(event, step=step, total=k * event.total, eta_s=eta))

    return tell
