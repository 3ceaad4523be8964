"""Tastes: does a round learn a person's taste? Scripted tastes and a random-picks control.

    python bench/tastes.py [--prompts open|named] [--seeds 3] [--part 1/2] [--report-only]
    python bench/tastes.py --device cuda --jobs 14    # a GPU: 14 processes share the runs

Each taste is a plain scorer ``(image, prompt) -> float`` (higher = preferred) on the embedded
model's 64x64 images: warmth of the shape's colour, contrast of shape and background,
placement toward the top-left, roundness of the shape and fine detail. A run labels 8 grids of
4 a round (20 steps, the model's recommended guidance, the D3PO defaults) with one taste's best
and worst, or with uniformly random best and worst (the control: "random"), for R rounds.
Before training and after each round every taste scores a fixed evaluation set (the 4 prompts
x 16 seeds, each image from its own seed) against the untuned model on the same noise, so a run
also shows the drift in the tastes its picks did not ask for.

The runs label and evaluate on prompts that leave every taste's attribute open ("a shape", "a
large shape", …: ``--prompts open``, the default) or on examples/prompts.txt (``--prompts
named``: "a circle", "a square", …, where the prompt decides some attributes). Runs are cached
as JSON in bench/results/tastes-open or bench/results/tastes (``--part i/k`` splits them over
processes; a re-run only reports). Writes docs/img/tastes-open.png (or tastes.png) and prints
the markdown tables of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import runs
from PIL import Image
from runs import CONTROL, EVAL, PROMPTS, prompts_of, random_labeler, spec

from d3po_core.models import base_model, default_model
from d3po_core.sampling import SampleSettings, sample_grid
from d3po_core.scorers import Scorer
from d3po_core.simulate import EvalSet, paired_win_rate

if TYPE_CHECKING:  # the runs need no pandas (a GPU machine may lack it); the report does
    import pandas as pd

# ---------------------------------------------------------------------------------------------
# Tastes: numpy/PIL only, robust on 64x64 samples (blurry edges, off-colour backgrounds).

_BORDER = 3  # px of the image's rim taken as background
_MIN_SHAPE_PX = 8


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.array([0.299, 0.587, 0.114])


def _background(rgb: np.ndarray) -> np.ndarray:
    """The background colour: the per-channel median of the image's rim."""
    b = _BORDER
    rim = np.concatenate(
        [rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3), rgb[:, :b].reshape(-1, 3)]
        + [rgb[:, -b:].reshape(-1, 3)]
    )
    return np.median(rim, axis=0)


def shape_mask(rgb: np.ndarray) -> np.ndarray:
    """Pixels of the shape: far from the background colour (half the largest distance, and at
    least 30 of 255 in RGB distance). Empty when nothing stands out."""
    dist = np.linalg.norm(rgb - _background(rgb), axis=-1)
    top = np.percentile(dist, 99)
    mask = dist > max(30.0, 0.5 * top)
    return mask if mask.sum() >= _MIN_SHAPE_PX else np.zeros_like(mask)


def warmth(image: Image.Image, prompt: str = "") -> float:
    """Colour: how warm (red/orange/yellow rather than blue) the shape is, mean (R − B)/255 over
    its pixels, in [−1, 1]; 0 for grey shapes (white, black) and for no shape."""
    rgb = _rgb(image)
    mask = shape_mask(rgb)
    if not mask.any():
        return 0.0
    shape = rgb[mask]
    return float((shape[:, 0] - shape[:, 2]).mean() / 255.0)


def contrast(image: Image.Image, prompt: str = "") -> float:
    """Brightness/contrast: |mean luma of the shape − luma of the background| / 255, in
    [0, 1]; 0 for no shape."""
    rgb = _rgb(image)
    mask = shape_mask(rgb)
    if not mask.any():
        return 0.0
    bg = float(_luma(_background(rgb)[None])[0])
    return float(abs(_luma(rgb[mask]).mean() - bg) / 255.0)


def top_left(image: Image.Image, prompt: str = "") -> float:
    """Composition: the shape's centre of mass toward the top-left corner, 1 − its distance
    from the corner / the image's diagonal (the centre scores 0.5); 0.5 for no shape."""
    rgb = _rgb(image)
    mask = shape_mask(rgb)
    h, w = mask.shape
    if not mask.any():
        return 0.5
    ys, xs = np.nonzero(mask)
    dist = np.hypot(xs.mean() + 0.5, ys.mean() + 0.5)
    return float(1.0 - dist / np.hypot(w, h))


