"""Load a diffusers pipeline (local folder or hub id), choose device/dtype, attach a LoRA.

One loading path serves everything: ``from_pretrained`` with ``use_safetensors=True``. Whatever
scheduler a checkpoint names, sampling uses DDIM built from its config, so per-step log-probs
are defined. The reference policy of a D3PO round is the same UNet with its adapter disabled.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict

from .errors import DamagedAdapter, ModelLoadError
from .families import FAMILIES, SUPPORTED_PIPELINES, ModelFamily, family_of_unet
from .session.files import readable
from .settings import LoraSettings, looks_like_hub_id, model_folder

ADAPTER_NAME = "d3po"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def peft_config(settings: LoraSettings) -> LoraConfig:
    """peft's LoraConfig for our adapter settings."""
    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        init_lora_weights="gaussian",
        target_modules=list(settings.targets),
        use_dora=settings.dora,
    )


def default_model() -> str:
    """The model used when none is named: the embedded model shipped with the package."""
    return str(model_folder(None))


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _check_local_folder(path: Path) -> ModelFamily:
    """The model family of a local diffusers folder; one-line errors for anything else."""
    model_folder(path)  # exists, with a model_index.json
    index = path / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ModelLoadError(f"{index} is not valid JSON: {exc}") from None
    return _family_named(class_name, str(path))


def _family_named(class_name: str | None, where: str) -> ModelFamily:
    if class_name not in FAMILIES:
        raise ModelLoadError(
            f"unsupported pipeline class {class_name!r} in {where} "
            f"(supported: {', '.join(SUPPORTED_PIPELINES)})"
        )
    return FAMILIES[class_name]


