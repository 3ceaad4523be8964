"""SDXL through the same engine: a tiny random SDXL-architecture folder (two text encoders,
pooled embeddings, size/crop time ids) sampled, trained, exported and loaded back in plain
diffusers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from safetensors.torch import load_file

from d3po_core.__main__ import main
from d3po_core.errors import ModelLoadError
from d3po_core.export import export_kohya
from d3po_core.families import family_of
from d3po_core.methods import D3POConfig, DiffusionDPOConfig
from d3po_core.models import (
    add_lora,
    load_lora,
    load_pipeline,
    lora_parameters,
    save_lora,
)
from d3po_core.objectives.d3po import D3POObjective, Example
from d3po_core.objectives.diffusion_dpo import DiffusionDPOObjective
from d3po_core.rounds import run_round
from d3po_core.sampling import Trajectory, recompute_log_probs, sample_grid
from d3po_core.settings import LoraSettings

from .conftest import FAST

SETTINGS = replace(FAST, n=2)
PROMPT = "a red circle"


@pytest.fixture
def xl(tiny_sdxl):
    return load_pipeline(tiny_sdxl, device="cpu")


def _plain(folder) -> StableDiffusionXLPipeline:
    plain = StableDiffusionXLPipeline.from_pretrained(folder, use_safetensors=True)
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    return plain


def _plain_latents(plain, settings, seed: int) -> torch.Tensor:
    return plain(
        PROMPT,
        num_images_per_prompt=settings.n,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        eta=settings.eta,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(settings.n)],
        output_type="latent",
    ).images


def test_an_sdxl_folder_loads_as_its_family_with_ddim(xl, tiny_sdxl):
    assert type(xl).__name__ == "StableDiffusionXLPipeline" and family_of(xl).label == "SDXL"
    assert isinstance(xl.scheduler, DDIMScheduler)  # from the folder's Euler config
    assert xl.scheduler.config.timestep_spacing == "leading"
    index = tiny_sdxl / "model_index.json"
    data = json.loads(index.read_text())
    broken = tiny_sdxl.parent / "other"
    broken.mkdir()
    (broken / "model_index.json").write_text(json.dumps({**data, "_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match="supported: StableDiffusionPipeline, Stable"):
        load_pipeline(broken, device="cpu")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_reproduces_diffusers_sdxl_pipeline(xl, tiny_sdxl, eta):
    """Same seeds, same DDIM steps: the final latents agree to float32 rounding (1e-5)."""
    settings = replace(SETTINGS, eta=eta)
    ours = sample_grid(xl, PROMPT, settings, seed=4).trajectory.latents[:, -1]
    theirs = _plain_latents(_plain(tiny_sdxl), settings, seed=4)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_trajectory_keeps_sdxl_conditioning_and_log_probs_recompute(xl):
    traj = sample_grid(xl, PROMPT, SETTINGS, seed=1).trajectory
    assert traj.added_cond["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]
    assert traj.added_cond["text_embeds"].shape == (1, 16)
    assert set(traj.negative_added_cond) == {"text_embeds", "time_ids"}
    # stored and read back (the session's safetensors), the log-probs recompute exactly
    again = Trajectory.from_tensors(traj.to_tensors(), traj.metadata())
    torch.testing.assert_close(again.added_cond["text_embeds"], traj.added_cond["text_embeds"])
    torch.testing.assert_close(recompute_log_probs(xl, again), traj.log_probs, atol=1e-6, rtol=0)


def _margin(pipe, traj, best, worst, reference) -> float:
    """Σ over steps of the winner's minus the loser's log-ratio to the reference."""
    ratio = recompute_log_probs(pipe, traj) - reference
    return float((ratio[best] - ratio[worst]).sum())


def test_a_d3po_round_raises_the_winners_log_ratio(xl):
    grids = [sample_grid(xl, PROMPT, SETTINGS, seed=10 * i) for i in range(3)]
    examples = [Example(g.trajectory, best=0, worst=1) for g in grids]
    base = [recompute_log_probs(xl, g.trajectory) for g in grids]
    config = D3POConfig(epochs=4, batch_size=4, learning_rate=1e-2)
    torch.manual_seed(0)  # the adapter's initial weights, whatever ran before
    result = run_round(xl, D3POObjective(examples, config))
    assert result.metrics["loss_last"] < result.history[0]["loss"]
    margins = [_margin(xl, g.trajectory, 0, 1, b) for g, b in zip(grids, base, strict=True)]
    # on balance, and on most picks (one can move back while three train together)
    assert sum(margins) > 0 and sum(m > 0 for m in margins) >= 2


def test_diffusion_dpo_round_and_the_adapter_in_plain_diffusers(xl, tiny_sdxl, tmp_path):
    grid = sample_grid(xl, PROMPT, SETTINGS, seed=2)
    config = DiffusionDPOConfig(epochs=2, batch_size=4, learning_rate=1e-2)
    run_round(xl, DiffusionDPOObjective([Example(grid.trajectory, 0, 1)], config))
    with torch.no_grad():  # a visible change, so equal images mean the adapter arrived
        for p in lora_parameters(xl.unet):
            p.add_(0.05 * torch.randn_like(p))
    ours = sample_grid(xl, PROMPT, SETTINGS, seed=7).trajectory.latents[:, -1]

    save_lora(xl.unet, tmp_path / "lora")
    plain = _plain(tiny_sdxl)
    base = _plain_latents(plain, SETTINGS, seed=7)
    assert (base - ours).abs().max() > 1e-3
    plain.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_plain_latents(plain, SETTINGS, seed=7), ours, atol=1e-5, rtol=0)

    kohya = export_kohya(xl.unet, tmp_path / "xl.safetensors")
    keys = list(load_file(kohya))
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in keys)
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    plain = _plain(tiny_sdxl)
    plain.load_lora_weights(kohya)
    torch.testing.assert_close(_plain_latents(plain, SETTINGS, seed=7), ours, atol=1e-5, rtol=0)


def test_a_conv_adapter_in_kohya_form_loads_in_plain_diffusers(xl, tiny_sdxl, tmp_path):
    """An adapter on the resnets' convolutions too (conv1/conv2) exports with SGM's names
    (``input_blocks.1.0.in_layers.2``) and gives the same images in plain diffusers."""
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    add_lora(xl.unet, LoraSettings(targets=targets))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_parameters(xl.unet):
            p.add_(0.05 * torch.randn_like(p))
    ours = sample_grid(xl, PROMPT, SETTINGS, seed=7).trajectory.latents[:, -1]
    kohya = export_kohya(xl.unet, tmp_path / "xl-conv.safetensors")
    keys = list(load_file(kohya))
    assert any(k.startswith("lora_unet_input_blocks_1_0_in_layers_2.") for k in keys)
    assert any(k.startswith("lora_unet_middle_block_2_out_layers_3.") for k in keys)
    assert any(k.startswith("lora_unet_output_blocks_0_0_in_layers_2.") for k in keys)
    assert not any("resnets" in k or "conv1" in k for k in keys)
    plain = _plain(tiny_sdxl)
    base = _plain_latents(plain, SETTINGS, seed=7)
    assert (base - ours).abs().max() > 1e-3
    plain.load_lora_weights(kohya)
    torch.testing.assert_close(_plain_latents(plain, SETTINGS, seed=7), ours, atol=1e-5, rtol=0)


def test_an_sdxl_adapter_is_refused_by_an_sd_model_in_one_line(xl, pipe, tmp_path):
    add_lora(xl.unet)
    save_lora(xl.unet, tmp_path / "xl")
    with pytest.raises(ModelLoadError, match="does not (fit|match) this UNet"):
        load_lora(pipe.unet, tmp_path / "xl")


def test_cli_generate_label_train_export_on_sdxl(tiny_sdxl, tmp_path, capsys):
    base = ["--session", str(tmp_path / "s"), "--model", str(tiny_sdxl)]
    small = ["--grid-size", "2", "--steps", "4", "--guidance", "5"]
    assert main(["generate", *base, "--prompt", PROMPT, "--grids", "2", "--seed", "3", *small]) == 0
    assert (
        main(["label", "--session", str(tmp_path / "s"), "--scorer", "jpeg_incompressibility"]) == 0
    )
    assert main(["train", *base, "--epochs", "1", "--batch-size", "4"]) == 0
    assert "round 1 committed" in capsys.readouterr().out
    out = tmp_path / "xl-kohya.safetensors"
    assert main(["export", *base, "--kohya", str(out)]) == 0
    assert any("input_blocks" in k for k in load_file(out))


def test_studio_and_panels_show_the_family_and_size(tiny_sdxl, tmp_path):
    from studio import views
    from studio.controller import StudioController
    from studio.panels import LabelPanel

    ctl = StudioController(tmp_path / "s", model=str(tiny_sdxl), device="cpu")
    try:
        info = ctl.model_info()
        assert (info["family"], info["width"], info["height"]) == ("SDXL", 32, 32)
        line = views.model_line(info)
        assert "SDXL · 32×32 px · cpu float32" in line and str(tiny_sdxl) in line
        assert "SDXL" in LabelPanel(ctl).model.value
        view = ctl.generate(PROMPT, 2, seed=1)
        ctl.pick(view.grid_id, best=0, worst=1)
        round_id, metrics = ctl.train(DiffusionDPOConfig(epochs=1, batch_size=4))
        assert round_id == 1 and metrics["picks"] == 1
        base, tuned = ctl.compare(1, PROMPT, [5])
        assert base[0].size == tuned[0].size == (32, 32)
    finally:
        ctl.close()


def test_ddpo_round_on_sdxl_moves_the_adapter(xl):
    from d3po_core.methods import DDPOConfig
    from d3po_core.objectives.ddpo import DDPOObjective, RewardExample

    grids = [sample_grid(xl, PROMPT, SETTINGS, seed=20 + 2 * i).trajectory for i in range(2)]
    rewarded = [RewardExample(t, [1.0, 0.0]) for t in grids]
    torch.manual_seed(0)
    config = DDPOConfig(epochs=1, batch_size=4, learning_rate=1e-2)
    result = run_round(xl, DDPOObjective(rewarded, config))
    assert torch.isfinite(torch.tensor(result.metrics["loss"])) and result.metrics["items"] > 0
    trained = [p for n, p in xl.unet.named_parameters() if "lora_B" in n]  # zero at first
    assert trained and any(torch.count_nonzero(p) > 0 for p in trained)
