"""Speed and memory of the interactive loop: grid latency, round time, recording overhead.

    python bench/speed.py [--model PATH] [--repeats 5] [--json out.json]
    python bench/speed.py --sd15 [--dtype fp16|bf16] [--size 512]    # on a CUDA GPU

Default: the embedded model on this machine's device — a 4-grid at 20 steps, diffusers' plain
pipeline on the same prompt, steps and batch (the recording overhead is the ratio of the two,
measured in the same run), and a D3PO round on 8 picks at the defaults.

``--sd15`` builds a Stable Diffusion 1.5-architecture pipeline with random weights (UNet
860 M, VAE, CLIP ViT-L text encoder; nothing to download), saves it, loads it through the
engine in fp16/bf16 and measures the same overhead ratio at 512 px, round throughput in
(pair·step)/s and peak memory with gradient checkpointing off and on, and the memory a
deep-copied reference UNet would take (the engine disables the adapter instead).
Medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from d3po_core.methods import D3POConfig
from d3po_core.models import assemble_pipeline, default_model, load_pipeline, remove_lora
from d3po_core.objectives.d3po import D3POObjective, Example
from d3po_core.rounds import run_round
from d3po_core.sampling import SampleSettings, sample_grid

PROMPT = "a red circle"


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def grid_vs_plain(pipe, settings: SampleSettings, repeats: int) -> dict:
    """Median seconds of a recorded grid and of diffusers' plain pipeline, and their ratio.

    The two alternate (A, B, A, B, …) after a warm-up of each, so drift in the machine's
    speed touches both alike.
    """
    device = pipe.unet.device

    def ours() -> None:
        sample_grid(pipe, PROMPT, settings, seed=1)

    def plain() -> None:
        pipe(
            PROMPT,
            num_images_per_prompt=settings.n,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            eta=settings.eta,
            height=settings.height,
            width=settings.width,
            generator=[torch.Generator().manual_seed(i) for i in range(settings.n)],
        )

    ours()
    plain()
    grid_times, plain_times = [], []
    for _ in range(repeats):
        grid_times.append(_median_seconds(ours, 1, device))
        plain_times.append(_median_seconds(plain, 1, device))
    grid_s, plain_s = statistics.median(grid_times), statistics.median(plain_times)
    ratios = [g / p for g, p in zip(grid_times, plain_times, strict=True)]
    return {
        "grid_s": round(grid_s, 3),
        "plain_pipeline_s": round(plain_s, 3),
        "recording_overhead_ratio": round(grid_s / plain_s, 3),
        "paired_ratio_median": round(statistics.median(ratios), 3),
    }


def rounds(pipe, settings: SampleSettings, config: D3POConfig, picks: int, repeats: int) -> dict:
    """A D3PO round on ``picks`` picks from a fresh adapter: median seconds, throughput, peak."""
    examples = [
        Example(sample_grid(pipe, PROMPT, settings, seed=100 + 4 * i).trajectory, 0, 1)
        for i in range(picks)
    ]
    metrics = []
    for _ in range(max(1, repeats)):
        remove_lora(pipe.unet)
        metrics.append(run_round(pipe, D3POObjective(examples, config)).metrics)
    seconds = statistics.median(m["seconds"] for m in metrics)
    items = metrics[0]["items"] * config.epochs
    return {
        "picks": picks,
        "round_s": round(seconds, 2),
        "round_s_per_pick": round(seconds / picks, 3),
        "pair_steps_per_s": round(items / seconds, 1),
        "peak_memory_mb": round(max(m["peak_memory_mb"] for m in metrics)),
    }


def clip_config(tokenizer, hidden: int, layers: int, heads: int, **kwargs):
    """A CLIP text encoder's config of the given width and depth for a byte tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max(77, tokenizer.model_max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )


