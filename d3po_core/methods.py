"""The training methods and their settings, with no torch: a front end lays out its forms
from here before the engine loads.

A method says which settings it takes, which stored data it trains on ("picks": the
labeler's best/worst picks; "rewards": a scorer's value per image) and, in one line, what it
does. Its objective (the loss on the round loop) is in :mod:`d3po_core.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .errors import SettingsError
from .settings import RoundSettings, setting

Reduction = Literal["mean", "sum"]
PairMode = Literal["best-worst", "implied"]


@dataclass
class PickSettings(RoundSettings):
    """What every method on best/worst picks takes besides the loop's settings."""

    replay: bool = setting(
        True,
        help="Also train on as many earlier picks as there are new ones, drawn at random, so "
        "rounds build on each other (a round then costs at most twice its new picks').",
    )
    fresh_draws: bool = setting(
        False,
        help="Draw each round's noise levels, steps and batch order afresh (the round's seed is "
        "the training seed plus the rounds before it). Off, a pick replayed in a later round "
        "is trained on the draws it had before, as every round uses the training seed. On the "
        "taste benchmark it learned as the default did (paired −0.01 over 30 runs on fresh "
        "seeds; docs/benchmarks.md §5).",
    )
    mirror: bool = setting(
        False,
        help="Mirrored rounds: train twin adapters, one on the picks and one on the same picks "
        "with best and worst swapped, and keep half their difference, so what training on "
        "these grids moves whichever image was picked cancels (d3po_core/mirror.py). Twice "
        "the training time; a plain LoRA only (no DoRA). On the taste benchmark (KTO) random "
        "picks moved shapes less (their top left win rate 0.44 against 0.39 over the same "
        "12 seeds) and the tastes were learned less (mean 0.78 against 0.80 over 6 seeds; "
        "docs/benchmarks.md §5).",
    )

    ensemble: int = setting(
        1,
        low=1,
        high=8,
        help="Adapters a round trains on the same picks, each from its own seed (its starting "
        "weights, batches and noise draws), sampling from their mean: what one seed's draws "
        "teach by chance averages out (d3po_core/mirror.py). K times the training time; a "
        "plain LoRA only (no DoRA); 1: one adapter. On the taste benchmark (KTO) 3 learned the "
        "tastes as 1 did (mean 0.86 both over 3 seeds; docs/benchmarks.md §5).",
    )

    def validate(self) -> None:
        super().validate()
        if self.mirror and self.lora.dora:
            raise SettingsError("mirror needs a plain LoRA: DoRA's magnitudes do not subtract")
        if self.ensemble > 1 and self.lora.dora:
            raise SettingsError("ensemble needs a plain LoRA: DoRA's magnitudes do not average")
        if self.ensemble > 1 and self.mirror:
            raise SettingsError("mirror and ensemble do not combine: choose one")


@dataclass
class PreferenceSettings(PickSettings):
    """What the preference losses (D3PO's, Diffusion-DPO's) take besides the pick settings."""

    pairs: PairMode = setting(
        "best-worst",
        help="best-worst: one pair a pick; implied: also best > others > worst (2N−3 pairs).",
    )
    anchor: float = setting(
        0.0,
        low=0,
        high=1e4,
        help="Weight of a penalty on either image of a pair getting less likely than under "
        "the reference (DPO-Positive's, on both images): it keeps random or noisy picks from "
        "moving the model, and from a few dozen picks it stops most learning too (see "
        "docs/benchmarks.md §5); 0: off.",
    )
    anchor_scope: Literal["each", "pair"] = setting(
        "each",
        help="each: neither image may get less likely; pair: only the pair as a whole (what "
        "the dispreferred image loses, the preferred one must gain).",
    )


@dataclass
class D3POConfig(PreferenceSettings):
    """Settings of one D3PO round; every default is chosen to be safe for a first round."""

    method: ClassVar[str] = "d3po"

    beta: float = setting(
        0.1,
        low=0,
        low_open=True,
        high=100,
        help="Scale of the preference margin Δ; with reduction 'sum' it must be small "
        "(0.1 keeps Δ in the sigmoid's responsive range over a short round).",
    )
    reduction: Reduction = setting(
        "sum",
        help="sum: the true log-density ratio of a step; mean: the official code's "
        "per-dimension average (with ratio clipping its loss sticks near 0.693).",
    )
    ratio_clip: float | None = setting(
        None,
        low=0,
        low_open=True,
        high=0.99,
        help="Clamp each ratio π_θ/π_ref to [1−ε, 1+ε] (no gradient outside); none: off.",
    )
    reference: Literal["base", "previous"] = setting(
        "base",
        help="base: stay close to the original model; previous: to the adapter as the round "
        "starts.",
    )


