"""Build a tiny Stable Diffusion pipeline folder with random weights.

It has the exact layout of a hub checkpoint (model_index.json, unet/, vae/, text_encoder/,
tokenizer/, scheduler/, safetensors weights), so it exercises the same loading path as a real
model without any download. Used by the tests for epsilon and v-prediction checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
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
