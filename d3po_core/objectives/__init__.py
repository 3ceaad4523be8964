"""Objectives that plug into the round loop, registered by method name.

A method says which settings it takes, which stored data it trains on ("picks": the
labeler's best/worst picks; "rewards": a scorer's value per image) and its objective.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SettingsError
from ..rounds import Objective
from ..settings import RoundSettings
from . import d3po, ddpo, diffusion_dpo, p3o


@dataclass(frozen=True)
class Method:
    name: str
    config: type[RoundSettings]
    objective: type[Objective]
    inputs: str  # "picks" or "rewards"
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("d3po", d3po.D3POConfig, d3po.D3POObjective, "picks", "D3PO on best/worst picks"),
        Method(
            "diffusion-dpo",
            diffusion_dpo.DiffusionDPOConfig,
            diffusion_dpo.DiffusionDPOObjective,
            "picks",
            "Diffusion-DPO (noise-level loss) on best/worst picks",
        ),
        Method(
            "sft",
            diffusion_dpo.SFTConfig,
            diffusion_dpo.SFTObjective,
            "picks",
            "supervised fine-tuning on the chosen images",
        ),
        Method(
            "ddpo", ddpo.DDPOConfig, ddpo.DDPOObjective, "rewards", "DDPO (PPO-clip) on rewards"
        ),
        Method("p3o", p3o.P3OConfig, p3o.P3OObjective, "rewards", "P3O (pairwise PPO) on rewards"),
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
