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
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
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
SIDES = ("plus", "minus")

State = dict[str, torch.Tensor]


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


def combined(twins: dict[str, State], settings: LoraSettings) -> tuple[LoraSettings, State]:
    """Half the twins' difference as one LoRA: rank 2r, the twins' α and targets."""
    plus, minus = twins["plus"], twins["minus"]
    state: State = {}
    for key, a in plus.items():
        if "lora_A" in key:
            state[key] = torch.cat([a, minus[key]], dim=0)
        elif "lora_B" in key:
            state[key] = torch.cat([a, -minus[key]], dim=1)
        else:
            raise SettingsError(f"a mirrored adapter cannot hold {key}")
    return dataclasses.replace(settings, rank=2 * settings.rank), state


def write_twins(folder: Path, twins: dict[str, State], settings: LoraSettings) -> Path:
    """The twins beside a round's adapter (safetensors), with their adapter settings."""
    tensors = {f"{side}.{k}": v.contiguous() for side in SIDES for k, v in twins[side].items()}
    path = Path(folder) / MIRROR_FILE
    save_file(tensors, path, metadata={"lora": json.dumps(dataclasses.asdict(settings))})
    return path


def read_twins(folder: Path) -> tuple[dict[str, State], LoraSettings] | None:
    """A round's twins and their adapter settings; None for a round that was not mirrored."""
    path = Path(folder) / MIRROR_FILE
    if not path.is_file():
        return None
    twins: dict[str, State] = {side: {} for side in SIDES}
    try:  # one read of the file: its tensors and the settings in its metadata
        with safe_open(path, "pt") as f:
            settings = LoraSettings(**json.loads(f.metadata()["lora"]))
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                side, _, name = key.partition(".")
                if side in twins:
                    twins[side][name] = f.get_tensor(key)
    except Exception as exc:
        raise DamagedAdapter(
            f"the mirrored twins {path} cannot be read ({str(exc)[:100]}): the round's adapter "
            "still samples, but a mirrored round cannot continue it; train without mirror, or "
            "activate the base model to start mirrored rounds anew"
        ) from None
    return twins, settings


def run_mirrored(
    pipe,
    make_objective: Callable[[list], object],
    examples: list,
    config,
    start: tuple[dict[str, State], LoraSettings] | None,
    *,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accelerator=None,
) -> tuple[RoundResult, dict[str, State], LoraSettings]:
    """Train the twins on the picks and on their mirror image, then put half their difference
    in the pipeline; (the round's result, the twins, the twins' adapter settings).

    ``start`` is the active round's twins (None: both start from the same fresh adapter, drawn
    from the round's seed). A failed or cancelled round leaves the pipeline's adapter as it was.
    """
    unet = pipe.unet
    if start is None and has_lora(unet):
        raise SettingsError(
            "a mirrored round continues the base model or a mirrored round, and the active "
            "round was not mirrored: activate the base model, or train without mirror"
        )
    settings = start[1] if start is not None else config.lora
    if settings.dora:
        raise SettingsError("mirror needs a plain LoRA: DoRA's magnitudes do not subtract")
    before = (lora_settings_of(unet), adapter_state(unet)) if has_lora(unet) else None
    twins: dict[str, State] = {}
    results: list[RoundResult] = []
    try:
        for i, (side, picks) in enumerate(zip(SIDES, (examples, flipped(examples)), strict=True)):
            # both twins start alike: their last round's, or the same seeded fresh weights
            put_adapter(unet, settings, start[0][side] if start else None, seed=config.seed)
            results.append(
                run_round(
                    pipe,
                    make_objective(picks),
                    on_progress=_half(on_progress, i),
                    should_cancel=should_cancel,
                    accelerator=accelerator,
                )
            )
            twins[side] = adapter_state(unet)
        put_adapter(unet, *combined(twins, settings))
    except BaseException:
        if before is None:
            remove_lora(unet)
        else:
            put_adapter(unet, *before)
        raise
    plus, minus = results
    metrics = {
        **plus.metrics,
        "seconds": plus.metrics["seconds"] + minus.metrics["seconds"],
        "mirror_loss": minus.metrics["loss"],
        "mirror_accuracy": minus.metrics.get("accuracy"),
    }
    return RoundResult(metrics=metrics, history=plus.history), twins, settings


def _half(on_progress, i: int):
    """Progress of one twin as half of the round's (the first twin's estimate of time left
    counts the second's steps too)."""
    if on_progress is None:
        return None

    def tell(event: ProgressEvent) -> None:
        left = event.total - event.step
        per_step = event.eta_s / left if left > 0 else 0.0
        eta = per_step * (left + event.total * (1 - i))
        step = event.step + event.total * i
        on_progress(dataclasses.replace(event, step=step, total=2 * event.total, eta_s=eta))

    return tell
