"""bench/repeat.py: on the CPU a round, trained twice from the same picks and seed, repeats
bit for bit, with torch's deterministic kernels or without (the GPU run is the same command)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize("extra", [[], ["--deterministic"]], ids=["default", "deterministic"])
def test_a_round_repeats_on_the_cpu(tmp_path, extra):
    out = tmp_path / "repeat.json"
    args = ["--picks", "2", "--steps", "4", "--json", str(out), *extra]
    done = subprocess.run(
        [sys.executable, "repeat.py", *args],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["deterministic"] is bool(extra)
    assert ("deterministic kernels" in r["machine"]) is bool(extra)
    # the round changed what is drawn, so a difference of 0 below is a real repeat
    assert r["trained_vs_base_max_pixel_diff"] > 0 and r["adapter_max_abs"] > 0
    assert r["base_grid_max_pixel_diff"] == 0
    assert r["adapter_max_diff"] == 0.0
    assert r["grid_max_pixel_diff"] == 0 and r["grid_pixels_differing"] == 0.0
    assert "| a round's adapter, trained twice | 0 " in done.stdout