def _hub_family(name: str) -> ModelFamily:
    """The family a hub id names in its model_index.json (the hub must be reachable)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(name)
    except Exception as exc:
        raise ModelLoadError(_explain_load_failure(name, False, exc)) from exc
    return _family_named(config.get("_class_name"), name)


def assemble_pipeline(*, vae, text_encoder, tokenizer, unet, scheduler) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from its parts, with no safety checker: what the project's
    model builders save as a folder."""
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(
    model: str | Path,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a Stable Diffusion 1.x/2.x or SDXL pipeline from a local folder or a hub id.

    Weights load only from safetensors. The scheduler is replaced by DDIM built from the
    checkpoint's own scheduler config (keeping its prediction type, betas and spacing).
    Raises ModelLoadError with a one-line message on any failure a user can cause.
    """
    name = str(model)
    path = Path(name).expanduser()
    is_local = path.exists() or not looks_like_hub_id(name)
    if is_local:
        family = _check_local_folder(path)
        source = str(path)
    else:
        family = _hub_family(name)
        source = name
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    try:
        with warnings.catch_warnings():
            # newer diffusers renamed torch_dtype to dtype; the old name works across versions
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = family.pipeline_class.from_pretrained(
                source, torch_dtype=dtype, use_safetensors=True, **family.load_kwargs()
            )
    except Exception as exc:  # diffusers raises many types; turn them into one clear line
        raise ModelLoadError(_explain_load_failure(name, is_local, exc)) from exc
    if type(pipe) is not family.pipeline_class:
        raise ModelLoadError(f"unsupported pipeline class {type(pipe).__name__!r} for {name}")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for module in (pipe.unet, *side_modules(pipe)):
        module.requires_grad_(False)
        module.eval()
    pipe.model_id = name
    pipe.recommended = recommended_sampling(source) if is_local else {}
    return pipe


def recommended_sampling(folder: str | Path) -> dict:
    """Sampling settings a model folder recommends (``d3po_defaults.json``), e.g. guidance.

    The embedded model is sharpest at guidance 2; SD checkpoints keep the usual 7.5.
    """
    path = Path(folder) / "d3po_defaults.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    return {k: v for k, v in data.items() if k in ("guidance", "steps", "eta")}


def _explain_load_failure(name: str, is_local: bool, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "safetensors" in text.lower() or "use_safetensors" in text:
        return f"no safetensors weights in {name} (pickled .bin weights are never loaded)"
    if is_local:
        return f"could not load the pipeline in {name}: {text}"
    return (
        f"cannot load hub model {name!r}: the hub is unreachable or the id is unknown "
        f"({type(exc).__name__}); pass a local diffusers folder instead"
    )


def add_lora(
    unet: torch.nn.Module, settings: LoraSettings | None = None, seed: int | None = None
) -> LoraSettings:
    """Attach a trainable LoRA adapter to the UNet (replacing an existing one of ours); with
    ``seed``, its initial weights are drawn from that seed (the global random state is left as
    it was), so a first round is the same whatever ran before it in the process."""
    settings = settings or LoraSettings()
    if ADAPTER_NAME in getattr(unet, "peft_config", {}):
        unet.delete_adapters(ADAPTER_NAME)
    devices = [unet.device] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        unet.add_adapter(peft_config(settings), adapter_name=ADAPTER_NAME)
    unet.set_adapter(ADAPTER_NAME)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name)
        if "lora_" in name:
            param.data = param.data.float()
    return settings


def has_lora(unet: torch.nn.Module) -> bool:
    return ADAPTER_NAME in getattr(unet, "peft_config", {})


def lora_parameters(unet: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def lora_settings_of(unet: torch.nn.Module) -> LoraSettings:
    """The settings of the adapter the UNet carries."""
    config = unet.peft_config[ADAPTER_NAME]
    return LoraSettings(
        rank=config.r,
        alpha=config.lora_alpha,
        targets=sorted(config.target_modules),
        dora=bool(config.use_dora),
    )


def save_lora(unet: torch.nn.Module, directory: str | Path) -> Path:
    """Save the adapter in diffusers' LoRA format (loads with ``pipe.load_lora_weights``)."""
    settings = lora_settings_of(unet)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = convert_state_dict_to_diffusers(
        get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    )
    metadata = peft_config(settings).to_dict()
    metadata["target_modules"] = list(settings.targets)
    family_of_unet(unet).pipeline_class.save_lora_weights(
        directory,
        unet_lora_layers=state,
        safe_serialization=True,
        unet_lora_adapter_metadata=metadata,
    )
    (directory / "lora_settings.json").write_text(json.dumps(asdict(settings)))
    return readable(directory / LORA_WEIGHT_NAME)


def read_lora_settings(directory: str | Path) -> LoraSettings:
    path = Path(directory) / "lora_settings.json"
    if not path.is_file():
        return LoraSettings()
    try:
        return LoraSettings(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:  # not JSON, or not our settings
        raise DamagedAdapter(f"unreadable adapter settings {path}: {exc}") from None


def load_lora(unet: torch.nn.Module, directory: str | Path) -> LoraSettings:
    """Load a saved adapter into the UNet as our trainable adapter (active, enabled)."""
    directory = Path(directory)
    weights = directory / LORA_WEIGHT_NAME
    if not weights.is_file():
        raise DamagedAdapter(f"no LoRA weights at {weights}")
    try:
        state, _alphas = family_of_unet(unet).pipeline_class.lora_state_dict(directory)
    except Exception as exc:
        raise DamagedAdapter(f"corrupt or unreadable LoRA file {weights}: {exc}") from exc
    settings = read_lora_settings(directory)
    add_lora(unet, settings)
    unet_state = {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")}
    try:
        result = set_peft_model_state_dict(
            unet, convert_unet_state_dict_to_peft(unet_state), adapter_name=ADAPTER_NAME
        )
    except RuntimeError as exc:  # shapes of another architecture
        remove_lora(unet)
        first = next((ln.strip() for ln in str(exc).splitlines() if "mismatch" in ln), str(exc))
        message = f"LoRA at {directory} does not fit this UNet ({first[:160]})"
        raise ModelLoadError(message) from None
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise ModelLoadError(f"LoRA at {directory} does not match this UNet ({missing[0]} ...)")
    for param in lora_parameters(unet):
        param.data = param.data.float()
    return settings


def set_lora_enabled(unet: torch.nn.Module, enabled: bool) -> None:
    """Enable or disable our adapter; disabled means the base UNet (the reference policy)."""
    if not has_lora(unet):
        return
    if enabled:
        unet.enable_adapters()
    else:
        unet.disable_adapters()


def remove_lora(unet: torch.nn.Module) -> None:
    if has_lora(unet):
        unet.delete_adapters(ADAPTER_NAME)


@contextlib.contextmanager
def base_model(unet: torch.nn.Module) -> Iterator[None]:
    """Within the block the UNet acts as the base model (our adapter, if any, disabled)."""
    set_lora_enabled(unet, False)
    try:
        yield
    finally:
        set_lora_enabled(unet, True)


#: the adapter's strength in each reference policy a round can take (the adapter as the round
#: starts: "previous"; the original model: "base")
REFERENCE_WEIGHT = {"base": 0.0, "halfway": 0.5, "previous": 1.0}


@contextlib.contextmanager
def scaled_lora(unet: torch.nn.Module, weight: float) -> Iterator[None]:
    """Within the block our adapter acts at ``weight`` times its strength: 0 is the base model,
    1 the adapter as it is, 0.5 halfway between them."""
    if weight == 1 or not has_lora(unet):
        yield
        return
    if weight == 0:
        with base_model(unet):
            yield
        return
    unet.set_adapters([ADAPTER_NAME], weights=[weight])
    try:
        yield
    finally:
        unet.set_adapters([ADAPTER_NAME], weights=[1.0])


def side_modules(pipe) -> list[torch.nn.Module]:
    """The pipeline's modules besides the UNet: the VAE and its text encoder(s)."""
    names = ("vae", "text_encoder", "text_encoder_2")
    return [m for m in (getattr(pipe, n, None) for n in names) if m is not None]


@contextlib.contextmanager
def offloaded(pipe, enabled: bool = True) -> Iterator[None]:
    """Within the block the VAE and text encoder(s) wait on the CPU: a round needs only the
    UNet on the device (the prompts' embeddings are stored with the grids)."""
    device = pipe.unet.device
    modules = side_modules(pipe)
    if not enabled or device.type == "cpu":
        yield
        return
    for module in modules:
        module.to("cpu")
    try:
        yield
    finally:
        for module in modules:
            module.to(device)


def speed_up_unet(
    unet: torch.nn.Module, *, compile_blocks: bool = False, channels_last: bool = False
) -> Callable[[], None]:
    """Options that may speed up the UNet on a GPU, measured by ``bench/gpu_check.py``:
    regional ``torch.compile`` (each down, mid and up block compiled on its own, so a compile
    is short and serves sampling and training alike) and the channels-last memory format.

    Returns a function that undoes them.
    """
    undo: list[Callable[[], None]] = []
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        undo.append(lambda: unet.to(memory_format=torch.contiguous_format))
    if compile_blocks:
        blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
        for block in blocks:
            block.compile()
        undo.append(lambda: [setattr(b, "_compiled_call_impl", None) for b in blocks])

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore
