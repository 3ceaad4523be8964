"""Memory: the plan as a function of budget, model and resolution; micro-batches that leave
a round's result unchanged; out-of-memory retried; any precision in one process."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from d3po_core.memory import GiB, module_bytes, plan_memory, plan_round, row_bytes
from d3po_core.methods import D3POConfig, DiffusionDPOConfig
from d3po_core.models import lora_parameters, remove_lora
from d3po_core.objectives.d3po import D3POObjective, Example
from d3po_core.objectives.diffusion_dpo import DiffusionDPOObjective
from d3po_core.rounds import OutOfMemory, run_round
from d3po_core.sampling import sample_grid

from .conftest import FAST

SD15 = SimpleNamespace(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    transformer_layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
)
SDXL = SimpleNamespace(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
)
WEIGHTS_SD15 = int(2.09 * GiB)  # SD 1.5's UNet, VAE and text encoder in bf16, and workspace


def unet_like(config, dtype=torch.bfloat16):
    return SimpleNamespace(config=config, dtype=dtype)


def sd15_plan(budget_gb, *, rows=4, batch=8, latent=64, **kwargs):
    unet = unet_like(SD15)
    return plan_memory(
        budget_bytes=None if budget_gb is None else int(budget_gb * GiB),
        fixed_bytes=WEIGHTS_SD15,
        row_bytes_plain=row_bytes(unet, (latent, latent), checkpointed=False),
        row_bytes_checkpointed=row_bytes(unet, (latent, latent), checkpointed=True),
        rows_per_item=rows,
        batch_size=batch,
        **kwargs,
    )


@pytest.mark.parametrize(
    "micro,ckpt,measured_gb",
    [(1, False, 6.5), (4, False, 19.7), (8, False, 37.3), (8, True, 10.4), (16, False, 72.6)],
)
def test_estimate_matches_the_measured_sd15_rounds(micro, ckpt, measured_gb):
    """The H100 measurements (SD 1.5 at 512 px, bf16, D3PO: 4 rows an item) the plan is
    calibrated on, within 5 %."""
    plan = sd15_plan(None, batch=micro, checkpointing=ckpt)
    assert plan.micro_batch == micro
    assert plan.peak_bytes / GiB == pytest.approx(measured_gb, rel=0.05)


def test_an_8_gb_card_gets_a_plan_within_8_gb_and_a_big_card_the_whole_batch():
    small = sd15_plan(8)
    assert small.peak_bytes <= 8 * GiB
    assert small.gradient_checkpointing and small.micro_batch == 4
    big = sd15_plan(72)
    assert big.micro_batch == 8 and big.peak_bytes <= 72 * GiB
    # checkpointing saves > 1 GiB at 8 items (measured both smaller and faster there)
    assert big.gradient_checkpointing
    # forced off, the whole batch needs a bigger card
    forced = sd15_plan(72, checkpointing=False)
    assert (forced.micro_batch, forced.gradient_checkpointing) == (8, False)
    assert sd15_plan(24, checkpointing=False).micro_batch == 4
    assert sd15_plan(12, checkpointing=False).micro_batch == 2


def test_plan_shrinks_with_budget_resolution_and_model_size():
    budgets = [sd15_plan(gb).micro_batch for gb in (3, 4, 6, 8, 12, 80)]
    assert budgets == sorted(budgets) and budgets[0] < budgets[-1]
    assert sd15_plan(8, latent=96).micro_batch < sd15_plan(8, latent=64).micro_batch
    sdxl, sd15 = unet_like(SDXL), unet_like(SD15)
    assert row_bytes(sdxl, (128, 128), checkpointed=True) > 3 * row_bytes(
        sd15, (64, 64), checkpointed=True
    )


def test_offloading_the_vae_and_text_encoder_only_when_it_lets_more_fit():
    need_one = WEIGHTS_SD15 + 4 * row_bytes(unet_like(SD15), (64, 64), checkpointed=True)
    offload = int(0.4 * GiB)
    tight = sd15_plan((need_one - offload // 2) / GiB, offload_bytes=offload)
    assert tight.offload and tight.micro_batch == 1
    assert not sd15_plan(8, offload_bytes=offload).offload


def test_nothing_fits_gives_the_smallest_plan_and_says_so():
    plan = sd15_plan(1)
    assert (plan.micro_batch, plan.gradient_checkpointing) == (1, True)
    assert "exceeds" in plan.reason


def test_micro_batch_setting_caps_the_plan():
    assert sd15_plan(80, micro_batch=3).micro_batch == 3
    assert sd15_plan(None, batch=8, micro_batch=100).micro_batch == 8


# -- on the tiny model ----------------------------------------------------------------------


@pytest.fixture
def examples(pipe):
    grids = [sample_grid(pipe, "a red circle", FAST, seed=10 * i) for i in range(3)]
    return [Example(g.trajectory, best=i % 4, worst=(i + 1) % 4) for i, g in enumerate(grids)]


def test_cpu_without_a_cap_trains_the_whole_batch_and_a_cap_splits_it(pipe, examples):
    objective = D3POObjective(examples, D3POConfig())
    assert objective.rows_per_item() == 4  # a pair, with guidance
    free = plan_round(pipe, latent_hw=(8, 8), rows_per_item=4, batch_size=8)
    assert (free.micro_batch, free.gradient_checkpointing, free.budget_bytes) == (8, False, None)
    weights = module_bytes(pipe.unet, pipe.vae, pipe.text_encoder)
    one_item = row_bytes(pipe.unet, (8, 8), checkpointed=False) * 4
    cap = (weights + 2.5 * one_item) / GiB
    args = {"latent_hw": (8, 8), "rows_per_item": 4, "batch_size": 8, "max_memory_gb": cap}
    capped = plan_round(pipe, **args, checkpointing=False)
    assert capped.micro_batch == 2 and capped.peak_bytes <= cap * GiB
    auto = plan_round(pipe, **args)  # checkpointing lets the whole batch fit instead
    assert (auto.micro_batch, auto.gradient_checkpointing) == (8, True)
    assert auto.peak_bytes <= cap * GiB


def _fresh_adapter(pipe):
    remove_lora(pipe.unet)
    torch.manual_seed(0)  # the adapter's initial weights


def _round_weights(pipe, examples, config, **kwargs):
    _fresh_adapter(pipe)
    result = run_round(pipe, D3POObjective(examples, config), **kwargs)
    return result, [p.detach().clone() for p in lora_parameters(pipe.unet)]


def test_micro_batches_give_the_round_the_whole_batch_gives(pipe, examples):
    config = D3POConfig(epochs=1, batch_size=8, grad_accum=2, learning_rate=1e-2)
    whole, w_whole = _round_weights(pipe, examples, config)
    split, w_split = _round_weights(pipe, examples, replace(config, micro_batch=3))
    assert (whole.metrics["micro_batch"], split.metrics["micro_batch"]) == (8, 3)
    _assert_same_round(whole, w_whole, split, w_split, config.learning_rate)


def _assert_same_round(a, weights_a, b, weights_b, step: float):
    """Same loss and gradient norms (the gradient's scale, which Adam's step hides), and the
    same weights: only the UNet's float rounding at another batch size differs. Adam moves a
    weight whose gradient is near 0 by about ``step`` in its gradient's sign, which rounding
    can flip, so a few weights may differ by up to two steps; the rest agree within a tenth
    of a step."""
    for metric in ("loss", "grad_norm"):
        assert a.metrics[metric] == pytest.approx(b.metrics[metric], rel=1e-3)
    gap = torch.cat(
        [(wa - wb).abs().flatten() for wa, wb in zip(weights_a, weights_b, strict=True)]
    )
    assert float((gap > 0.1 * step).float().mean()) <= 0.01, gap.topk(5)
    assert float(gap.max()) <= 2 * step


def _oom_above(objective, limit: int, where: str = "terms"):
    original = getattr(objective, where)

    def failing(pipe, batch):
        batches = batch if isinstance(batch, list) else [batch]
        if any(len(b.items) > limit for b in batches):
            torch.ones(1).mul_(2)  # some work was done before the device ran out
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(pipe, batch)

    setattr(objective, where, failing)
    return objective


@pytest.mark.parametrize("where", ["terms", "prepare"])
def test_out_of_memory_halves_the_micro_batch_and_loses_nothing(pipe, examples, where):
    config = D3POConfig(epochs=1, batch_size=8, learning_rate=1e-2)
    expected, w_expected = _round_weights(pipe, examples, config)
    _fresh_adapter(pipe)
    events = []
    objective = _oom_above(D3POObjective(examples, config), 2, where)
    result = run_round(pipe, objective, on_progress=events.append)
    weights = [p.detach() for p in lora_parameters(pipe.unet)]
    assert result.metrics["micro_batch"] == 2 and result.metrics["oom_retries"] == 2
    messages = [e.message for e in events if e.phase == "memory"]
    assert messages == [
        "out of memory: retrying the batch with micro-batch 8 → 4",
        "out of memory: retrying the batch with micro-batch 4 → 2",
    ]
    _assert_same_round(expected, w_expected, result, weights, config.learning_rate)


def test_out_of_memory_at_one_item_turns_checkpointing_on_then_fails_cleanly(pipe, examples):
    config = DiffusionDPOConfig(epochs=1, batch_size=4)
    run_round(pipe, DiffusionDPOObjective(examples, config))
    before = [p.detach().clone() for p in lora_parameters(pipe.unet)]
    events = []
    objective = _oom_above(DiffusionDPOObjective(examples, config), 0)
    with pytest.raises(OutOfMemory, match="even one item at a time"):
        run_round(pipe, objective, on_progress=events.append)
    assert [e.message for e in events][-1].endswith("gradient checkpointing on")
    assert not pipe.unet.is_gradient_checkpointing
    for a, b in zip(before, lora_parameters(pipe.unet), strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rounds_at_any_precision_in_one_process(tiny_eps, dtype):
    """accelerate keeps one precision a process: a round at another resets it (fp32 → bf16 →
    fp32 here; fp16 → bf16 on a GPU is the same path)."""
    from d3po_core.models import load_pipeline

    pipe = load_pipeline(tiny_eps, device="cpu", dtype=dtype)
    grid = sample_grid(pipe, "a red circle", FAST, seed=3)
    examples = [Example(grid.trajectory, best=0, worst=1)]
    losses = []
    for precision in ("no", "bf16", "no"):
        config = D3POConfig(epochs=2, batch_size=4, mixed_precision=precision)
        losses.append(run_round(pipe, D3POObjective(examples, config)).metrics["loss"])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[2] < losses[0]  # the rounds built on each other


def test_speed_up_options_keep_the_samples_and_undo(pipe):
    """Regional compile and channels-last (measured by bench/gpu_check.py) change speed only."""
    from d3po_core.models import speed_up_unet

    settings = replace(FAST, n=2, steps=2)
    before = sample_grid(pipe, "a red circle", settings, seed=1).trajectory.latents
    restore = speed_up_unet(pipe.unet, compile_blocks=True, channels_last=True)
    fast = sample_grid(pipe, "a red circle", settings, seed=1).trajectory.latents
    restore()
    after = sample_grid(pipe, "a red circle", settings, seed=1).trajectory.latents
    torch.testing.assert_close(fast, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, before)
    assert all(b._compiled_call_impl is None for b in pipe.unet.down_blocks)


def test_front_ends_show_a_memory_note_and_do_not_plot_it(ctl):
    from d3po_core.rounds import ProgressEvent
    from studio.panels import TrainPanel

    panel = TrainPanel(ctl)
    message = "out of memory: retrying the batch with micro-batch 8 → 4"
    panel._on_progress(ProgressEvent(0, 4, float("nan"), float("nan"), 0.0, "memory", message))
    assert panel.eta.value == "Out of memory: retrying the batch with micro-batch 8 → 4"
    assert panel.history == []
