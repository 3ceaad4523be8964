"""Build tiny Stable Diffusion and SDXL pipeline folders with random weights.

They have the exact layout of a hub checkpoint (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/, safetensors weights; SDXL also text_encoder_2/ and tokenizer_2/), so
they exercise the same loading path as a real model without any download. Used by the tests
for epsilon and v-prediction checkpoints and for SDXL's architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from .models import assemble_pipeline

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 byte-level symbols of GPT-2/CLIP BPE, in their canonical order."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def write_byte_tokenizer(directory: Path, max_length: int = 16) -> CLIPTokenizer:
    """A CLIP BPE tokenizer with only byte symbols (no merges): every character is a token."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + [BOS, EOS])}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return CLIPTokenizer.from_pretrained(directory)


def _text_config(tokenizer: CLIPTokenizer, **kwargs) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def _tiny_vae(image_size: int) -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )


def build_tiny_pipeline(
    out_dir: str | Path,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    image_size: int = 32,
    scheduler: str = "pndm",
) -> Path:
    """Write a random-weight StableDiffusionPipeline folder to ``out_dir`` and return it.

    ``scheduler`` names the scheduler saved in the folder ("pndm" like SD 1.5, or "ddim"),
    so tests can check that sampling switches to DDIM from any checkpoint's config.
    """
    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_byte_tokenizer(out / "tokenizer")
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    vae = _tiny_vae(image_size)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    common = dict(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    sched = (
        PNDMScheduler(skip_prk_steps=True, **common)
        if scheduler == "pndm"
        else DDIMScheduler(clip_sample=False, **common)
    )
    pipe = assemble_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sched
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def build_tiny_sdxl_pipeline(out_dir: str | Path, *, seed: int = 0, image_size: int = 32) -> Path:
    """Write a random-weight StableDiffusionXLPipeline folder to ``out_dir`` and return it.

    SDXL's architecture in miniature: two text encoders (the second with a projection, whose
    pooled output and the six size/crop numbers feed the UNet's added embedding), token
    embeddings side by side (cross-attention width 32 + 32), a transformer depth that grows
    with the level, and SDXL's Euler scheduler config.
    """
    out = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_byte_tokenizer(out / "tokenizer")
    tokenizer_2 = write_byte_tokenizer(out / "tokenizer_2")
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, projection_dim=16))
    unet = UNet2DConditionModel(
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=64,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
        norm_num_groups=8,
    )
    pipe = assemble_sdxl_pipeline(
        vae=_tiny_vae(image_size),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def assemble_sdxl_pipeline(**parts) -> StableDiffusionXLPipeline:
    """An SDXL pipeline from its parts (VAE, both text encoders and tokenizers, UNet) with
    SDXL base's scheduler config (Euler, scaled-linear betas, "leading" spacing)."""
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(scheduler=scheduler, **parts)
