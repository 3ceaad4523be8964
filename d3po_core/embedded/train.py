"""Train the embedded text-to-image model on the shapes world (see README.md here).

    python -m d3po_core.embedded.train --out DIR [--seed 0] [--device cpu|cuda] [--steps N]

Phases, each resumable: render the dataset; train an 8x AutoencoderKL (64 px -> 8x8x4); cache
latents; train a tiny CLIPTextModel jointly with a UNet2DConditionModel (epsilon objective,
10 % empty captions for classifier-free guidance, EMA weights); export a StableDiffusionPipeline
folder (DDIM scheduler, safetensors) into DIR. Work files and checkpoints live in DIR/_work;
re-running the same command resumes where it stopped. ``--eval-only`` scores a saved folder.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import functools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..models import assemble_pipeline
from . import world
from .checker import ATTRIBUTES, evaluate, read_image
from .tokenizer import check_tokenizer, make_tokenizer, save_tokenizer

ATTRS = ("kind", "colour", "size", "background", "placement")
CHOICES = {
    "kind": list(world.KINDS),
    "colour": list(world.COLOURS),
    "size": list(world.SIZES),
    "background": list(world.BACKGROUNDS),
    "placement": list(world.PLACEMENTS),
}


@dataclass
class Config:
    """Everything that determines the trained weights."""

    seed: int = 0
    images: int = 30_000
    vae_steps: int = 1_500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 9_000
    batch: int = 32
    lr: float = 5e-4
    warmup: int = 300
    ema_decay: float = 0.999
    drop: float = 0.4
    drop_kind: float = 0.15
    cfg_drop: float = 0.1
    max_length: int = 32
    text_hidden: int = 96
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (64, 96)
    # refinement: continue from the main phase with a loss that weighs the shape's own latent
    # pixels more (shape colour is a small part of the image) and Min-SNR timestep weights
    refine_steps: int = 6_000
    refine_lr: float = 3e-4
    shape_weight: float = 4.0
    min_snr_gamma: float = 5.0


def log(msg: str) -> None:
    """Print a timestamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- models


def make_vae() -> AutoencoderKL:
    """An AutoencoderKL with 8x downsampling and 4 latent channels (~1 M parameters)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        sample_size=world.IMAGE_SIZE,
        down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[16, 16, 32, 64],
        layers_per_block=1,
        norm_num_groups=8,
    )


def make_text_encoder(cfg: Config, vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    """A tiny CLIP text encoder whose special ids match the tokenizer."""
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.text_hidden,
            intermediate_size=4 * cfg.text_hidden,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=4,
            projection_dim=cfg.text_hidden,
            max_position_embeddings=cfg.max_length,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def make_unet(cfg: Config) -> UNet2DConditionModel:
    """A small UNet on 8x8x4 latents with cross-attention to the text encoder."""
    n = len(cfg.unet_channels)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=cfg.unet_channels,
        down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=4,
        norm_num_groups=16,
    )


def make_noise_scheduler() -> DDPMScheduler:
    """The training noise schedule (DDPM linear betas, epsilon prediction)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=False,
    )


# ----------------------------------------------------------------------------- checkpoints