def sd_vae(size: int, **kwargs):
    """Stable Diffusion's VAE architecture (8× down, 4 latent channels), random weights."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=size,
        **kwargs,
    )


def build_sd15(folder: Path, size: int) -> Path:
    """A Stable Diffusion 1.5-architecture pipeline with random weights, saved to ``folder``."""
    from diffusers import DDIMScheduler
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextModel

    from d3po_core.tiny_model import write_byte_tokenizer

    torch.manual_seed(0)
    tokenizer = write_byte_tokenizer(folder / "tokenizer")
    text_encoder = CLIPTextModel(clip_config(tokenizer, 768, 12, 12))
    vae = sd_vae(size)
    # diffusers' UNet2DConditionModel defaults are SD 1.x's, but for the text width
    unet = UNet(sample_size=size // 8, cross_attention_dim=768)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = assemble_pipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def build_sdxl(folder: Path, size: int, device: str = "cpu") -> Path:
    """An SDXL-architecture pipeline with random weights (UNet 2.6 B, CLIP ViT-L and OpenCLIP
    bigG text encoders, VAE), built on ``device`` (fast on a GPU) and saved in fp16."""
    from diffusers import UNet2DConditionModel as UNet
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from d3po_core.tiny_model import assemble_sdxl_pipeline, write_byte_tokenizer

    torch.manual_seed(0)
    tokenizer = write_byte_tokenizer(folder / "tokenizer", max_length=77)
    tokenizer_2 = write_byte_tokenizer(folder / "tokenizer_2", max_length=77)

    with torch.device(device):
        text_encoder = CLIPTextModel(clip_config(tokenizer, 768, 12, 12))
        text_encoder_2 = CLIPTextModelWithProjection(
            clip_config(tokenizer, 1280, 32, 20, projection_dim=1280)
        )
        vae = sd_vae(size, scaling_factor=0.13025)
        unet = UNet(  # SDXL base's configuration
            sample_size=size // 8,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    pipe = assemble_sdxl_pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
    )
    pipe.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return folder


def sd15(args) -> dict:
    device = torch.device(args.device or "cuda")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_sd15(Path(tmp) / "sd15-random", args.size)
        pipe = load_pipeline(folder, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    settings = SampleSettings(
        n=4, steps=args.steps, guidance=7.5, eta=1.0, height=args.size, width=args.size
    )
    result: dict = {"model": f"SD 1.5 architecture, random weights, {args.size} px, {args.dtype}"}
    result["sampling"] = grid_vs_plain(pipe, settings, args.repeats)
    config = D3POConfig()
    for checkpointing in (False, True):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        cfg = replace(config, gradient_checkpointing=checkpointing)
        key = "round_checkpointing_on" if checkpointing else "round_checkpointing_off"
        result[key] = rounds(pipe, settings, cfg, args.picks, max(1, args.repeats // 2))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        reference = copy.deepcopy(pipe.unet)
        torch.cuda.synchronize(device)
        copied = torch.cuda.memory_allocated(device) - before
        del reference
        torch.cuda.empty_cache()
        peak = result["round_checkpointing_off"]["peak_memory_mb"]
        result["reference"] = {
            "adapter_disabled_extra_mb": 0,
            "deep_copied_unet_mb": round(copied / 2**20),
            "saved_share_of_peak": round(copied / 2**20 / (peak + copied / 2**20), 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--device", default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--picks", type=int, default=8, help="picks a benchmarked round")
    parser.add_argument("--sd15", action="store_true", help="SD 1.5 architecture (GPU)")
    parser.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    parser.add_argument("--size", type=int, default=512, help="--sd15 image size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    if args.sd15:
        result = sd15(args)
        device = torch.device(args.device or "cuda")
    else:
        pipe = load_pipeline(args.model or default_model(), device=args.device)
        pipe.set_progress_bar_config(disable=True)
        device = pipe.unet.device
        guidance = args.guidance or pipe.recommended.get("guidance", SampleSettings().guidance)
        settings = SampleSettings(n=4, steps=args.steps, guidance=guidance, eta=1.0)
        result = {"model": pipe.model_id, "guidance": guidance}
        result["sampling"] = grid_vs_plain(pipe, settings, args.repeats)
        result["round"] = rounds(
            pipe, settings, D3POConfig(), args.picks, max(1, args.repeats // 2)
        )
    if device.type == "cuda":
        result["machine"] = f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    else:
        cpu = platform.processor() or platform.machine()
        result["machine"] = f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
