"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL, in one place.

The sampler, the round loop and every objective call the UNet the same way for any family:
latents, timesteps and a :class:`Cond` — the prompt's token embeddings plus a dict of added
conditioning (empty for SD 1.x/2.x; SDXL's pooled text embedding and its size/crop time
ids). A family says how a prompt becomes a ``Cond``, which diffusers pipeline class loads and
saves it, and how kohya names its UNet's modules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch


@dataclass
class Cond:
    """What the UNet is conditioned on, one row per item: ``embeds`` (B, L, D) and ``added``
    (SDXL: ``text_embeds`` (B, P) and ``time_ids`` (B, 6); SD 1.x/2.x: empty)."""

    embeds: torch.Tensor
    added: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, value: Cond | torch.Tensor) -> Cond:
        return value if isinstance(value, Cond) else cls(value)

    def __getitem__(self, i: int) -> Cond:
        """Row ``i`` (without its batch dimension)."""
        return Cond(self.embeds[i], {k: v[i] for k, v in self.added.items()})

    @classmethod
    def stack(cls, rows: list[Cond | torch.Tensor]) -> Cond:
        """Rows (from ``cond[i]``) as one batch."""
        rows = [cls.of(r) for r in rows]
        return cls(
            torch.stack([r.embeds for r in rows]),
            {k: torch.stack([r.added[k] for r in rows]) for k in rows[0].added},
        )

    @classmethod
    def cat(cls, parts: list[Cond]) -> Cond:
        return cls(
            torch.cat([p.embeds for p in parts]),
            {k: torch.cat([p.added[k] for p in parts]) for k in parts[0].added},
        )

    def expand(self, n: int) -> Cond:
        """A one-row Cond repeated for ``n`` items."""
        return Cond(
            self.embeds.expand(n, *self.embeds.shape[1:]),
            {k: v.expand(n, *v.shape[1:]) for k, v in self.added.items()},
        )

    def to(self, device, dtype: torch.dtype | None = None) -> Cond:
        added = {
            k: v.to(device, dtype if v.is_floating_point() else None) for k, v in self.added.items()
        }
        return Cond(self.embeds.to(device, dtype), added)

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments of the UNet's forward for these rows."""
        kwargs: dict = {"encoder_hidden_states": self.embeds.to(dtype)}
        if self.added:
            kwargs["added_cond_kwargs"] = {k: v.to(dtype) for k, v in self.added.items()}
        return kwargs


class ModelFamily:
    """A family of checkpoints the engine loads: SD 1.x/2.x or SDXL."""

    name = ""
    label = ""
    pipeline_class_name = ""
    upcast_vae = False  # decode in fp32 when the VAE is fp16 and its config asks

    @property
    def pipeline_class(self) -> type:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_kwargs(self) -> dict:
        """Extra ``from_pretrained`` arguments of this family's pipeline."""
        return {}

    def encode(
        self, pipe, prompt: str, negative_prompt: str, guidance: float, size: tuple[int, int]
    ) -> tuple[Cond, Cond | None]:
        """(cond, uncond) of one prompt, one row each, in float32; uncond is None without
        guidance (``guidance ≤ 1``), exactly as diffusers' pipeline encodes them."""
        raise NotImplementedError

    def kohya_module(self, name: str, unet_config) -> str:
        """A peft module name (``down_blocks.1.attentions.0…``) as kohya's files name it,
        before ``lora_unet_`` and the dots-to-underscores of kohya naming."""
        return name


class StableDiffusion(ModelFamily):
    name = "sd"
    label = "Stable Diffusion 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"

    def load_kwargs(self) -> dict:
        return {"safety_checker": None, "requires_safety_checker": False}

    def encode(self, pipe, prompt, negative_prompt, guidance, size):
        use_cfg = guidance > 1
        cond, uncond = pipe.encode_prompt(
            prompt,
            pipe.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=negative_prompt or None,
        )
        return Cond(cond.float()), (Cond(uncond.float()) if use_cfg else None)


class StableDiffusionXL(ModelFamily):
    """SDXL: two text encoders (token embeddings side by side, the second's pooled output) and
    the size/crop conditioning of SDXL's micro-conditioning, at the size sampled, no crop."""

    name = "sdxl"
    label = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    upcast_vae = True

    def encode(self, pipe, prompt, negative_prompt, guidance, size):
        use_cfg = guidance > 1
        cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt,
            device=pipe.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=use_cfg,
            negative_prompt=negative_prompt or None,
        )
        projection = pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids(
            tuple(size), (0, 0), tuple(size), dtype=torch.float32,
            text_encoder_projection_dim=projection,
        )  # fmt: skip
        added = {"text_embeds": pooled.float(), "time_ids": time_ids}
        if not use_cfg:
            return Cond(cond.float(), added), None
        negative = {"text_embeds": uncond_pooled.float(), "time_ids": time_ids.clone()}
        return Cond(cond.float(), added), Cond(uncond.float(), negative)

    _BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(attentions|resnets)\.(\d+)\.")
    #: a resnet's layers in SGM's ResBlock
    _RESNET_LAYERS = {
        "conv1": "in_layers.2",
        "conv2": "out_layers.3",
        "conv_shortcut": "skip_connection",
        "time_emb_proj": "emb_layers.1",
    }

    def kohya_module(self, name: str, unet_config) -> str:
        """SDXL's kohya files use the original (SGM) block names: ``input_blocks.4.1…`` for
        attentions, ``input_blocks.4.0.in_layers.2`` for a resnet's first convolution."""
        per_level = unet_config.layers_per_block + 1
        if name.startswith("mid_block.attentions.0."):
            return "middle_block.1." + name.removeprefix("mid_block.attentions.0.")
        if name.startswith("mid_block.resnets."):
            index, rest = name.removeprefix("mid_block.resnets.").split(".", 1)
            return f"middle_block.{2 * int(index)}.{self._resnet_layer(rest)}"
        match = self._BLOCK.match(name)
        if match is None:
            return name
        kind, level, part, index = match.groups()
        slot = "1" if part == "attentions" else "0"
        if kind == "down_blocks":
            block = f"input_blocks.{per_level * int(level) + int(index) + 1}.{slot}."
        else:
            block = f"output_blocks.{per_level * int(level) + int(index)}.{slot}."
        rest = name[match.end() :]
        return block + (self._resnet_layer(rest) if part == "resnets" else rest)

    def _resnet_layer(self, rest: str) -> str:
        """``conv1.lora_A.weight`` → ``in_layers.2.lora_A.weight``."""
        layer, _, tail = rest.partition(".")
        return ".".join(filter(None, [self._RESNET_LAYERS.get(layer, layer), tail]))


FAMILIES: dict[str, ModelFamily] = {
    f.pipeline_class_name: f for f in (StableDiffusion(), StableDiffusionXL())
}
SUPPORTED_PIPELINES = tuple(FAMILIES)


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline."""
    return FAMILIES[type(pipe).__name__]


def family_of_unet(unet) -> ModelFamily:
    """The family a UNet belongs to, from its config (SDXL's adds text and time embeddings)."""
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return FAMILIES["StableDiffusionXLPipeline"]
    return FAMILIES["StableDiffusionPipeline"]
