"""Loading path, error messages and the LoRA adapter lifecycle."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors.torch import load_file

from d3po_core.models import (
    ModelLoadError,
    add_lora,
    base_model,
    load_lora,
    load_pipeline,
    lora_parameters,
    save_lora,
)
from d3po_core.sampling import sample_grid
from d3po_core.settings import LoraSettings

from .conftest import FAST


def _unet_out(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    emb = torch.randn(2, 16, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([500, 20]), encoder_hidden_states=emb).sample


@pytest.mark.parametrize("fixture,kind", [("tiny_eps", "epsilon"), ("tiny_v", "v_prediction")])
def test_any_scheduler_becomes_ddim_keeping_prediction_type(request, fixture, kind):
    folder = request.getfixturevalue(fixture)
    pipe = load_pipeline(folder, device="cpu")
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == kind
    assert pipe.unet.dtype == torch.float32


def test_missing_path_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found") as err:
        load_pipeline(tmp_path / "nope")
    assert "\n" not in str(err.value)


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)


def test_unsupported_pipeline_class(tiny_eps, tmp_path):
    folder = shutil.copytree(tiny_eps, tmp_path / "other")
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="unsupported pipeline class 'KandinskyPipeline'"):
        load_pipeline(folder)


def test_unreachable_hub_id_is_explained():
    with pytest.raises(ModelLoadError, match="cannot load hub model") as err:
        load_pipeline("d3po-studio-tests/no-such-model")
    assert "\n" not in str(err.value)


def test_pickled_weights_are_refused(tiny_eps, tmp_path):
    folder = shutil.copytree(tiny_eps, tmp_path / "pickled")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_pipeline(folder)


def test_disabled_adapter_is_exactly_the_base_unet(pipe):
    before = _unet_out(pipe)
    add_lora(pipe.unet)
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.add_(0.05 * torch.randn_like(p))
    assert not torch.allclose(_unet_out(pipe), before)
    with base_model(pipe.unet):
        assert torch.equal(_unet_out(pipe), before)
    assert not torch.allclose(_unet_out(pipe), before)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_saved_adapter_loads_in_plain_diffusers_with_same_images(pipe, tiny_eps, tmp_path, dora):
    add_lora(pipe.unet, LoraSettings(dora=dora))
    with torch.no_grad():
        for p in lora_parameters(pipe.unet):
            p.add_(0.05 * torch.randn_like(p))
    save_lora(pipe.unet, tmp_path / "lora")
    settings = replace(FAST, shared_noise=False)  # diffusers draws one x_T per generator
    ours = sample_grid(pipe, "a red circle", settings, seed=3).trajectory.latents[:, -1]

    plain = StableDiffusionPipeline.from_pretrained(tiny_eps, use_safetensors=True)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.load_lora_weights(tmp_path / "lora")
    theirs = plain(
        "a red circle",
        num_images_per_prompt=4,
        num_inference_steps=FAST.steps,
        guidance_scale=FAST.guidance,
        eta=FAST.eta,
        generator=[torch.Generator().manual_seed(3 + i) for i in range(4)],
        output_type="latent",
    ).images
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)

    fresh = load_pipeline(tiny_eps, device="cpu")
    assert load_lora(fresh.unet, tmp_path / "lora").dora is dora
    again = sample_grid(fresh, "a red circle", settings, seed=3).trajectory.latents[:, -1]
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=1e-6)


def test_corrupt_adapter_file_is_reported(pipe, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="corrupt or unreadable LoRA"):
        load_lora(pipe.unet, folder)
