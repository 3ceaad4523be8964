"""Objectives that plug into the round loop, one per training method.

The methods' settings and registry are torch-free, in :mod:`d3po_core.methods`; here each
method name maps to the :class:`~d3po_core.rounds.Objective` that trains it.
"""

from __future__ import annotations

from ..methods import METHODS, Method, config_from_dict, method_of
from ..rounds import Objective
from . import d3po, ddpo, diffusion_dpo, p3o

OBJECTIVES: dict[str, type[Objective]] = {
    "d3po": d3po.D3POObjective,
    "diffusion-dpo": diffusion_dpo.DiffusionDPOObjective,
    "sft": diffusion_dpo.SFTObjective,
    "kto": diffusion_dpo.KTOObjective,
    "ddpo": ddpo.DDPOObjective,
    "p3o": p3o.P3OObjective,
}
assert OBJECTIVES.keys() == METHODS.keys()

__all__ = ["METHODS", "OBJECTIVES", "Method", "config_from_dict", "method_of"]
