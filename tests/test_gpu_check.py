"""bench/gpu_check.py runs end to end on the CPU (the GPU run is the same command there)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _check(tmp_path, *extra):
    out = tmp_path / "check.json"
    args = ["--device", "cpu", "--steps", "4", "--picks", "2", "--repeats", "1", "--json", out]
    done = subprocess.run(
        [sys.executable, "gpu_check.py", *map(str, [*args, *extra])],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done, json.loads(out.read_text())


def test_gpu_check_runs_on_cpu_and_reports_every_check(tmp_path):
    done, r = _check(tmp_path)
    assert r["device_type"] == "cpu" and "| check | measured | goal |" in done.stdout
    assert r["sampling"]["recording_overhead_ratio"] > 0
    # the original loop and the engine train the same (pair, step) passes
    passes = 2 * 4 * 2  # picks × steps × epochs
    assert r["original_loop"]["pair_steps"] == passes
    for name in ("d3po_defaults", "d3po_capped", "d3po_micro8_checkpointing_on"):
        assert r[name]["items"] * 2 == passes and r[name]["pair_steps_per_s"] > 0
    assert r["d3po_micro8_checkpointing_on"]["checkpointing"]
    assert not r["d3po_micro8_checkpointing_off"]["checkpointing"]
    assert r["precision_switch"] == ["fp32", "bf16", "fp32"]
    flops = r["flops"]
    assert flops["unet_forward_per_row_gflop"] > 0 and flops["share_of_peak"] > 0
    assert "Traceback" not in done.stderr


def test_gpu_check_runs_on_an_sdxl_folder(tmp_path, tiny_sdxl):
    done, r = _check(tmp_path, "--model", tiny_sdxl, "--cap-gb", "24")
    assert r["model"] == str(tiny_sdxl) and "--max-memory-gb 24" in done.stdout
    assert r["precision_switch"] == ["fp32", "bf16", "fp32"]
    assert r["original_loop"]["pair_steps"] == r["d3po_defaults"]["items"] * 2