def roundness(image: Image.Image, prompt: str = "") -> float:
    """Shape kind: overlap (IoU) of the shape with the disc of the same area at its centre of
    mass; on the world's clean renders 0.99 for a circle, 0.84 for a square, 0.69 for a
    triangle and 0.61 for a cross; 0 for no shape."""
    mask = shape_mask(_rgb(image))
    if not mask.any():
        return 0.0
    ys, xs = np.nonzero(mask)
    area = len(xs)
    cy, cx = ys.mean(), xs.mean()
    gy, gx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    disc = (gx - cx) ** 2 + (gy - cy) ** 2 <= area / np.pi
    inter = np.logical_and(mask, disc).sum()
    return float(inter / np.logical_or(mask, disc).sum())


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` shrunk by ``r`` px (a square structuring element; the rim counts as outside)."""
    padded = np.pad(mask, r, constant_values=False)
    h, w = mask.shape
    out = np.ones_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def detail(image: Image.Image, prompt: str = "") -> float:
    """Texture/detail: mean absolute 4-neighbour Laplacian of the luma, /255, away from the
    shape's outline (inside the shape and on the background, 3 px or more from the edge), so
    it measures specks, stripes and texture rather than the outline's contrast."""
    rgb = _rgb(image)
    y = _luma(rgb)
    lap = np.zeros_like(y)
    lap[1:-1, 1:-1] = 4 * y[1:-1, 1:-1] - y[:-2, 1:-1] - y[2:, 1:-1] - y[1:-1, :-2] - y[1:-1, 2:]
    mask = shape_mask(rgb)
    away = _erode(mask, 3) | _erode(~mask, 3)
    away[[0, -1], :] = away[:, [0, -1]] = False
    return float(np.abs(lap[away]).mean() / 255.0) if away.any() else 0.0


#: taste name -> (scorer, what a person with that taste prefers)
TASTES: dict[str, tuple[Scorer, str]] = {
    "warmth": (warmth, "warm shapes: (R − B)/255 of the shape"),
    "contrast": (contrast, "shape/background contrast: abs Δ luma / 255"),
    "top_left": (top_left, "shape toward the top-left: 1 − distance/diagonal"),
    "roundness": (roundness, "round shapes: IoU with the equal-area disc"),
    "detail": (detail, "texture: mean abs Laplacian / 255 off the outline"),
}


# ---------------------------------------------------------------------------------------------
# Runs

#: Prompts that name none of the attributes the tastes judge (a shape's kind, colour,
#: placement, background): the model is free to follow a taste on every one. Examples' prompts
#: ("a circle", "a square", …) ask for a kind or a background; on "a square" a tool should
#: keep drawing squares for a person who likes round shapes, so there roundness cannot win.
OPEN_PROMPTS = ["a shape", "a small shape", "a medium shape", "a large shape"]
#: --prompts NAME: the prompts a run labels and is evaluated on, and its results folder
PROMPT_SETS = {"open": (OPEN_PROMPTS, "tastes-open"), "named": (PROMPTS, "tastes")}


def eval_set(prompts: list[str]) -> EvalSet:
    """The evaluation set of runs on ``prompts``: its first 4, each on the 16 fixed seeds."""
    return EvalSet(prompts[:4], EVAL.seeds)


#: simulate() measures its labeler itself; the tastes are measured here on the eval set
#: instead, so its own evaluation is cut to one image (a random labeler has nothing to measure).
_SIM_EVAL = EvalSet(EVAL.prompts[:1], EVAL.seeds[:1])
_BASE_CACHE: dict[tuple, dict[str, list[float]]] = {}


_DDPO_ONE_PAIR = {"pairs": "best-worst", "noise_draws": 20}
_CONV_LORA = {"targets": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}
_BLOCK_LORA = {
    "targets": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    + ["proj_in", "proj_out"]
}
#: the adapter on the attention and on the resnets of the UNet's coarsest level only (4×4
#: latents on the embedded model), where a shape's place is decided; the finer level's resnets
#: keep the base's weights (texture was expected to live there: it learned less all the same)
_DEEP_CONV = ["down_blocks.1.resnets.0", "mid_block.resnets.0", "mid_block.resnets.1"]
_DEEP_CONV += ["up_blocks.0.resnets.0", "up_blocks.0.resnets.1"]
_DEEP_CONV_LORA = {
    "targets": ["to_q", "to_k", "to_v", "to_out.0"]
    + [f"{block}.{conv}" for block in _DEEP_CONV for conv in ("conv1", "conv2")]
}
_D3PO_CONV = {"replay": True, "lora": _CONV_LORA}
_DDPO_CONV = {"pairs": "implied", "noise_draws": 4, "replay": True, "lora": _CONV_LORA}
#: KTO's earlier defaults, stated so their runs stay true: β 2500 (until β 5000 won) and 2
#: epochs (until 3 won)
_KTO_2500 = {"replay": True, "beta": 2500.0, "epochs": 2}
_KTO_5000 = {"replay": True, "beta": 5000.0, "epochs": 2}
#: variant -> (method, config overrides): the candidates measured for the defaults
VARIANTS: dict[str, tuple[str, dict]] = {
    "d3po": ("d3po", {"replay": False}),
    "implied": ("d3po", {"pairs": "implied", "timestep_fraction": 0.25, "replay": False}),
    "diffusion-dpo": ("diffusion-dpo", {**_DDPO_ONE_PAIR, "replay": False}),
    "diffusion-dpo-replay": ("diffusion-dpo", {**_DDPO_ONE_PAIR, "replay": True}),
    "diffusion-dpo-strong": (
        "diffusion-dpo",
        {"pairs": "implied", "noise_draws": 8, "replay": True, "epochs": 4},
    ),
    "diffusion-dpo-implied": (
        "diffusion-dpo",
        {"pairs": "implied", "noise_draws": 4, "replay": True},
    ),
    "diffusion-dpo-lr3": (
        "diffusion-dpo",
        {"pairs": "implied", "noise_draws": 4, "replay": True, "learning_rate": 3e-3},
    ),
    "sft-replay": ("sft", {"replay": True}),
    "d3po-replay": ("d3po", {"replay": True}),
    # the adapter also on the resnets' convolutions, where the embedded model places shapes
    "d3po-replay-conv": ("d3po", _D3PO_CONV),
    "diffusion-dpo-conv": ("diffusion-dpo", _DDPO_CONV),
    # around the two conv leads: how far a round moves (learning rate, epochs, β, rank) and
    # which pairs it trains on
    "d3po-replay-conv-lr5e-4": ("d3po", {**_D3PO_CONV, "learning_rate": 5e-4}),
    "diffusion-dpo-conv-e4": ("diffusion-dpo", {**_DDPO_CONV, "epochs": 4}),
    "diffusion-dpo-conv-lr2e-3": ("diffusion-dpo", {**_DDPO_CONV, "learning_rate": 2e-3}),
    "d3po-replay-conv-e1": ("d3po", {**_D3PO_CONV, "epochs": 1}),
    "d3po-implied-conv": (
        "d3po",
        {**_D3PO_CONV, "pairs": "implied", "timestep_fraction": 0.25},
    ),
    "d3po-replay-conv-r2": (
        "d3po",
        {**_D3PO_CONV, "lora": {**_CONV_LORA, "rank": 2, "alpha": 2.0}},
    ),
    "d3po-replay-conv-prev": ("d3po", {**_D3PO_CONV, "reference": "previous"}),
    "diffusion-dpo-conv-b5000": ("diffusion-dpo", {**_DDPO_CONV, "beta": 5000.0}),
    "diffusion-dpo-conv-b1000": ("diffusion-dpo", {**_DDPO_CONV, "beta": 1000.0}),
    "d3po-replay-conv-b1": ("d3po", {**_D3PO_CONV, "beta": 1.0}),
    # DPO-Positive's penalty on both images: the margin may not come from unlearning images
    "diffusion-dpo-conv-anchor1": (
        "diffusion-dpo",
        {**_DDPO_CONV, "learning_rate": 2e-3, "anchor": 1.0},
    ),
    "diffusion-dpo-conv-anchor0.2": (
        "diffusion-dpo",
        {**_DDPO_CONV, "learning_rate": 2e-3, "anchor": 0.2},
    ),
    "d3po-replay-conv-e1-anchor1": ("d3po", {**_D3PO_CONV, "epochs": 1, "anchor": 1.0}),
    # the pair as a whole may not get worse: the worst image may lose what the best one gains
    "diffusion-dpo-conv-pair-anchor1": (
        "diffusion-dpo",
        {**_DDPO_CONV, "learning_rate": 2e-3, "anchor": 1.0, "anchor_scope": "pair"},
    ),
    # the noise levels drawn toward the noisy end, where colour, kind and place are decided
    "diffusion-dpo-tb2": (
        "diffusion-dpo",
        {"pairs": "implied", "noise_draws": 4, "replay": True, "timestep_bias": 2.0},
    ),
    # less room to fit the accidents of a few picks: D3PO's adapter at rank 1
    "d3po-replay-r1": ("d3po", {"replay": True, "lora": {"rank": 1, "alpha": 1.0}}),
    # the same UNet calls as the defaults, each (t, ε) seen once: twice the draws, one epoch
    "diffusion-dpo-d8e1": (
        "diffusion-dpo",
        {"pairs": "implied", "noise_draws": 8, "replay": True, "epochs": 1},
    ),
    # each step on 4× the items (a gradient averaged over more pairs) at 4× the step size
    "diffusion-dpo-b32": (
        "diffusion-dpo",
        {"pairs": "implied", "noise_draws": 4, "replay": True}
        | {"batch_size": 32, "learning_rate": 4e-3},
    ),
    # KTO's per-image signal on the same picks (Diffusion-KTO): best desirable, worst not; β
    # 2500 (Diffusion-DPO's, KTO's default until β 5000 won), stated so the runs stay true
    "kto-replay": ("kto", _KTO_2500),
    "kto-replay-lr5e-4": ("kto", {**_KTO_2500, "learning_rate": 5e-4}),
    # KTO with the adapter on the resnets' convolutions too (where conv lifted placement)
    "kto-replay-conv": ("kto", {**_KTO_2500, "lora": _CONV_LORA}),
    "kto-replay-lr2e-3": ("kto", {**_KTO_2500, "learning_rate": 2e-3}),
    # each image judged against the batch's mean reward as it is, not at least 0
    "kto-replay-zmean": ("kto", {**_KTO_2500, "reference_point": "mean"}),
    # a rank-4 adapter learns within 4 random input directions a layer, drawn by its seed:
    # more of them, the same scale
    "kto-replay-r8": ("kto", {**_KTO_2500, "lora": {"rank": 8, "alpha": 8.0}}),
    # a larger β: an image's reward saturates sooner, so each round moves less per image (the
    # defaults, at 2 epochs, since it kept the control within 0.50 ± 0.08 on 6 seeds, until
    # kto-replay-b5000-e3)
    "kto-replay-b5000": ("kto", _KTO_5000),
    # β 5000's saturation to bound the drift, with larger or more steps to learn more
    "kto-replay-b5000-lr2e-3": ("kto", {**_KTO_5000, "learning_rate": 2e-3}),
    # and further along β: saturating sooner still
    "kto-replay-b10000": ("kto", {**_KTO_5000, "beta": 10000.0}),
    # β 5000 ending each round on a moving average of the adapter's weights
    "kto-replay-b5000-ema": ("kto", {**_KTO_5000, "ema_decay": 0.95}),
    # the same UNet calls and steps, each on its own noise level: 40 draws an image seen once
    # instead of 20 seen twice
    "kto-replay-b5000-d40e1": (
        "kto",
        {**_KTO_5000, "noise_draws": 40, "epochs": 1},
    ),
    # each image's 20 noise levels one from each twentieth of the schedule
    "kto-replay-b5000-strat": (
        "kto",
        {**_KTO_5000, "noise_levels": "stratified"},
    ),
    # β 5000 with the adapter on the resnets' convolutions too
    "kto-replay-b5000-conv": ("kto", {**_KTO_5000, "lora": _CONV_LORA}),
    # each round's rewards against the adapter as the round starts: a taste's picks push the
    # same way each round, random picks' pushes need not add up
    "kto-replay-b5000-prev": ("kto", {**_KTO_5000, "reference": "previous"}),
    # the worst images' loss at half weight: less unlearning of the model's own samples
    "kto-replay-b5000-u0.5": ("kto", {**_KTO_5000, "undesirable_weight": 0.5}),
    # a pick's best and worst at the same noise levels: what they share cancels
    "kto-replay-b5000-pairnoise": ("kto", {**_KTO_5000, "pair_noise": True}),
    # the reference between the two: the adapter as the round starts at half strength
    "kto-replay-b5000-half": ("kto", {**_KTO_5000, "reference": "halfway"}),
    # and at twice the weight, the other way
    "kto-replay-b5000-u2": ("kto", {**_KTO_5000, "undesirable_weight": 2.0}),
    # a fresh margin each round, at half the step size: smaller moves a round
    "kto-replay-b5000-prev-lr5e-4": (
        "kto",
        {**_KTO_5000, "reference": "previous", "learning_rate": 5e-4},
    ),
    # a cosine step size over each round (warm-up, then down to 0): the last steps, which
    # decide where a round ends, move the adapter least; at the default peak, and at twice it
    # (the same mean step as the default)
    "kto-replay-b5000-cos": ("kto", {**_KTO_5000, "lr_schedule": "cosine"}),
    "kto-replay-b5000-cos-lr2e-3": (
        "kto",
        {**_KTO_5000, "lr_schedule": "cosine", "learning_rate": 2e-3},
    ),
    # each image judged by the guided prediction the grids are drawn with (guidance 2 on the
    # embedded model), not by the conditional branch alone
    "kto-replay-b5000-cfg": ("kto", {**_KTO_5000, "guided_loss": True}),
    # each image judged against its own grid's mean reward at the same noise level (a group
    # baseline, as GRPO's) instead of the batch's: what a prompt's four images share cancels
    "kto-replay-b5000-grid": ("kto", {**_KTO_5000, "reference_point": "grid"}),
    # a third pass over each round's items: more learning a round, β 5000's saturation to
    # bound the drift (at 2, top-left and detail still rose at round 3). The defaults since it
    # learned every taste at least as well on the open prompts (mean 0.85 against 0.80, most
    # of its runs on a GPU; 0.82 against 0.80 with both on the CPU)
    "kto-replay-b5000-e3": ("kto", {**_KTO_5000, "epochs": 3}),
    # and a fourth: did the third epoch's gain on top-left and detail have more to give? On
    # the CPU, level with it (mean 0.83 against 0.82) at 4/3 the time
    "kto-replay-b5000-e4": ("kto", {**_KTO_5000, "epochs": 4}),
    # the defaults with the adapter on every layer of the transformer blocks (their
    # feed-forward and 1x1 projections too, as kohya's LoRA for SD): more room where the
    # attention adapter already learns, none in the resnets (behind on seed 0: 0.75 against
    # 0.83, top-left 0.41; stopped there)
    "kto-replay-b5000-e3-tf": ("kto", {**_KTO_5000, "epochs": 3, "lora": _BLOCK_LORA}),
    # the defaults with DoRA: each adapted weight's magnitude learned apart from its direction
    # (ahead of the defaults on the same 6 seeds on the CPU, 0.84 against 0.80, detail higher
    # on every seed; random picks moved top-left further, 0.36 against 0.41)
    "kto-replay-b5000-e3-dora": ("kto", {**_KTO_5000, "epochs": 3, "lora": {"dora": True}}),
    # DoRA with a fourth epoch, or with twice the rank (the same scale): does DoRA's gain on
    # top-left and detail have more to give?
    "kto-replay-b5000-e4-dora": ("kto", {**_KTO_5000, "epochs": 4, "lora": {"dora": True}}),
    # prior preservation: the adapter's prediction on the images each pick left unlabeled
    # held to the base's (preserve × β/2 × its mean square), against the drift random picks
    # cause (shapes move from the top-left)
    "kto-replay-b5000-e3-keep0.03": ("kto", {**_KTO_5000, "epochs": 3, "preserve": 0.03}),
    "kto-replay-b5000-e3-keep0.3": ("kto", {**_KTO_5000, "epochs": 3, "preserve": 0.3}),
    # and with twice the learning rate: does preservation let a round learn more at no drift?
    "kto-replay-b5000-e3-keep0.03-lr2e-3": (
        "kto",
        {**_KTO_5000, "epochs": 3, "preserve": 0.03, "learning_rate": 2e-3},
    ),
    # preservation on the noisier half of the schedule only, where a seed's layout is
    # decided: does it hold placement under random picks and leave colour, contrast and
    # texture free to learn?
    "kto-replay-b5000-e3-keep0.1-hi": (
        "kto",
        {**_KTO_5000, "epochs": 3, "preserve": 0.1, "preserve_from": 0.5},
    ),
    # no loss on the worst images: is the control's drift the unlearning of the worst ones?
    "kto-replay-b5000-e3-u0": ("kto", {**_KTO_5000, "epochs": 3, "undesirable_weight": 0.0}),
    # mirrored rounds: twins on the picks and on the picks swapped, half their difference kept,
    # so what training on the grids moves whichever image was picked cancels
    "kto-replay-b5000-e3-mirror": ("kto", {**_KTO_5000, "epochs": 3, "mirror": True}),
    # and at twice the step size: with the drift cancelled, can a round learn more?
    # ensembles: K adapters on the same picks, each from its own seed, their mean kept
    "kto-replay-b5000-e3-ens3": ("kto", {**_KTO_5000, "epochs": 3, "ensemble": 3}),
    "kto-replay-b5000-e3-mirror-lr2e-3": (
        "kto",
        {**_KTO_5000, "epochs": 3, "mirror": True, "learning_rate": 2e-3},
    ),
    # the convolutions of the coarsest level too: placement learned where the conv adapter
    # learned it (top-left 0.86 on the H200), texture left where it lost it (detail 0.65).
    # Two seeds on the CPU: top-left +0.09, detail -0.12, mean 0.78 against 0.82; stopped
    "kto-replay-b5000-e3-deep": ("kto", {**_KTO_5000, "epochs": 3, "lora": _DEEP_CONV_LORA}),
    # preservation a third as strong as keep0.03's, at the sampling strength that learned more:
    # does holding the unlabeled images' layouts cut the churn of placements a round causes
    # without cutting the learning as 0.03 did? No: at 1.25 seed 0 lost every taste it reached
    # (paired -0.22 ± 0.06 over 4 runs: roundness 0.59 against 1.00, top-left 0.59 against
    # 0.80); stopped
    "kto-replay-b5000-e3-keep0.01": ("kto", {**_KTO_5000, "epochs": 3, "preserve": 0.01}),
    # every earlier pick replayed, each on its share of the noise draws (the same UNet rows as
    # a random draw of as many earlier picks as new ones): no pick left out of a round by
    # chance. At 1.25 it lost (paired -0.068 ± 0.024 over 8 runs on seeds 0-1, top-left 0.63
    # against 0.80 on seed 0; rounds 1-2 repeat the defaults', so all of it is round 3); stopped
    "kto-replay-b5000-e3-spread": ("kto", {**_KTO_5000, "epochs": 3, "replay_spread": True}),
    # each round's noise draws and batch order its own (the train seed plus the round's
    # number): a replayed pick is otherwise trained on the same (t, ε) draws each round.
    # Level on fresh seeds 6-11 (paired -0.011 ± 0.023 over 30 runs), a run's final win rate
    # moved 0.12 (sd) by the draws alone: not the default
    "kto-replay-b5000-e3-fresh": ("kto", {**_KTO_5000, "epochs": 3, "fresh_draws": True}),
    "kto-replay-b5000-e3-dora-r8": (
        "kto",
        {**_KTO_5000, "epochs": 3, "lora": {"dora": True, "rank": 8, "alpha": 8.0}},
    ),
}

#: variants that sample otherwise than at strength 1 (SampleSettings fields): the adapter's
#: strength while sampling grids and the evaluation set, each round trained as the defaults'.
#: 1.25 learned every taste at least as well over 6 seeds (mean 0.83 against 0.79, paired
#: +0.039 ± 0.020): **the defaults now** (the engine samples at 1.25); on seeds 6-11, which
#: it was not chosen on, level (+0.005 ± 0.021), so over 12 seeds +0.022 ± 0.014; 1.5 and 2
#: lost roundness (0.73, 0.78 on seed 0; stopped after 2 seeds and 1)
SAMPLING: dict[str, dict] = {
    "kto-replay-b5000-e3-s1.25": {"strength": 1.25},
    "kto-replay-b5000-e3-s1.5": {"strength": 1.5},
    "kto-replay-b5000-e3-s2": {"strength": 2.0},
    "kto-replay-b5000-e3-ens3-s1.25": {"strength": 1.25},
    # a fourth epoch at 1.25 (at strength 1 it had lifted detail and top-left): the two
    # push the same way, and together too far (paired -0.094 ± 0.022 over 9 runs on seeds 0-1,
    # roundness -0.17, detail seed 0 0.83 against 0.97; stopped)
    "kto-replay-b5000-e4-s1.25": {"strength": 1.25},
    "kto-replay-b5000-e3-keep0.01-s1.25": {"strength": 1.25},
    "kto-replay-b5000-e3-spread-s1.25": {"strength": 1.25},
    "kto-replay-b5000-e3-fresh-s1.25": {"strength": 1.25},
}
for _name in SAMPLING:
    VARIANTS[_name] = VARIANTS[_name.rsplit("-s", 1)[0]]

#: the variant the detailed tables and the plot describe: the engine's defaults
DEFAULT_VARIANT = "kto-replay-b5000-e3-s1.25"


def variant_spec(
    variant: str, labeler: str, seed: int, rounds: int = 3, prompts: list[str] = OPEN_PROMPTS
) -> dict:
    """One run of the benchmark: a variant's round settings and sampling, one labeler (a
    taste, or ``CONTROL``), one seed."""
    method, config = VARIANTS[variant]
    return spec(
        variant,
        labeler,
        method,
        seed,
        rounds=rounds,
        config=config,
        settings=SAMPLING.get(variant),
        prompts=prompts,
    )


def labeler_of(s: dict):
    """Who labels a run: its taste's scorer, or random picks drawn from its seed (the
    control)."""
    return random_labeler(s["seed"]) if s["objective"] == CONTROL else TASTES[s["objective"]][0]


def specs(
    seeds: int,
    rounds: int,
    prompts: list[str] = OPEN_PROMPTS,
    tastes: dict[str, tuple[Scorer, str]] | None = None,
) -> list[dict]:
    """Every variant's runs, seed by seed, one a taste (``TASTES`` unless given) and one of
    random picks: a batch cut short by its deadline leaves the last seeds missing, not the
    last variants."""
    return [
        variant_spec(variant, labeler, seed, rounds, prompts)
        for seed in range(seeds)
        for variant in VARIANTS
        for labeler in (*(TASTES if tastes is None else tastes), CONTROL)
    ]


def score_eval_set(pipe, settings: SampleSettings, evals: EvalSet) -> dict[str, list[float]]:
    """Every taste on every (prompt, seed) of ``evals``, with the pipeline as it stands."""
    one_by_one = replace(settings, shared_noise=False)
    scores: dict[str, list[float]] = {name: [] for name in TASTES}
    for prompt in evals.prompts:
        grid = sample_grid(pipe, prompt, one_by_one, seeds=evals.seeds)
        for name, (scorer, _what) in TASTES.items():
            scores[name] += [float(scorer(image, prompt)) for image in grid.images]
    return scores


def taste_rows(
    scores: dict[str, list[float]], base: dict[str, list[float]]
) -> dict[str, dict[str, float]]:
    return {
        name: {
            "base_mean": float(np.mean(base[name])),
            "tuned_mean": float(np.mean(scores[name])),
            "win_rate": paired_win_rate(scores[name], base[name]),
        }
        for name in TASTES
    }


def pick_lean(session) -> dict[str, float]:
    """How far the picks trained on lean toward each taste: the mean over picks of the taste's
    score of the best image minus the worst's, as a share of the grid's range (max − min).
    A labeler with that taste leans 1; random picks lean a little, each seed its own way."""
    gap = dict.fromkeys(TASTES, 0.0)
    span = dict.fromkeys(TASTES, 0.0)
    untrained = {p["pick_id"] for p in session.training_picks()}  # the held-out last grids
    for pick in session.training_picks(since_last_round=False):
        if pick["pick_id"] in untrained:
            continue
        images = session.load_images(pick["grid_id"])
        prompt = session.grid(pick["grid_id"])["prompt"]
        for name, (scorer, _what) in TASTES.items():
            scores = [float(scorer(image, prompt)) for image in images]
            gap[name] += scores[pick["best"]] - scores[pick["worst"]]
            span[name] += max(scores) - min(scores)
    return {name: gap[name] / span[name] if span[name] else 0.0 for name in TASTES}


def run_taste(s: dict, out: Path, model: str | None) -> dict:
    """Run a spec (or read its cached result): label with its taste (or at random), train,
    and measure every taste on its eval set before training and after each round."""
    path = out / f"{s['id']}.json"
    if path.exists():
        return json.loads(path.read_text())
    run = runs.Run.of(s, model)
    pipe, settings = run.pipe, run.settings
    labeler = labeler_of(s)
    evals = eval_set(prompts_of(s))
    key = (model or default_model(), tuple(sorted(asdict(settings).items())), str(evals))
    if key not in _BASE_CACHE:  # the untuned model's eval set is the same in every run
        with base_model(pipe.unet):
            _BASE_CACHE[key] = score_eval_set(pipe, settings, evals)
    base = _BASE_CACHE[key]
    table: list[dict] = []
    samples: list[dict[str, list[float]]] = []

    def on_round(row: dict) -> None:
        t0 = time.perf_counter()
        scores = base if row["images_sampled"] == 0 else score_eval_set(pipe, settings, evals)
        samples.append({k: [round(v, 6) for v in vs] for k, vs in scores.items()})
        table.append(
            {
                **{
                    k: row[k]
                    for k in ("round", "images_sampled", "loss", "accuracy", "train_seconds")
                },
                "seconds": row["seconds"] + time.perf_counter() - t0,
                "tastes": taste_rows(scores, base),
            }
        )

    lean: dict[str, float] = {}
    rows = run.simulate(
        labeler, _SIM_EVAL, on_round=on_round, on_session=lambda ss: lean.update(pick_lean(ss))
    )
    for entry, row in zip(table, rows, strict=True):
        entry["heldout_agreement"] = row.get("heldout_agreement")
    result = run.result(eval_set=asdict(evals), table=table, eval_scores=samples, pick_lean=lean)
    out.mkdir(parents=True, exist_ok=True)
    runs.save_result(path, result)
    return result


def describe(result: dict) -> str:
    last = result["table"][-1]["tastes"]
    return " ".join(f"{name} {row['win_rate']:.2f}" for name, row in last.items())


# ---------------------------------------------------------------------------------------------
# Report


def frame(results: list[dict]) -> pd.DataFrame:
    """One row per (run, round, taste measured)."""
    import pandas as pd

    rows = []
    for r in results:
        for row in r["table"]:
            for taste, m in row["tastes"].items():
                rows.append(
                    {
                        "variant": r["variant"],
                        "labeler": r["objective"],
                        "seed": r["seed"],
                        "round": row["round"],
                        "images": row["images_sampled"],
                        "taste": taste,
                        "score": m["tuned_mean"],
                        "base": m["base_mean"],
                        "win_rate": m["win_rate"],
                        "seconds": row["seconds"],
                        "heldout": row.get("heldout_agreement"),
                    }
                )
    return pd.DataFrame(rows)


def _own(df: pd.DataFrame) -> pd.DataFrame:
    """Each taste measured on the runs that learn it ("taste") and on the control's ("random")."""
    import pandas as pd

    own = df[df["labeler"] == df["taste"]].assign(picks="taste")
    control = df[df["labeler"] == CONTROL].assign(picks=CONTROL)
    return pd.concat([own, control])


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per taste, picks (its own or random) and round: score and win rate over seeds."""
    part = _own(df)
    part = part[part["images"] > 0]
    table = (
        part.groupby(["taste", "picks", "round"], sort=False)
        .agg(
            seeds=("seed", "nunique"),
            base=("base", "mean"),
            score=("score", "mean"),
            score_sd=("score", "std"),
            score_min=("score", "min"),
            win=("win_rate", "mean"),
            win_sd=("win_rate", "std"),
            win_min=("win_rate", "min"),
        )
        .reset_index()
    )
    order = {t: i for i, t in enumerate(TASTES)}
    picks_order = {"taste": 0, CONTROL: 1}
    keys = {"taste": order, "picks": picks_order}
    return table.sort_values(
        ["taste", "picks", "round"], key=lambda c: c.map(keys[c.name]) if c.name in keys else c
    )


def markdown(table: pd.DataFrame) -> str:
    """A row per taste and picks: the eval-set mean and the win rate vs base per round."""
    rounds = sorted(table["round"].unique())
    lines = [
        "| taste (higher is preferred) | picks | seeds | base mean | "
        + " | ".join(f"mean after round {r} ± sd (min)" for r in rounds)
        + " | "
        + " | ".join(f"win rate round {r} ± sd (min)" for r in rounds)
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(rounds)),
    ]
    for (taste, picks), g in table.groupby(["taste", "picks"], sort=False):
        g = g.set_index("round")
        means = [f"{g.score[r]:.4f} ± {_sd(g.score_sd[r])} ({g.score_min[r]:.4f})" for r in rounds]
        wins = [f"{g.win[r]:.2f} ± {_sd(g.win_sd[r], 2)} ({g.win_min[r]:.2f})" for r in rounds]
        who = "its own" if picks == "taste" else "random (control)"
        lines.append(
            f"| **{taste}**: {TASTES[taste][1]} | {who} | {int(g.seeds.min())} "
            f"| {g.base.iloc[0]:.4f} | " + " | ".join(means + wins) + " |"
        )
    return "\n".join(lines)


def _sd(value: float, digits: int = 4) -> str:
    return "–" if np.isnan(value) else f"{value:.{digits}f}"


def cross_table(df: pd.DataFrame) -> str:
    """Last round: the mean win rate vs base of every taste (columns) for every labeler (rows)."""
    last = df[df["images"] == df["images"].max()]
    wide = last.pivot_table(index="labeler", columns="taste", values="win_rate", aggfunc="mean")
    labelers = [t for t in (*TASTES, CONTROL) if t in wide.index]
    cols = [t for t in TASTES if t in wide.columns]
    lines = [
        "| picks by ↓ / win rate in → | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for labeler in labelers:
        cells = [
            f"**{wide.loc[labeler, c]:.2f}**" if c == labeler else f"{wide.loc[labeler, c]:.2f}"
            for c in cols
        ]
        lines.append(f"| {labeler} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timing(results: list[dict]) -> str:
    secs = [r["seconds"] for r in results]
    per_round = [row["seconds"] for r in results for row in r["table"][1:]]
    return (
        f"{len(results)} runs: {np.median(secs):.0f} s a run (median; {min(secs):.0f}–"
        f"{max(secs):.0f} s), {np.median(per_round):.0f} s a round; {results[0]['machine']}"
    )


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    part = _own(df)
    fig, axes = plt.subplots(2, len(TASTES), figsize=(3.3 * len(TASTES), 6.2), squeeze=False)
    for j, taste in enumerate(TASTES):
        t = part[part["taste"] == taste]
        for i, (value, ylabel) in enumerate((("score", "eval-set mean"), ("win_rate", "win rate"))):
            ax = axes[i, j]
            for picks, style, colour in (("taste", "-", "tab:blue"), (CONTROL, "--", "gray")):
                g = t[t["picks"] == picks].groupby("images")[value]
                if g.ngroups == 0:
                    continue
                mean, std = g.mean(), g.std().fillna(0.0)
                label = "its own picks" if picks == "taste" else "random picks"
                ax.plot(mean.index, mean, ls=style, marker="o", ms=3, color=colour, label=label)
                ax.fill_between(mean.index, mean - std, mean + std, color=colour, alpha=0.15)
            if value == "win_rate":
                ax.axhline(0.5, color="k", lw=0.6)
            elif not t.empty:
                ax.axhline(t["base"].iloc[0], color="k", lw=0.6)
            if i == 0:
                ax.set_title(taste)
            else:
                ax.set_xlabel("images sampled for training")
            if j == 0:
                ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    variant = df["variant"].iloc[0]
    who = f"the defaults ({variant})" if variant == DEFAULT_VARIANT else variant
    fig.suptitle(
        f"Embedded model, {who}: each taste on 64 paired eval "
        "samples (mean ± sd over seeds; black: base)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def compare(df: pd.DataFrame) -> str:
    """A row per variant: each taste's last-round win rate on its own picks (mean ± sd over
    seeds, min), the largest fall of a per-round mean, and the control's win rates."""
    part = _own(df)
    part = part[part["images"] > 0]
    last_round = part["round"].max()
    lines = [
        "| variant | seeds | " + " | ".join(TASTES) + " | mean | worst fall | random picks "
        "(control) | held-out agreement: own picks, control | s/round |",
        "|---|---|" + "---|" * (len(TASTES) + 5),
    ]
    for variant, g in part.groupby("variant", sort=False):
        cells, falls = [], []
        for taste in TASTES:
            own = g[(g["taste"] == taste) & (g["picks"] == "taste")]
            means = own.groupby("round")["win_rate"].mean().sort_index()
            last = own[own["round"] == last_round]["win_rate"]
            cells.append(
                f"{last.mean():.2f} ± {_sd(last.std(), 2)} ({last.min():.2f})" if len(last) else "–"
            )
            falls.append(float((-means.diff()).max()) if len(means) > 1 else 0.0)
        ctrl = g[(g["picks"] == CONTROL) & (g["round"] == last_round)]
        ctrl_means = ctrl.groupby("taste")["win_rate"].mean()
        control = f"{ctrl_means.min():.2f}–{ctrl_means.max():.2f}" if len(ctrl_means) else "–"
        secs = g["seconds"].median()
        own_last = g[(g["picks"] == "taste") & (g["round"] == last_round)]
        finals = own_last.groupby("taste")["win_rate"].mean()
        held = [
            g[g["picks"] == picks]
            .drop_duplicates(["labeler", "seed", "round"])["heldout"]
            .dropna()
            .astype(float)
            for picks in ("taste", CONTROL)
        ]
        held_text = ", ".join(f"{h.mean():.2f}" if len(h) else "–" for h in held)
        lines.append(
            f"| {variant} | {g['seed'].nunique()} | "
            + " | ".join(cells)
            + f" | {f'{finals.mean():.2f}' if len(finals) else '–'} | {max(falls):.2f} | "
            + f"{control} | {held_text} | {secs:.0f} |"
        )
    return "\n".join(lines)


def paired(results: list[dict], against: str = DEFAULT_VARIANT) -> str:
    """Each variant against ``against`` run by run: the last-round win rate on its own taste
    minus that of ``against``'s run with the same taste and seed on the same machine (machines
    draw other images from one seed, so only such pairs compare), mean ± standard error."""
    last = {
        (r["variant"], r["objective"], r["seed"], r["machine"]): r["table"][-1]["tastes"][
            r["objective"]
        ]["win_rate"]
        for r in results
        if r["objective"] in TASTES
    }
    lines = [
        f"| variant | pairs with {against} (same taste, seed, machine) | difference: mean ± se "
        "| higher / lower | " + " | ".join(TASTES) + " |",
        "|---|---|---|---|" + "---|" * len(TASTES),
    ]
    for variant in dict.fromkeys(r["variant"] for r in results):
        if variant == against:
            continue
        diffs = {
            key[1:]: value - last[(against, *key[1:])]
            for key, value in last.items()
            if key[0] == variant and (against, *key[1:]) in last
        }
        if not diffs:
            continue
        values = np.array(list(diffs.values()))
        se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
        per_taste = [
            [d for (taste, _seed, _machine), d in diffs.items() if taste == name] for name in TASTES
        ]
        lines.append(
            f"| {variant} | {len(values)} | {values.mean():+.3f} ± {se:.3f} | "
            f"{(values > 0).sum()} / {(values < 0).sum()} | "
            + " | ".join(f"{np.mean(d):+.2f} ({len(d)})" if d else "–" for d in per_taste)
            + " |"
        )
    return "\n".join(lines) if len(lines) > 2 else f"(no run pairs with {against})"


def seed_noise(df: pd.DataFrame, seeds: int = 3) -> str:
    """How far a mean over ``seeds`` seeds moves by chance: the sd over seeds of a run's
    last-round win rate (its own picks; random picks) and of its change from one round to the
    next, pooled over every variant and taste with 3 seeds or more."""
    part = _own(df)
    part = part[part["images"] > 0]
    last = part[part["round"] == part["round"].max()]

    def pooled(values: pd.DataFrame, column: str, by=("variant", "taste")) -> float:
        groups = values.groupby(list(by))[column]
        var = groups.var()[groups.count() >= 3]
        return float(np.sqrt(var.mean()))

    steps = part[part["picks"] == "taste"].sort_values("round")
    steps = steps.assign(
        change=steps.groupby(["variant", "taste", "seed"])["win_rate"].diff()
    ).dropna(subset=["change"])
    own = pooled(last[last["picks"] == "taste"], "win_rate")
    control = pooled(last[last["picks"] == CONTROL], "win_rate")
    change = pooled(steps, "change", by=("variant", "taste", "round"))
    if np.isnan([own, control, change]).any():
        return "(too few seeds to measure how far a mean moves by chance)"
    root = np.sqrt(seeds)
    return (
        f"sd over seeds of a run's last-round win rate: {own:.3f} on its own picks, "
        f"{control:.3f} on random picks; of its change from one round to the next: "
        f"{change:.3f}. A {seeds}-seed mean: ±{own / root:.3f}, control ±{control / root:.3f}, "
        f"a change of the mean ±{change / root:.3f}; a change measured to ±0.015 (a 0.03 fall "
        f"told from none at 2 sd) takes {int(np.ceil((change / 0.015) ** 2))} seeds."
    )


def lean_drift(results: list[dict]) -> str:
    """How much of the control's drift its random picks asked for: over the control runs that
    recorded their picks' lean, each taste's last-round win rate − 0.5 fitted as a per-taste
    offset (drift whatever the picks) plus one slope on the picks' lean toward that taste,
    beside what the tastes' own labelers (lean 1) gained on the same variants."""
    runs_ = [r for r in results if r["objective"] == CONTROL and r.get("pick_lean")]
    if len(runs_) < 3:
        return "(too few control runs record their picks' lean)"
    rows = [
        (name, lean, r["table"][-1]["tastes"][name]["win_rate"] - 0.5)
        for r in runs_
        for name, lean in r["pick_lean"].items()
    ]
    names = list(TASTES)
    lean = np.array([x for _, x, _ in rows])
    drift = np.array([y for *_, y in rows])
    design = np.column_stack([lean] + [[n == name for n, *_ in rows] for name in names])
    coef, *_ = np.linalg.lstsq(design.astype(float), drift, rcond=None)
    fitted = design.astype(float) @ coef
    offsets = ", ".join(f"{name} {c:+.3f}" for name, c in zip(names, coef[1:], strict=True))
    variants = sorted({r["variant"] for r in runs_})
    own = [
        r["table"][-1]["tastes"][r["objective"]]["win_rate"] - 0.5
        for r in results
        if r["variant"] in variants and r["objective"] in TASTES
    ]
    return (
        f"control runs that record their picks' lean: {len(runs_)} ({', '.join(variants)}). "
        f"Random picks lean {np.mean(np.abs(lean)):.3f} toward a taste on average (|lean|; "
        f"its own labeler leans 1). Fit: win rate − 0.5 = {coef[0]:.2f} × lean + a taste's "
        f"offset ({offsets}); rms drift {np.sqrt(np.mean(drift**2)):.3f}, left after the fit "
        f"{np.sqrt(np.mean((drift - fitted) ** 2)):.3f}. "
        + (
            f"The tastes' own runs gained {np.mean(own):+.3f} at lean 1."
            if own  # --labelers random: only the control ran
            else "No taste's own runs to compare."
        )
    )


def warning_calibration(results: list[dict]) -> str:
    """The studio's held-out agreement warning (``round_warnings``) on every round of the
    runs picking by a taste: a round is flagged when its agreement on the next round's picks
    is below the floor or at least the drop under the round before's; it lost ground when its
    win rate on its own taste fell by more than 0.03 from the round before (round 1: ended
    below 0.5). Per pair of thresholds: the share of rounds flagged, the share of flagged rounds
    that had lost ground (beside that of all rounds), the share of the rounds that lost
    ground it flagged, the mean change in win rate of flagged and unflagged rounds, and the
    share of flagged rounds whose win rate rose."""
    import pandas as pd

    from d3po_core.session.reports import AGREEMENT_DROP, AGREEMENT_FLOOR, agreement_flag

    rows, counted = [], 0
    for r in results:
        if r["objective"] not in TASTES:
            continue
        table = r["table"]
        counted += any(row.get("heldout_agreement") is not None for row in table)
        for k in range(1, len(table)):
            agreement = table[k].get("heldout_agreement")
            if agreement is None:
                continue
            before = table[k - 1].get("heldout_agreement")
            win = table[k]["tastes"][r["objective"]]["win_rate"]
            then = table[k - 1]["tastes"][r["objective"]]["win_rate"] if k > 1 else 0.5
            lost = win < then - 0.03 if k > 1 else win < 0.5
            rows.append((agreement, before, win, win - then, lost))
    if not rows:
        return "(no runs record held-out agreement)"
    agreement = np.array([a for a, *_ in rows])
    win = np.array([w for _, _, w, *_ in rows])
    change = np.array([c for *_, c, _ in rows])
    lost = np.array([x for *_, x in rows])
    bands = [(0, 0.25), (0.375, 0.5), (0.625, 0.75), (0.875, 1)]
    by_band = ", ".join(
        f"{lo:g}–{hi:g}: {_share(lost[(agreement >= lo - 1e-9) & (agreement <= hi + 1e-9)])}"
        for lo, hi in bands
    )
    # Spearman's rho as Pearson's on the ranks (ties averaged), without scipy
    rho = pd.Series(agreement).rank().corr(pd.Series(win).rank())
    lines = [
        f"{len(rows)} rounds of {counted} runs picking by a taste; {lost.mean():.2f} of "
        f"them lost ground. Lost ground by agreement "
        f"{by_band}; Spearman of agreement and win rate {rho:.2f}.",
        "",
        "| floor | drop | rounds flagged | of them lost ground | lost rounds flagged "
        "| win-rate change: flagged | unflagged | flagged that gained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pairs = [(0.5, 0.2), (0.5, None), (0.375, 0.375), (0.375, None), (0.25, None)]
    if (AGREEMENT_FLOOR, AGREEMENT_DROP) not in pairs:
        pairs.insert(0, (AGREEMENT_FLOOR, AGREEMENT_DROP))
    for floor, drop in pairs:
        flagged = np.array([agreement_flag(a, b, floor, drop) is not None for a, b, *_ in rows])
        mark = " (the studio's)" if (floor, drop) == (AGREEMENT_FLOOR, AGREEMENT_DROP) else ""
        cells = [
            _share(lost[flagged]),
            _share(flagged[lost]),
            _share(change[flagged], "+.3f"),
            _share(change[~flagged], "+.3f"),
            _share(change[flagged] > 0),
        ]
        lines.append(
            f"| {floor}{mark} | {drop if drop is not None else '–'} | {flagged.mean():.2f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def _share(values: np.ndarray, spec: str = ".2f") -> str:
    """The mean of ``values`` formatted, or "–" when there are none."""
    return format(values.mean(), spec) if values.size else "–"


def by_prompt(results: list[dict]) -> str:
    """Last round, the runs picking by each taste: its win rate on each evaluation prompt's 16
    samples, mean over seeds (where a taste asks what a prompt forbids, it shows)."""
    evals = results[0]["eval_set"]  # one benchmark's runs share it
    prompts, per = evals["prompts"], len(evals["seeds"])
    lines = [
        "| taste | " + " | ".join(f"“{p}”" for p in prompts) + " | all |",
        "|---|" + "---|" * (len(prompts) + 1),
    ]
    for taste in TASTES:
        runs_ = [r for r in results if r["objective"] == taste and r.get("eval_scores")]
        if not runs_:
            continue
        wins = np.mean(
            [
                [
                    paired_win_rate(
                        r["eval_scores"][-1][taste][i * per : (i + 1) * per],
                        r["eval_scores"][0][taste][i * per : (i + 1) * per],
                    )
                    for i in range(len(prompts))
                ]
                for r in runs_
            ],
            axis=0,
        )
        cells = " | ".join(f"{w:.2f}" for w in wins)
        lines.append(f"| {taste} | {cells} | {np.mean(wins):.2f} |")
    return "\n".join(lines)


def churn(results: list[dict]) -> str:
    """The runs picking by each taste, from each round to the next: the share of the
    evaluation pairs that changed side (won after one round, lost after the next, or the other
    way), mean over runs. A win rate that holds while many pairs change side is the taste
    learned on some images and unlearned on others: the model's samples churn."""
    runs_ = [r for r in results if r["objective"] in TASTES and len(r.get("eval_scores", [])) > 2]
    if not runs_:
        return "(no runs with two rounds or more)"
    rounds = min(len(r["eval_scores"]) for r in runs_) - 1
    steps = [f"{i}→{i + 1}" for i in range(1, rounds)]
    lines = [
        "| taste | runs | " + " | ".join(f"changed side, rounds {s}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for taste in TASTES:
        own = [r for r in runs_ if r["objective"] == taste]
        if not own:
            continue
        shares = []
        for r in own:
            base = np.asarray(r["eval_scores"][0][taste])
            won = [np.asarray(r["eval_scores"][i][taste]) > base for i in range(1, rounds + 1)]
            shares.append([float((a != b).mean()) for a, b in zip(won[:-1], won[1:], strict=True)])
        means = np.mean(shares, axis=0)
        lines.append(f"| {taste} | {len(own)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")
    return "\n".join(lines)


def ceilings(results: list[dict]) -> str:
    """Last round, the runs picking by each taste: how much of the win rate the base's best
    samples leave to win. A pair whose base image already scores near the most any tuned
    sample reached can hardly be won, so per taste: the top tenth of the base's evaluation
    scores (from which score), the highest score of a tuned sample, the win rate on the top
    tenth and on the rest, and the win rate if the rest were all won."""
    lines = [
        "| taste | base's top tenth from | highest tuned score | win rate: top tenth "
        "| the rest | all | if the rest all won |",
        "|---|---|---|---|---|---|---|",
    ]
    for taste in TASTES:
        runs_ = [r for r in results if r["objective"] == taste and r.get("eval_scores")]
        if not runs_:
            continue
        base = np.concatenate([r["eval_scores"][0][taste] for r in runs_])
        tuned = np.concatenate([r["eval_scores"][-1][taste] for r in runs_])
        cut = np.percentile(base, 90)
        top = base >= cut
        on_top, rest = (paired_win_rate(tuned[m], base[m]) for m in (top, ~top))
        ceiling = on_top * top.mean() + (~top).mean()
        lines.append(
            f"| {taste} | {cut:.3g} | {tuned.max():.3g} | {on_top:.2f} | {rest:.2f} | "
            f"{paired_win_rate(tuned, base):.2f} | {ceiling:.2f} |"
        )
    return "\n".join(lines)


def report(results: list[dict], plot_path: Path) -> None:
    """Every variant's table, and the detailed tables and plot of the defaults (or, with
    ``--only VARIANT``, of that variant: an earlier default's)."""
    df = frame(results)
    print(compare(df))
    print()
    print(paired(results))
    print()
    print(seed_noise(df))
    print()
    print(lean_drift(results))
    print()
    print(warning_calibration(results))
    print()
    variants = set(df["variant"])
    if DEFAULT_VARIANT in variants:
        shown = DEFAULT_VARIANT
    elif len(variants) == 1:  # --only VARIANT: its tables (e.g. earlier defaults')
        shown = variants.pop()
    else:
        return
    default = df[df["variant"] == shown]
    runs_shown = [r for r in results if r["variant"] == shown]
    print(markdown(summary(default)))
    print()
    print(cross_table(default))
    print()
    print(by_prompt(runs_shown))
    print()
    print(ceilings(runs_shown))
    print()
    print(churn(runs_shown))
    print()
    print(timing(runs_shown))
    plot(default, plot_path)


if __name__ == "__main__":
    runs.main(
        __doc__.splitlines()[0],
        specs,
        report,
        seeds=3,
        plot="tastes.png",
        rounds=3,
        out="tastes",
        runner=run_taste,
        describe=describe,
        prompt_sets=PROMPT_SETS,
    )