@dataclass
class DiffusionDPOConfig(PreferenceSettings):
    """Settings of one Diffusion-DPO round."""

    method: ClassVar[str] = "diffusion-dpo"

    beta: float = setting(
        2500.0,
        low=0,
        low_open=True,
        high=1e6,
        help="Scale of the margin on the per-dimension denoising errors (2500: the paper's "
        "value for SD 1.5).",
    )
    noise_draws: int = setting(
        4,
        low=1,
        high=1000,
        help="Noise levels (t, ε) drawn for each pair in a round (4 with implied pairs: 20 a "
        "pick on a 4-grid).",
    )
    pairs: PairMode = setting(
        "implied",
        help="best-worst: one pair a pick; implied: also best > others > worst (2N−3 pairs), "
        "the default: every image of the grid teaches something.",
    )
    timestep_bias: float = setting(
        0.0,
        low=0,
        high=10,
        help="Draw the noise levels toward the noisy end, where an image's layout is "
        "decided: t/T has density (1+b)·s^b; 0: uniform, as in the paper. At 2 it learned "
        "contrast better and colour and detail worse (docs/benchmarks.md §5).",
    )


@dataclass
class SFTConfig(PickSettings):
    """Settings of one round of supervised fine-tuning on the chosen images."""

    method: ClassVar[str] = "sft"

    noise_draws: int = setting(
        20, low=1, high=1000, help="Noise levels (t, ε) drawn for each chosen image in a round."
    )


@dataclass
class DiffusionKTOConfig(PickSettings):
    """Settings of one Diffusion-KTO round: each pick's best image desirable and its worst
    undesirable, each on its own (the pairing unused)."""

    method: ClassVar[str] = "kto"

    epochs: int = setting(
        3,
        low=1,
        high=100,
        help="Passes over the round's items. 3 learned every taste at least as well as 2 on the "
        "taste benchmark (mean win rate 0.85 against 0.80: top-left 0.80, roundness 0.95, "
        "detail 0.81; 0.82 against 0.80 with both on the CPU), at about 1.3× a round's time; "
        "random picks drifted no less. 4 ended level with 3 on the CPU (0.83 against 0.82) at "
        "4/3 the time (docs/benchmarks.md §5).",
    )
    beta: float = setting(
        5000.0,
        low=0,
        low_open=True,
        high=1e6,
        help="Scale of an image's implicit reward, its denoising error per dimension against "
        "the reference's: a larger β saturates an image's loss sooner. 5000 learned tastes as "
        "well as 2500 (Diffusion-DPO's value) and kept random picks within the benchmark's "
        "band; 10000 learned less and drifted most (docs/benchmarks.md §5).",
    )
    noise_draws: int = setting(
        20,
        low=1,
        high=1000,
        help="Noise levels (t, ε) drawn for each labeled image in a round (20: the UNet calls "
        "of Diffusion-DPO's defaults, 40 a pick).",
    )
    replay_spread: bool = setting(
        False,
        help="With replay, train on every earlier pick instead of a random draw of as many as "
        "the new ones, each earlier pick on a share of the noise draws so that together they "
        "cost what replay's draw does: no pick is left out of a round by chance. It learned "
        "less on the taste benchmark (paired −0.07 on 8 runs; docs/benchmarks.md §5).",
    )
    undesirable_weight: float = setting(
        1.0,
        low=0,
        high=10,
        help="Weight of a worst image's loss against a best image's (KTO's λ_U/λ_D). At 0.5 "
        "every taste learned less, at 2 detail collapsed on a seed (docs/benchmarks.md §5).",
    )
    pair_noise: bool = setting(
        False,
        help="Noise a pick's best and worst image with the same (t, ε) at each draw, as "
        "Diffusion-DPO does a pair's; it learned less and drifted more under random picks "
        "(docs/benchmarks.md §5).",
    )
    reference: Literal["base", "halfway", "previous"] = setting(
        "base",
        help="What an image's reward is measured against: base, the original model; "
        "previous, the adapter as the round starts (each round a fresh margin: colour and "
        "contrast learned more, detail collapsed on a seed and random picks moved it); "
        "halfway, that adapter at half strength (learned as base did).",
    )
    noise_levels: Literal["random", "stratified"] = setting(
        "random",
        help="How an image's noise levels are drawn: random, each uniform on its own; "
        "stratified, one from each of noise_draws equal slices of the schedule (it learned "
        "as much, docs/benchmarks.md §5).",
    )
    guided_loss: bool = setting(
        False,
        help="Judge an image by the sampler's prediction, classifier-free guided at the scale "
        "its grid was drawn with, instead of the conditional branch alone (as the paper): the "
        "loss then scores the denoiser the grids come from, at twice the UNet rows. It learned "
        "less on the taste benchmark (docs/benchmarks.md §5).",
    )
    preserve: float = setting(
        0.0,
        low=0,
        high=100,
        help="Prior preservation: weight of a penalty holding the adapter's prediction on the "
        "images a pick left unlabeled (a grid's middle ones, at each item's noise level) to "
        "the base model's, so what the picks did not single out (where a seed's shape lands, "
        "say) stays as the base draws it; 0 is off. Needs grids of 3 or more images; a "
        "training step takes twice the UNet rows. At 0.03 random picks stayed within the taste "
        "benchmark's control band, top-left included, and tastes were learned less (contrast "
        "0.67, detail 0.59 on a seed; docs/benchmarks.md §5).",
    )
    preserve_from: float = setting(
        0.0,
        low=0,
        high=1,
        help="The noise level (t/T) from which prior preservation applies: 0 at every level; "
        "0.5 only on the noisier half of the schedule, where a sample's layout is decided. "
        "At 0.5 (preserve 0.1) a seed learned contrast less (0.64) and random picks drifted "
        "as much the other way: colour is decided at those levels too (docs/benchmarks.md §5).",
    )
    reference_point: Literal["kl", "mean", "grid"] = setting(
        "kl",
        help="What an image's reward is judged against: kl, the batch's mean reward but at "
        "least 0 (KTO's estimate of how far the model moved); mean, the batch's mean reward "
        "as it is, so a model that gets worse at everything gains nothing. mean learned "
        "colour and contrast a little more and detail far less (docs/benchmarks.md §5); "
        "grid, the mean reward of the image's own grid at the same noise level (a group "
        "baseline: what a prompt's images share cancels), at about twice a round's time: it "
        "learned less, roundness fell to 0.25 on a seed, and random picks drifted more.",
    )


