"""Export: the adapter for diffusers/peft and for A1111/ComfyUI (kohya), the picks as tables.

Kohya form: ``diffusers.utils.convert_state_dict_to_kohya`` on the peft state dict gives keys
without the ``lora_unet_`` prefix; with the prefix added, A1111/ComfyUI load the file, and so
does diffusers' ``load_lora_weights``, reproducing the images exactly. SDXL's modules are
named by its original block layout first (``input_blocks.4.1…``), as SDXL LoRA files are.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pandas as pd
import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SessionError, SettingsError
from .families import family_of_unet
from .models import ADAPTER_NAME, LORA_WEIGHT_NAME, lora_settings_of
from .session import Session
from .session.files import readable


def _folder(path: Path) -> Path:
    """``path`` as a folder to write into, created if new; one line when it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SessionError(
            f"cannot create the export folder {path} ({exc.strerror}); pass a folder you can "
            "write to"
        ) from None
    return path


def _replace_atomically(write, target: Path) -> Path:
    _folder(target.parent)
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    readable(tmp)
    os.replace(tmp, target)
    return target


def _check_strength(strength: float) -> float:
    if not (math.isfinite(strength) and strength >= 0):
        raise SettingsError(f"an adapter strength is a number ≥ 0, not {strength}")
    return float(strength)


def export_diffusers(
    session: Session, round_id: int, out_dir: str | Path, *, strength: float = 1.0
) -> Path:
    """Copy a round's adapter folder (diffusers LoRA format) to ``out_dir``; at another
    ``strength`` than 1 its ``lora_B`` weights are scaled by it, so that the file loaded at
    weight 1 draws what the adapter at that strength draws (for LoRA, tested; DoRA's norm is
    taken of the same scaled product in peft)."""
    strength = _check_strength(strength)
    src = session.round_path(round_id)
    out = _folder(Path(out_dir))
    if (src / "lora_settings.json").is_file():
        readable(shutil.copy2(src / "lora_settings.json", out / "lora_settings.json"))
    weights, target = src / LORA_WEIGHT_NAME, out / LORA_WEIGHT_NAME
    if not weights.is_file():
        return target
    if strength == 1:
        readable(shutil.copy2(weights, target))
        return target
    # read once, tensors and metadata, and written scaled: never a half-written file
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata() or {}
        state = {key: _at_strength(key, f.get_tensor(key), strength) for key in f.keys()}  # noqa: SIM118
    return _replace_atomically(lambda tmp: save_file(state, str(tmp), metadata=metadata), target)


#: how an adapter's up (B) weights are named: peft's, diffusers' files', kohya's
_UP = ("lora_B.", "lora.up.", "lora_up.")


def _at_strength(key: str, value: torch.Tensor, strength: float) -> torch.Tensor:
    """An adapter tensor with its up (B) weights scaled by ``strength``: BA becomes s·BA."""
    up = any(marker in key for marker in _UP)
    return (value * strength).contiguous() if up and strength != 1 else value


def kohya_state_dict(unet: torch.nn.Module, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The UNet's adapter in kohya naming: ``lora_unet_<module>.lora_down/lora_up/alpha``,
    its up weights scaled by ``strength``."""
    strength = _check_strength(strength)
    settings = lora_settings_of(unet)
    if settings.dora:  # diffusers drops a kohya file's dora_scale: other images, no error
        raise SettingsError(
            "a DoRA adapter has no kohya form that loads back with the same images; export "
            "it in diffusers format instead"
        )
    family = family_of_unet(unet)
    peft_state = {
        family.kohya_module(key, unet.config): value
        for key, value in get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME).items()
    }
    kohya = convert_state_dict_to_kohya(peft_state)
    out = {}
    for key, value in kohya.items():
        name = key if key.startswith("lora_unet_") else f"lora_unet_{key}"
        out[name] = _at_strength(name, value.detach().float().contiguous(), strength)
    for key in [k for k in out if k.endswith(".lora_down.weight")]:
        alpha_key = key.removesuffix(".lora_down.weight") + ".alpha"
        out.setdefault(alpha_key, torch.tensor(float(settings.alpha)))
    return out


def export_kohya(
    unet: torch.nn.Module, out_file: str | Path, *, base_model: str = "", strength: float = 1.0
) -> Path:
    """Write the UNet's active adapter as one kohya-format safetensors file, at ``strength``
    (loaded at weight 1, it draws what the adapter at that strength draws)."""
    state = kohya_state_dict(unet, strength)
    settings = lora_settings_of(unet)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_base_model": base_model,
        "d3po_targets": json.dumps(settings.targets),
        "d3po_strength": f"{strength:g}",
    }
    return _replace_atomically(
        lambda tmp: save_file(state, str(tmp), metadata=metadata), Path(out_file)
    )


def picks_table(session: Session) -> pd.DataFrame:
    """One row a live pick: prompt, image paths, best, worst, labeler, sampled/trained round."""
    picks = session.picks_df()
    if picks.empty:
        return pd.DataFrame(
            columns=[
                "pick_id",
                "grid_id",
                "prompt",
                "images",
                "best",
                "worst",
                "best_image",
                "worst_image",
                "kind",
                "labeler",
                "sampled_round",
                "trained_round",
                "created",
            ]
        )
    rounds = session.rounds_df()
    bounds = sorted(zip(rounds["last_pick_id"], rounds["id"], strict=True)) if len(rounds) else []
    rows = []
    for pick in picks.itertuples():
        grid = session.grid(int(pick.grid_id))
        paths = [str(Path(p).relative_to(session.root)) for p in grid["image_paths"]]
        best = None if pd.isna(pick.best) else int(pick.best)
        worst = None if pd.isna(pick.worst) else int(pick.worst)
        trained = next((int(r) for last, r in bounds if pick.id <= last), None)
        rows.append(
            {
                "pick_id": int(pick.id),
                "grid_id": int(pick.grid_id),
                "prompt": grid["prompt"],
                "images": paths,
                "best": best,
                "worst": worst,
                "best_image": paths[best] if best is not None else None,
                "worst_image": paths[worst] if worst is not None else None,
                "kind": pick.kind,
                "labeler": pick.labeler,
                "sampled_round": grid["adapter_round"],
                "trained_round": trained,
                "created": pick.created.isoformat(),
            }
        )
    table = pd.DataFrame(rows)
    for col in ("best", "worst", "sampled_round", "trained_round"):
        table[col] = table[col].astype("Int64")
    return table


def export_picks(session: Session, out_file: str | Path) -> Path:
    """Write the picks as parquet (``.parquet``) or JSON lines (``.jsonl``)."""
    out = Path(out_file)
    table = picks_table(session)
    if out.suffix == ".parquet":
        return _replace_atomically(lambda tmp: table.to_parquet(tmp, index=False), out)
    if out.suffix == ".jsonl":
        return _replace_atomically(
            lambda tmp: table.to_json(tmp, orient="records", lines=True), out
        )
    raise SettingsError(f"picks export must end in .parquet or .jsonl, not {out.name!r}")