def _atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory through ``write(tmp)`` and swap it in atomically."""
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _existing(final: Path) -> Path | None:
    for p in (final, final.with_name(final.name + ".old")):
        if (p / "state.json").exists():
            return p
    return None


def save_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    state: dict,
) -> None:
    """Save modules, optimizer, RNG and a JSON state, all as safetensors/JSON (no pickle)."""

    def write(tmp: Path) -> None:
        for name, mod in modules.items():
            save_file(
                {k: v.contiguous() for k, v in mod.state_dict().items()},
                tmp / f"{name}.safetensors",
            )
        sd = opt.state_dict()
        tensors = {f"{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
        tensors["rng"] = gen.get_state()
        save_file(tensors, tmp / "optim.safetensors")
        groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
        (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups}))

    _atomic_dir(path, write)


def load_checkpoint(
    path: Path,
    modules: dict[str, torch.nn.Module],
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
) -> dict | None:
    """Restore what :func:`save_checkpoint` wrote; ``None`` when there is no checkpoint."""
    found = _existing(path)
    if found is None:
        return None
    for name, mod in modules.items():
        mod.load_state_dict(load_file(found / f"{name}.safetensors"))
    tensors = load_file(found / "optim.safetensors")
    gen.set_state(tensors.pop("rng"))
    state = json.loads((found / "state.json").read_text())
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        i, k = key.split(".", 1)
        per_param.setdefault(int(i), {})[k] = value
    sd = opt.state_dict()
    for group, saved in zip(sd["param_groups"], state.pop("param_groups"), strict=True):
        group.update(saved)
    opt.load_state_dict({"state": per_param, "param_groups": sd["param_groups"]})
    return state


# ----------------------------------------------------------------------------- phases


def build_data(cfg: Config, work: Path) -> tuple[np.ndarray, np.ndarray]:
    """Render (or load) the dataset: uint8 images (N, 64, 64, 3) and attribute indices (N, 5)."""
    path = work / "data.npz"
    if path.exists():
        with np.load(path) as d:
            return d["images"], d["attrs"]
    t0 = time.time()
    images, scenes = world.make_dataset(cfg.images, cfg.seed)
    attrs = np.asarray(
        [[CHOICES[a].index(getattr(s, a)) for a in ATTRS] for s in scenes], dtype=np.int64
    )
    tmp = work / "data.tmp.npz"
    with open(tmp, "wb") as f:
        np.savez(f, images=images, attrs=attrs)
    os.replace(tmp, path)
    log(f"rendered {cfg.images} images in {time.time() - t0:.0f}s")
    return images, attrs


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_vae(
    cfg: Config, images: np.ndarray, work: Path, device: str
) -> tuple[AutoencoderKL, float]:
    """Train (or resume) the autoencoder (MSE plus a tiny KL); returns it and its seconds."""
    torch.manual_seed(cfg.seed)
    vae = make_vae().to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    ckpt = work / "vae"
    state = load_checkpoint(ckpt, {"vae": vae}, opt, gen) or {"step": 0}
    step, t0, t_last, done_last = state["step"], time.time(), time.time(), state["step"]
    if 0 < step < cfg.vae_steps:
        log(f"resumed vae at step {step}")
    every = max(1, min(500, cfg.vae_steps // 10))
    while step < cfg.vae_steps:
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=gen)
        x = _to_tensor(images[idx.numpy()]).to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        loss = mse + cfg.kl_weight * post.kl().mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg.vae_steps, cfg.vae_lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % every == 0 or step == cfg.vae_steps:
            rate = (step - done_last) / (time.time() - t_last)
            log(f"vae step {step}/{cfg.vae_steps} mse {mse.item():.4f} {rate:.2f} steps/s")
            t_last, done_last = time.time(), step
            seconds = state.get("seconds", 0.0) + time.time() - t0
            save_checkpoint(ckpt, {"vae": vae}, opt, gen, {"step": step, "seconds": seconds})
    state = json.loads(((_existing(ckpt) or ckpt) / "state.json").read_text())
    log(f"vae done ({state.get('seconds', 0):.0f}s of training)")
    return vae.eval().requires_grad_(False), state.get("seconds", 0.0)


@torch.no_grad()
def vae_report(
    vae: AutoencoderKL, images: np.ndarray, device: str, n: int = 200
) -> dict[str, float]:
    """Reconstruction MSE of ``n`` images and the checker's accuracy on the reconstructions."""
    x = _to_tensor(images[-n:]).to(device)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    pixels = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    truth = [read_image(im) for im in images[-n:]]
    got = [read_image(im) for im in pixels]
    report = {
        f"checker_{a}": float(
            np.mean([getattr(t, a) == getattr(g, a) for t, g in zip(truth, got, strict=True)])
        )
        for a in ATTRIBUTES
    }
    return {"mse": F.mse_loss(recon, x).item(), **report}