@dataclass
class RewardSettings(RoundSettings):
    """Settings of a round on rewards (DDPO's, the official code's choices where they apply;
    P3O takes the same, with ε on the pair's ratio)."""

    learning_rate: float = setting(
        3e-3,
        low=0,
        low_open=True,
        high=1,
        aliases=("--lr",),
        help="AdamW step size; 3e-3 was the best of 3e-4 / 1e-3 / 3e-3 in bench/ablation.py "
        "(PPO's small ε keeps the steps small).",
    )
    epochs: int = setting(1, low=1, high=100, help="Passes over the round's items.")
    grad_accum: int = setting(
        4, low=1, high=1024, help="UNet calls an optimizer step (gradient accumulation)."
    )
    clip_range: float = setting(
        1e-4, low=0, low_open=True, high=0.99, help="PPO's ε on the per-dimension ratio."
    )
    adv_clip: float = setting(
        5.0, low=0, low_open=True, help="Advantages are clipped to [−adv_clip, adv_clip]."
    )
    reduction: Reduction = setting(
        "mean", help="mean: per-dimension log-ratio, as the official code; sum: the whole step."
    )
    min_group: int = setting(
        2, low=1, help="Images a prompt needs in the round for its own mean and std."
    )


@dataclass
class DDPOConfig(RewardSettings):
    """Settings of one DDPO round."""

    method: ClassVar[str] = "ddpo"


@dataclass
class P3OConfig(RewardSettings):
    """Settings of one P3O round: DDPO's, with ε on the pair's per-dimension ratio."""

    method: ClassVar[str] = "p3o"


@dataclass(frozen=True)
class Method:
    name: str
    config: type[RoundSettings]
    inputs: str  # "picks" or "rewards"
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("d3po", D3POConfig, "picks", "D3PO on best/worst picks"),
        Method(
            "diffusion-dpo",
            DiffusionDPOConfig,
            "picks",
            "Diffusion-DPO (noise-level loss) on best/worst picks",
        ),
        Method("sft", SFTConfig, "picks", "supervised fine-tuning on the chosen images"),
        Method(
            "kto",
            DiffusionKTOConfig,
            "picks",
            "Diffusion-KTO (each image alone) on best/worst picks",
        ),
        Method("ddpo", DDPOConfig, "rewards", "DDPO (PPO-clip) on rewards"),
        Method("p3o", P3OConfig, "rewards", "P3O (pairwise PPO) on rewards"),
    )
}


def method_of(config: RoundSettings) -> Method:
    """The registered method whose settings ``config`` is."""
    for method in METHODS.values():
        if type(config) is method.config:
            return method
    raise SettingsError(f"no training method takes {type(config).__name__}")


def config_from_dict(data: dict) -> RoundSettings:
    """A round's stored settings back as its method's config (D3PO when untagged)."""
    method = METHODS.get(data.get("method", "d3po"))
    if method is None:
        raise SettingsError(f"unknown training method {data.get('method')!r}")
    return method.config.from_dict(data)
