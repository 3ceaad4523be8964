"""Ablation that sets the D3PO defaults (and DDPO's learning rate) on the embedded model.

    python bench/ablation.py [--seeds 2] [--rounds 4] [--part 1/2] [--report-only]

JPEG compressibility; every variant sees the same number of sampled images (32 a round: 8
grids of 4, 16 of 2 or 4 of 8). The variants marked "shared x_T" change one thing from the
earlier defaults (one x_T a grid), which this ablation replaced with an x_T per image. D3PO
trains on the new picks only (no replay), as it did when this ran. Runs are cached in
bench/results/ablation.
Prints the markdown table of docs/benchmarks.md and writes docs/img/ablation.png.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import runs
from runs import spec

OBJECTIVE = "jpeg_compressibility"
SHARED = {"shared_noise": True}

#: variant -> (method, config overrides, sampling overrides, what it tests)
VARIANTS: dict[str, tuple[str, dict, dict, str]] = {
    "d3po": ("d3po", {}, {}, "defaults: sum, β 0.1, no clip, x_T per image, best-worst, 4-grids"),
    "shared-noise": ("d3po", {}, SHARED, "one x_T a grid (the D3PO authors'; the old default)"),
    "beta-0.02": ("d3po", {"beta": 0.02}, SHARED, "shared x_T; β 0.02"),
    "beta-0.5": ("d3po", {"beta": 0.5}, SHARED, "shared x_T; β 0.5"),
    "mean": ("d3po", {"reduction": "mean"}, SHARED, "shared x_T; per-dimension mean log-prob"),
    "mean-clip": (
        "d3po",
        {"reduction": "mean", "ratio_clip": 0.1},
        SHARED,
        "shared x_T; the official code's mean log-prob with ratio clip 0.1",
    ),
    "clip": ("d3po", {"ratio_clip": 0.1}, SHARED, "shared x_T; sum with ratio clip 0.1"),
    "implied": ("d3po", {"pairs": "implied"}, SHARED, "shared x_T; implied pairs (2n−3 a pick)"),
    "grid-2": ("d3po", {}, {**SHARED, "n": 2}, "shared x_T; 2-image grids (16 a round)"),
    "grid-8": ("d3po", {}, {**SHARED, "n": 8}, "shared x_T; 8-image grids (4 a round)"),
    "per-image-beta-0.5": ("d3po", {"beta": 0.5}, {}, "β 0.5"),
    "per-image-mean-clip": (
        "d3po",
        {"reduction": "mean", "ratio_clip": 0.1},
        {},
        "the official code's mean log-prob with ratio clip 0.1",
    ),
    "per-image-grid-8": ("d3po", {}, {"n": 8}, "8-image grids (4 a round)"),
    "ddpo": ("ddpo", {}, {}, "DDPO defaults: lr 3e-3, ε 1e-4, 1 epoch, 4 calls a step"),
    "ddpo-shared-noise": ("ddpo", {}, SHARED, "DDPO; shared x_T"),
    "ddpo-lr-1e-3": ("ddpo", {"learning_rate": 1e-3}, SHARED, "DDPO; shared x_T; lr 1e-3"),
    "ddpo-accum-1": ("ddpo", {"grad_accum": 1}, SHARED, "DDPO; shared x_T; a step every call"),
    "ddpo-clip-6e-3": (
        "ddpo",
        {"clip_range": 6.4e-3},
        SHARED,
        "DDPO; shared x_T; ε 6.4e-3, SD 1.5's trust region in summed log-prob",
    ),
}


def specs(seeds: int, rounds: int) -> list[dict]:
    """Every variant; D3PO's on the new picks only, as D3PO trained before replay existed."""
    return [
        spec(
            name,
            OBJECTIVE,
            method,
            seed,
            rounds=rounds,
            config={"replay": False, **config} if method == "d3po" else config,
            settings=settings,
        )
        for seed in range(seeds)
        for name, (method, config, settings, _what) in VARIANTS.items()
    ]


def summary(results: list[dict]) -> pd.DataFrame:
    rows = []
    for r in results:
        first, last = r["table"][0], r["table"][-1]
        rows.append(
            {
                "variant": r["variant"],
                "seed": r["seed"],
                "gain": last["tuned_mean"] - first["base_mean"],
                "win_rate": last["win_rate"],
                "round_s": sum(row["seconds"] for row in r["table"][1:]) / (len(r["table"]) - 1),
            }
        )
    df = pd.DataFrame(rows)
    table = df.groupby("variant", sort=False).agg(
        seeds=("seed", "count"),
        gain=("gain", "mean"),
        gain_std=("gain", "std"),
        win_rate=("win_rate", "mean"),
        round_s=("round_s", "median"),
    )
    table = table.reindex([v for v in VARIANTS if v in table.index])
    return table.astype({"seeds": int})


def markdown(table: pd.DataFrame) -> str:
    lines = [
        "| variant | what changes | seeds | kB saved (mean ± sd) | win rate | s a round |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in table.iterrows():
        lines.append(
            f"| `{name}` | {VARIANTS[name][3]} | {int(row.seeds)} "
            f"| {row.gain:+.3f} ± {row.gain_std:.3f} "
            f"| {row.win_rate:.2f} | {row.round_s:.0f} |"
        )
    return "\n".join(lines)


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colours = ["tab:orange" if VARIANTS[v][0] == "ddpo" else "tab:blue" for v in table.index]
    ax.barh(table.index, table["gain"], xerr=table["gain_std"].fillna(0), color=colours)
    ax.axvline(0, color="gray", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("JPEG kB saved vs no tuning after the last round (mean ± sd over seeds)")
    ax.set_title("Ablation on the embedded model (blue: D3PO, orange: DDPO)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(results: list[dict], plot_path: Path) -> None:
    table = summary(results)
    print(markdown(table))
    plot(table, plot_path)


if __name__ == "__main__":
    runs.main(__doc__.splitlines()[0], specs, report, seeds=2, plot="ablation.png", out="ablation")