@torch.no_grad()
def cache_latents(
    vae: AutoencoderKL, images: np.ndarray, work: Path, device: str
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Encode every image once: posterior mean and std, and the latent scaling factor."""
    path = work / "latents.safetensors"
    if not path.exists():
        means, stds = [], []
        for start in range(0, len(images), 256):
            post = vae.encode(_to_tensor(images[start : start + 256]).to(device)).latent_dist
            means.append(post.mean.cpu())
            stds.append(post.std.cpu())
        mean, std = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
        scale = torch.tensor(1.0 / mean.std().item())
        tmp = work / "latents.tmp.safetensors"
        save_file({"mean": mean, "std": std, "scale": scale}, tmp)
        os.replace(tmp, path)
    t = load_file(path)
    log(f"latents {tuple(t['mean'].shape)}, scaling_factor {t['scale'].item():.4f}")
    return t["mean"], t["std"], float(t["scale"])


def _captions(attrs: np.ndarray, cfg: Config, gen: torch.Generator) -> list[str]:
    """Training captions with attribute dropout and empty captions for guidance."""
    u = torch.rand(len(attrs), 6, generator=gen).numpy()
    out = []
    for row, (cfg_u, *keep) in zip(attrs, u, strict=True):
        if cfg_u < cfg.cfg_drop:
            out.append("")
            continue
        names = {a: CHOICES[a][i] for a, i in zip(ATTRS, row, strict=True)}
        probs = [cfg.drop_kind] + [cfg.drop] * 4
        kept = {a: names[a] if k >= p else None for a, k, p in zip(ATTRS, keep, probs, strict=True)}
        out.append(world.compose_caption(**kept))
    return out


def _batch(
    cfg: Config,
    latents: tuple[torch.Tensor, torch.Tensor, float],
    attrs: np.ndarray,
    tok: CLIPTokenizer,
    alphas: torch.Tensor,
    gen: torch.Generator,
    device: str,
) -> tuple[torch.Tensor, ...]:
    """One training batch: indices, noisy latents, timesteps, the noise and caption ids."""
    mean, std, scale = latents
    idx = torch.randint(len(mean), (cfg.batch,), generator=gen)
    eps_z = torch.randn(mean[idx].shape, generator=gen)
    z0 = ((mean[idx] + std[idx] * eps_z) * scale).to(device)
    noise = torch.randn(z0.shape, generator=gen).to(device)
    t = torch.randint(0, 1000, (cfg.batch,), generator=gen).to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
    ids = tok(
        _captions(attrs[idx.numpy()], cfg, gen),
        padding="max_length",
        max_length=cfg.max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return idx, zt, t, noise, ids.to(device)


def shape_coverage(images: np.ndarray, attrs: np.ndarray, factor: int = 8) -> torch.Tensor:
    """Fraction of each latent pixel's ``factor``x``factor`` patch covered by the shape.

    The shape is every pixel that differs from the image's (known) background colour.
    Returns float32 (N, 1, 64/factor, 64/factor).
    """
    backgrounds = np.asarray([world.BACKGROUNDS[b] for b in CHOICES["background"]], np.int16)
    out = []
    for start in range(0, len(images), 1024):
        img = images[start : start + 1024].astype(np.int16)
        bg = backgrounds[attrs[start : start + 1024, ATTRS.index("background")]]
        mask = (np.abs(img - bg[:, None, None, :]).max(axis=-1) > 8).astype(np.float32)
        n, h, w = mask.shape
        pooled = mask.reshape(n, h // factor, factor, w // factor, factor).mean(axis=(2, 4))
        out.append(torch.from_numpy(pooled[:, None]))
    return torch.cat(out)


@dataclass
class _Phase:
    """What every UNet training phase reads and where it writes."""

    latents: tuple[torch.Tensor, torch.Tensor, float]
    attrs: np.ndarray
    tok: CLIPTokenizer
    merges: list[tuple[str, str]]
    vae: AutoencoderKL
    work: Path
    device: str
    snapshot_every: int
    eval_n: int


def _models(cfg: Config, tok: CLIPTokenizer, device: str) -> dict[str, torch.nn.Module]:
    """Text encoder and UNet (created in that order) and their EMA copies."""
    te = make_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id).to(device)
    unet = make_unet(cfg).to(device)
    return {
        "unet": unet,
        "text_encoder": te,
        "ema_unet": copy.deepcopy(unet).requires_grad_(False),
        "ema_text_encoder": copy.deepcopy(te).requires_grad_(False),
    }


def _run_phase(
    label: str,
    cfg: Config,
    mods: dict[str, torch.nn.Module],
    gen: torch.Generator,
    ctx: _Phase,
    *,
    total: int,
    lr: float,
    loss_of: Callable[..., torch.Tensor],
    ema_decay: Callable[[int], float],
) -> tuple[UNet2DConditionModel, CLIPTextModel, float]:
    """Train (or resume, from ``ctx.work/label``) text encoder + UNet for ``total`` steps.

    ``loss_of(prediction, noise, idx, t)`` gives the batch loss; AdamW at ``lr`` with warmup
    and cosine decay, gradient clipping, EMA with ``ema_decay(step)``, checkpoints, progress
    lines and scored EMA snapshots. Returns the EMA copies and the phase's seconds.
    """
    latents, attrs, tok, work, device = ctx.latents, ctx.attrs, ctx.tok, ctx.work, ctx.device
    unet, te = mods["unet"], mods["text_encoder"]
    ema_unet, ema_te = mods["ema_unet"], mods["ema_text_encoder"]
    params = [*unet.parameters(), *te.parameters()]
    ema_params = [*ema_unet.parameters(), *ema_te.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ckpt = work / label
    state = load_checkpoint(ckpt, mods, opt, gen) or {"step": 0}
    step, t0 = state["step"], time.time()
    if 0 < step < total:
        log(f"resumed {label} at step {step}")
    alphas = make_noise_scheduler().alphas_cumprod.to(device)
    t_last, done_last, losses = time.time(), step, []
    every = max(1, min(200, total // 20))
    while step < total:
        idx, zt, t, noise, ids = _batch(cfg, latents, attrs, tok, alphas, gen, device)
        loss = loss_of(unet(zt, t, te(ids)[0]).sample, noise, idx, t)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, total, lr, cfg.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_decay(step))
        losses.append(loss.item())
        if step % every == 0 or step == total:
            rate = (step - done_last) / (time.time() - t_last)
            eta = (total - step) / max(rate, 1e-9) / 60
            log(
                f"{label} step {step}/{total} loss {np.mean(losses):.4f} {rate:.2f} steps/s "
                f"eta {eta:.0f} min"
            )
            t_last, done_last, losses = time.time(), step, []
            seconds = state.get("seconds", 0.0) + time.time() - t0
            save_checkpoint(ckpt, mods, opt, gen, {"step": step, "seconds": seconds})
        if ctx.snapshot_every and step % ctx.snapshot_every == 0 and step < total:
            snap = work / "snapshot"
            export(snap, ctx.vae, ema_te, tok, ctx.merges, ema_unet, latents[2], {label: step})
            if ctx.eval_n:
                t_eval = time.time()
                result = run_eval(snap, ctx.eval_n, device)
                took = time.time() - t_eval
                log(f"eval at {label} step {step}: {json.dumps(result)} ({took:.0f}s)")
            t_last = time.time()
    state = json.loads(((_existing(ckpt) or ckpt) / "state.json").read_text())
    log(f"{label} done ({state.get('seconds', 0):.0f}s of training)")
    return ema_unet.eval(), ema_te.eval(), state.get("seconds", 0.0)


def train_unet(cfg: Config, ctx: _Phase) -> tuple[UNet2DConditionModel, CLIPTextModel, float]:
    """Train (or resume) text encoder + UNet on the plain epsilon loss; EMA copies, seconds."""
    torch.manual_seed(cfg.seed + 2)
    mods = _models(cfg, ctx.tok, ctx.device)

    def loss_of(prediction, noise, _idx, _t):
        return F.mse_loss(prediction, noise)

    return _run_phase(
        "unet",
        cfg,
        mods,
        torch.Generator().manual_seed(cfg.seed + 3),
        ctx,
        total=cfg.steps,
        lr=cfg.lr,
        loss_of=loss_of,
        ema_decay=lambda step: min(cfg.ema_decay, (1 + step) / (10 + step)),
    )


def refine_unet(
    cfg: Config, ctx: _Phase, images: np.ndarray
) -> tuple[UNet2DConditionModel, CLIPTextModel, float]:
    """Continue the main phase: shape-weighted, Min-SNR-weighted epsilon loss (resumable).

    Starts from the main phase's final weights and EMA; a fresh optimizer, its own seeded
    generator and a warmup-then-cosine schedule at ``refine_lr``. Returns the EMA copies.
    """
    device = ctx.device
    mods = _models(cfg, ctx.tok, device)
    main = _existing(ctx.work / "unet")
    if main is None:
        raise RuntimeError("the main phase has no checkpoint to refine")
    for name, mod in mods.items():
        mod.load_state_dict(load_file(main / f"{name}.safetensors"))
    alphas = make_noise_scheduler().alphas_cumprod.to(device)
    snr = alphas / (1 - alphas)
    snr_weight = torch.clamp(snr, max=cfg.min_snr_gamma) / snr

    @functools.cache  # on the first step: a finished phase never computes it
    def coverage() -> torch.Tensor:
        return shape_coverage(images, ctx.attrs).to(device)

    def loss_of(prediction, noise, idx, t):
        weight = 1.0 + cfg.shape_weight * coverage()[idx.to(device)]
        weight = weight * snr_weight[t].view(-1, 1, 1, 1)
        return (weight * (prediction - noise).pow(2)).mean()

    return _run_phase(
        "refine",
        cfg,
        mods,
        torch.Generator().manual_seed(cfg.seed + 4),
        ctx,
        total=cfg.refine_steps,
        lr=cfg.refine_lr,
        loss_of=loss_of,
        ema_decay=lambda _step: cfg.ema_decay,
    )


def export(
    folder: Path,
    vae: AutoencoderKL,
    te: CLIPTextModel,
    tok: CLIPTokenizer,
    merges: list[tuple[str, str]],
    unet: UNet2DConditionModel,
    scale: float,
    info: dict,
) -> None:
    """Write a StableDiffusionPipeline folder (DDIM scheduler, safetensors) atomically."""
    vae.register_to_config(scaling_factor=scale)
    scheduler = DDIMScheduler.from_config(
        make_noise_scheduler().config, set_alpha_to_one=False, steps_offset=1
    )
    pipe = assemble_pipeline(
        vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler
    )

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, merges, tmp / "tokenizer")
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2))
        # sampling settings the studio and CLI use by default (sharpest at guidance 2)
        (tmp / "d3po_defaults.json").write_text(json.dumps({"guidance": 2.0}))
        check_tokenizer(
            tmp / "tokenizer", world.WORDS, te.config.bos_token_id, te.config.eos_token_id
        )

    _atomic_dir(folder, write)


def run_eval(folder: Path, n: int, device: str, guidance_scale: float = 2.0) -> dict[str, float]:
    """Load a saved folder with diffusers and score it with the checker."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True).to(device)
    return {"guidance_scale": guidance_scale, **evaluate(pipe, n=n, guidance_scale=guidance_scale)}


def _publish(model_dir: Path, out: Path) -> None:
    """Move the exported folder's entries into ``out`` (keeping ``out/_work``)."""
    for entry in model_dir.iterdir():
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    shutil.rmtree(model_dir)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=Config.steps, help="UNet steps")
    p.add_argument(
        "--refine-steps", type=int, default=Config.refine_steps, help="refinement steps (0 = none)"
    )
    p.add_argument("--vae-steps", type=int, default=Config.vae_steps)
    p.add_argument("--images", type=int, default=Config.images)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=2000,
        help="export (and score) an EMA snapshot into _work/snapshot every N steps",
    )
    p.add_argument("--eval-n", type=int, default=200, help="checker samples (0 = no scoring)")
    p.add_argument("--eval-only", action="store_true", help="score the folder at --out and exit")
    p.add_argument("--guidance", type=float, default=2.0, help="guidance scale for scoring")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eval_only:
        print(json.dumps(run_eval(args.out, args.eval_n, args.device, args.guidance), indent=2))
        return
    cfg = Config(
        seed=args.seed,
        steps=args.steps,
        refine_steps=args.refine_steps,
        vae_steps=args.vae_steps,
        images=args.images,
    )
    out, work = args.out, args.out / "_work"
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / "lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"another training run is using {work}")
    cfg_path = work / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(
        json.dumps(asdict(cfg))
    ):
        sys.exit(f"{work} was started with another configuration ({cfg_path}); use a new --out")
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    log(f"config {asdict(cfg)}")
    images, attrs = build_data(cfg, work)
    vae, vae_seconds = train_vae(cfg, images, work, args.device)
    report = vae_report(vae, images, args.device)
    log(f"vae reconstructions: {json.dumps(report)}")
    latents = cache_latents(vae, images, work, args.device)
    tok, merges = make_tokenizer(world.WORDS, cfg.max_length)
    ctx = _Phase(
        latents, attrs, tok, merges, vae, work, args.device, args.snapshot_every, args.eval_n // 2
    )
    unet, te, unet_seconds = train_unet(cfg, ctx)
    if cfg.refine_steps:
        unet, te, refine_seconds = refine_unet(cfg, ctx, images)
        unet_seconds += refine_seconds
    command = " ".join(
        ["python -m d3po_core.embedded.train", *(sys.argv[1:] if argv is None else argv)]
    )
    info = {
        "config": asdict(cfg),
        "command": command,
        "torch": torch.__version__,
        "vae_seconds": round(vae_seconds),
        "unet_seconds": round(unet_seconds),
        "vae_reconstruction": report,
    }
    export(work / "final", vae, te, tok, merges, unet, latents[2], info)
    if args.eval_n:
        info["checker"] = run_eval(work / "final", args.eval_n, args.device, args.guidance)
        (work / "final" / "training_info.json").write_text(json.dumps(info, indent=2))
        log(f"checker: {json.dumps(info['checker'])}")
    _publish(work / "final", out)
    log(f"done: {out} ({time.time() - t0:.0f}s this run)")


if __name__ == "__main__":
    main()
