"""DDIM sampling that records each image's denoising trajectory and per-step log-probs.

The step is a function of the scheduler's numbers (not a scheduler subclass):

    x̂0 = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t                 (v-prediction is converted first)
    σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)
    μ   = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ_t²)·ε̂
    x_{t−1} ~ N(μ, σ_t² I)

Training evaluates the same two functions (``guided_model_output`` and ``ddim_step``) on the
stored transitions, so the ratio π_θ/π_ref is that of the policy that drew the images.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDIMScheduler
from PIL import Image

from .errors import ModelLoadError, SettingsError
from .families import Cond, family_of
from .models import scaled_lora
from .settings import SampleSettings

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepResult:
    prev_sample: torch.Tensor
    log_prob: torch.Tensor  # (B,) float64, summed over latent dimensions
    mean: torch.Tensor
    std: torch.Tensor  # (B, 1, 1, 1)


def previous_timesteps(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """The DDIM predecessor of each timestep, as diffusers' DDIMScheduler.step defines it."""
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    return timesteps - stride


def _alpha_bar(scheduler: DDIMScheduler, t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if scheduler.alphas_cumprod.device != device:  # once: diffusers' add_noise does the same
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    alphas = scheduler.alphas_cumprod.float()
    final = float(scheduler.final_alpha_cumprod)  # a CPU scalar: no copy to the device
    t = t.to(device)
    return torch.where(t >= 0, alphas[t.clamp(min=0)], final)


def ddim_step(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    timesteps: torch.Tensor,
    sample: torch.Tensor,
    eta: float,
    *,
    prev_sample: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> StepResult:
    """One DDIM step for a batch whose items may sit at different timesteps.

    With ``prev_sample`` given, returns its log-prob under the step's Gaussian (training);
    otherwise draws it with ``noise`` (sampling). Log-probs are summed over latent dims and
    are zero when σ = 0 (η = 0 is deterministic and has no density).
    """
    if scheduler.config.thresholding:
        raise ModelLoadError("dynamic thresholding is not supported by the log-prob step")
    device = sample.device
    shape = (-1,) + (1,) * (sample.ndim - 1)
    a_t = _alpha_bar(scheduler, timesteps, device).view(shape)
    a_prev = _alpha_bar(scheduler, previous_timesteps(scheduler, timesteps), device).view(shape)
    # The mean in float32 matches diffusers' DDIMScheduler bit for bit; the density is
    # summed in float64 so that small policy/reference differences survive the sum.
    x = sample.float()
    out = model_output.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = out
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    elif kind == "v_prediction":
        x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    elif kind == "sample":
        x0 = out
        eps = (x - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    else:
        raise ModelLoadError(f"unsupported prediction_type {kind!r}")
    if scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        x0 = x0.clamp(-limit, limit)  # ε̂ stays unclipped, as in diffusers' default
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if prev_sample is None:
        prev = mean if noise is None or eta == 0 else mean + std * noise.float()
        prev_sample = prev.to(sample.dtype)
    log_prob = gaussian_log_prob(
        prev_sample.to(torch.float64), mean.to(torch.float64), std.to(torch.float64)
    )
    return StepResult(prev_sample, log_prob, mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Σ_d log N(x_d; μ_d, σ²) per batch item; zero where σ = 0."""
    safe = torch.where(std > 0, std, torch.ones_like(std))
    per_dim = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - HALF_LOG_2PI
    per_dim = torch.where(std > 0, per_dim, torch.zeros_like(per_dim))
    return per_dim.flatten(1).sum(1)


def guided_model_output(
    unet: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Cond | torch.Tensor,
    uncond: Cond | torch.Tensor | None,
    guidance: float,
) -> torch.Tensor:
    """The UNet's (classifier-free guided) prediction, in float32, for a batch of items.

    cond/uncond hold one row per item (token embeddings, or a :class:`Cond` with a model
    family's added conditioning). Guidance is on when ``guidance > 1`` and an unconditional
    row is given, exactly as in diffusers' pipelines. The UNet runs in its own dtype (no
    autocast: around half-precision weights it only costs time).
    """
    dtype = unet.dtype
    cond = Cond.of(cond)
    if uncond is not None and guidance > 1:
        both = Cond.cat([Cond.of(uncond), cond])
        out = unet(
            torch.cat([latents, latents]).to(dtype),
            torch.cat([timesteps, timesteps]),
            **both.unet_kwargs(dtype),
        ).sample.float()
        out_uncond, out_cond = out.chunk(2)
        return out_uncond + guidance * (out_cond - out_uncond)
    return unet(latents.to(dtype), timesteps, **cond.unet_kwargs(dtype)).sample.float()


@dataclass
class Trajectory:
    """The denoising trajectories of one grid: what a D3PO round trains on.

    latents: (N, T+1, C, h, w) float32, x_T … x_0 per image.
    timesteps: (T,) the DDIM timesteps, in sampling order.
    log_probs: (N, T) log π(x_{t−1} | x_t) recorded while sampling (summed over latent dims).
    prompt_embeds / negative_embeds: (1, L, D), once per grid (negative is None without CFG).
    added_cond / negative_added_cond: the model family's added conditioning, (1, ...) each
    (SDXL: pooled text embedding and time ids; empty for SD 1.x/2.x).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    prompt: str
    seeds: list[int]
    settings: SampleSettings
    model_id: str = ""
    adapter_round: int | None = None
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)
    negative_added_cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return self.latents.shape[0]

    @property
    def cond(self) -> Cond:
        """The prompt's conditioning, one row."""
        return Cond(self.prompt_embeds, self.added_cond)

    @property
    def uncond(self) -> Cond | None:
        """The negative prompt's conditioning, one row (None without guidance)."""
        if self.negative_embeds is None:
            return None
        return Cond(self.negative_embeds, self.negative_added_cond)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "latents": self.latents.contiguous(),
            "timesteps": self.timesteps.contiguous(),
            "log_probs": self.log_probs.contiguous(),
            "prompt_embeds": self.prompt_embeds.contiguous(),
        }
        if self.negative_embeds is not None:
            tensors["negative_embeds"] = self.negative_embeds.contiguous()
        for prefix, added in (
            ("added.", self.added_cond),
            ("negative_added.", self.negative_added_cond),
        ):
            tensors.update({prefix + k: v.contiguous() for k, v in added.items()})
        return tensors

    def metadata(self) -> dict:
        return {
            "prompt": self.prompt,
            "seeds": self.seeds,
            "sample_settings": asdict(self.settings),
            "model_id": self.model_id,
            "adapter_round": self.adapter_round,
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], metadata: dict) -> Trajectory:
        return cls(
            latents=tensors["latents"],
            timesteps=tensors["timesteps"],
            log_probs=tensors["log_probs"],
            prompt_embeds=tensors["prompt_embeds"],
            negative_embeds=tensors.get("negative_embeds"),
            prompt=metadata["prompt"],
            seeds=list(metadata["seeds"]),
            settings=SampleSettings(**metadata["sample_settings"]),
            model_id=metadata.get("model_id", ""),
            adapter_round=metadata.get("adapter_round"),
            added_cond=_prefixed(tensors, "added."),
            negative_added_cond=_prefixed(tensors, "negative_added."),
        )

    def metadata_json(self) -> str:
        return json.dumps(self.metadata())


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class Grid:
    images: list[Image.Image]
    trajectory: Trajectory
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def encode_prompt(
    pipe, prompt: str, negative_prompt: str, guidance: float, size: tuple[int, int] | None = None
) -> tuple[Cond, Cond | None]:
    """(cond, uncond) of one prompt, one row each, as the pipeline's model family encodes it
    (``size``: the (height, width) sampled, which SDXL conditions on); uncond is None
    without guidance."""
    if size is None:
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
        size = (side, side)
    return family_of(pipe).encode(pipe, prompt, negative_prompt, guidance, size)


def initial_noise(
    seeds: Sequence[int], shape: tuple[int, ...], shared: bool, steps: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_T for each image, shape (N, *shape), and the noise of its ``steps`` denoising steps,
    shape (steps, N, *shape).

    Image i's generator is seeded with seeds[i] and draws its x_T, then each step's noise in
    order, as diffusers' pipeline does with a list of CPU generators, so a seed gives
    diffusers' images, on any device. With ``shared`` every image starts from image 0's x_T.
    Drawing it all at once lets sampling copy it to the device once.
    """
    x_t, step_noise = [], []
    for s in seeds:
        generator = torch.Generator().manual_seed(int(s))
        x_t.append(torch.randn((1, *shape), generator=generator))
        step_noise.append(torch.randn((steps, 1, *shape), generator=generator))
    noise = torch.cat(x_t)
    if shared:
        noise = noise[:1].expand_as(noise).clone()
    return noise, torch.cat(step_noise, dim=1)


def _to_device(tensor: torch.Tensor, device: torch.device, pinned: bool) -> torch.Tensor:
    """A CPU tensor on the device; from pinned memory the copy does not wait for the device."""
    if pinned:
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@torch.no_grad()
def sample_grid(
    pipe,
    prompt: str,
    settings: SampleSettings | None = None,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    adapter_round: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Grid:
    """Sample images for one prompt in one batch, recording their trajectories.

    Seeds: image i uses ``seeds[i]``; given seeds set how many images (any number: an
    evaluation batch, one image of a blind pair). Without them a grid of ``settings.n``
    images uses ``seed + i`` (a random seed when none given).
    """
    settings = settings or SampleSettings()
    start = time.perf_counter()
    if seeds is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else int(seed)
        seeds = [seed + i for i in range(settings.n)]
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise SettingsError("no seeds given: nothing to sample")
    unet, scheduler = pipe.unet, pipe.scheduler
    device = unet.device
    height = settings.height or unet.config.sample_size * pipe.vae_scale_factor
    width = settings.width or unet.config.sample_size * pipe.vae_scale_factor
    shape = (
        unet.config.in_channels,
        height // pipe.vae_scale_factor,
        width // pipe.vae_scale_factor,
    )
    cond, uncond = encode_prompt(
        pipe, prompt, settings.negative_prompt, settings.guidance, (height, width)
    )
    scheduler.set_timesteps(settings.steps, device=device)
    timesteps = scheduler.timesteps.clone()
    noise, step_noise = initial_noise(
        seeds, shape, settings.shared_noise, len(timesteps) if settings.eta > 0 else 0
    )
    pinned = device.type == "cuda"
    x = _to_device(noise * scheduler.init_noise_sigma, device, pinned)
    step_noise = _to_device(step_noise, device, pinned)
    n = len(seeds)
    cond_b = cond.expand(n)
    uncond_b = uncond.expand(n) if uncond is not None else None
    # everything stays on the device until the end: no host sync a step
    latents, log_probs = [x.float()], []
    with scaled_lora(unet, settings.strength):  # the adapter's weight while sampling
        for i, t in enumerate(timesteps):
            t_batch = t.expand(n)
            out = guided_model_output(unet, x, t_batch, cond_b, uncond_b, settings.guidance)
            result = ddim_step(
                scheduler,
                out,
                t_batch,
                x.float(),
                settings.eta,
                noise=step_noise[i] if settings.eta > 0 else None,
            )
            x = result.prev_sample
            latents.append(x.float())
            log_probs.append(result.log_prob)
            if on_step is not None:
                on_step(i + 1, len(timesteps))
    images = decode_latents(pipe, x)
    trajectory = Trajectory(
        latents=torch.stack(latents, dim=1).cpu(),
        timesteps=timesteps.cpu(),
        log_probs=torch.stack(log_probs, dim=1).cpu(),
        prompt_embeds=cond.embeds.cpu(),
        negative_embeds=uncond.embeds.cpu() if uncond is not None else None,
        prompt=prompt,
        seeds=seeds,
        settings=settings,
        model_id=getattr(pipe, "model_id", ""),
        adapter_round=adapter_round,
        added_cond={k: v.cpu() for k, v in cond.added.items()},
        negative_added_cond={k: v.cpu() for k, v in uncond.added.items()} if uncond else {},
    )
    return Grid(images=images, trajectory=trajectory, seconds=time.perf_counter() - start)


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> list[Image.Image]:
    """VAE-decode final latents to PIL images, as diffusers' pipeline does."""
    vae = pipe.vae
    dtype = vae.dtype
    upcast = (
        dtype == torch.float16
        and family_of(pipe).upcast_vae
        and getattr(vae.config, "force_upcast", False)
    )
    if upcast:  # SDXL's VAE overflows in fp16: decoded in fp32, as diffusers' pipeline does
        vae.to(torch.float32)
    try:
        scaled = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        image = vae.decode(scaled).sample
    finally:
        if upcast:
            vae.to(dtype)
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


@torch.no_grad()
def recompute_log_probs(pipe, trajectory: Trajectory) -> torch.Tensor:
    """Log-probs of every stored transition under the pipeline's current weights: (N, T)."""
    unet, scheduler = pipe.unet, pipe.scheduler
    s = trajectory.settings
    scheduler.set_timesteps(s.steps, device=unet.device)
    n = trajectory.n
    rows = []
    cond = trajectory.cond.to(unet.device).expand(n)
    uncond = trajectory.uncond
    uncond = uncond.to(unet.device).expand(n) if uncond is not None else None
    for k, t in enumerate(trajectory.timesteps.to(unet.device)):
        x_t = trajectory.latents[:, k].to(unet.device)
        x_prev = trajectory.latents[:, k + 1].to(unet.device)
        out = guided_model_output(unet, x_t, t.expand(n), cond, uncond, s.guidance)
        rows.append(ddim_step(scheduler, out, t.expand(n), x_t, s.eta, prev_sample=x_prev).log_prob)
    return torch.stack(rows, dim=1).cpu()
