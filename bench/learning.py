"""The paper's headline on the embedded model: D3PO (ranking only) vs DDPO and P3O (reward).

    python bench/learning.py [--seeds 3] [--rounds 3] [--part 1/2] [--report-only]

For JPEG compressibility and incompressibility, each seed runs R rounds of 32 sampled images
(8 grids of 4): D3PO trains on the scorer's best and worst of each grid, DDPO on the scorer's
values (per-prompt normalised advantages), P3O on their differences within a grid; all then
score a fixed evaluation set (4 prompts x 8 seeds) against the untuned model on the same
noise. Runs are cached as JSON in
bench/results/learning, so ``--part i/k`` can split them over processes and a re-run only
reports. Writes docs/img/learning.png and prints the markdown table of docs/benchmarks.md.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import runs
from runs import spec

from d3po_core.settings import DEFAULT_METHOD, SampleSettings

OBJECTIVES = {
    # scorer: (label, sign turning the score into JPEG kB, which way is better)
    "jpeg_compressibility": ("JPEG compressibility", -1.0, "lower is better"),
    "jpeg_incompressibility": ("JPEG incompressibility", 1.0, "higher is better"),
}
METHODS = ("d3po", "diffusion-dpo", "kto", "ddpo")
#: the controls, on random picks: the engine's default method, and KTO at β 2500 (its default
#: until β 5000; the control's drift at each β), at 2 epochs as it ran then
CONTROLS = {
    runs.CONTROL: (DEFAULT_METHOD, {}),
    "random-kto-b2500": ("kto", {"beta": 2500.0, "epochs": 2}),
}
#: every run samples its grids and evaluation set as the engine does by default (the adapter
#: at its default strength), not at runs.SAMPLED_AS
SAMPLING = {"strength": SampleSettings().strength}


def specs(seeds: int, rounds: int) -> list[dict]:
    """Each method at its defaults, and the controls (random picks), sampling as the engine
    does."""
    return [
        spec(variant, objective, method, seed, rounds=rounds, settings=SAMPLING)
        for variant, method in ((m, m) for m in METHODS)
        for seed in range(seeds)
        for objective in OBJECTIVES
    ] + [
        spec(
            variant,
            objective,
            method,
            seed,
            rounds=rounds,
            config=config,
            settings=SAMPLING,
            random_picks=True,
        )
        for variant, (method, config) in CONTROLS.items()
        for seed in range(seeds)
        for objective in OBJECTIVES
    ]


def frame(results: list[dict]) -> pd.DataFrame:
    """One row per (run, round): objective, method, seed, images, kB, base kB, win rate."""
    rows = []
    for r in results:
        sign = OBJECTIVES[r["objective"]][1]
        for row in r["table"]:
            rows.append(
                {
                    "objective": r["objective"],
                    "method": r["variant"],
                    "seed": r["seed"],
                    "images": row["images_sampled"],
                    "score": row["tuned_mean"],
                    "base_score": row["base_mean"],
                    "kb": sign * row["tuned_mean"],
                    "base_kb": sign * row["base_mean"],
                    "win_rate": row["win_rate"],
                    "seconds": row["seconds"],
                }
            )
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Final round per (objective, method): kB and gain (mean and std over seeds), win rate."""
    last = df[df["images"] == df["images"].max()].copy()
    last["gain"] = last["score"] - last["base_score"]
    table = (
        last.groupby(["objective", "method"])
        .agg(
            seeds=("seed", "nunique"),
            base_kb=("base_kb", "mean"),
            kb=("kb", "mean"),
            kb_std=("kb", "std"),
            gain=("gain", "mean"),
            gain_std=("gain", "std"),
            gain_min=("gain", "min"),
            win_rate=("win_rate", "mean"),
            win_rate_min=("win_rate", "min"),
        )
        .reset_index()
    )
    return table


def gain_ratios(table: pd.DataFrame) -> dict[tuple[str, str], float]:
    """Each method on picks: its mean gain over DDPO's, per objective."""
    g = table.set_index(["objective", "method"])["gain"]
    return {
        (o, m): float(g[(o, m)] / g[(o, "ddpo")])
        for o in OBJECTIVES
        for m in METHODS
        if m != "ddpo" and (o, "ddpo") in g and (o, m) in g
    }


def markdown(table: pd.DataFrame, ratios: dict[str, float]) -> str:
    lines = [
        "| objective | method | seeds | base kB | tuned kB (mean ± sd) | change in kB (mean ± sd) "
        "| worst seed's change | win rate vs base (mean, min) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table.itertuples():
        sign = OBJECTIVES[row.objective][1]
        lines.append(
            f"| {OBJECTIVES[row.objective][0]} | {row.method.upper()} | {row.seeds} "
            f"| {row.base_kb:.3f} | {row.kb:.3f} ± {row.kb_std:.3f} "
            f"| {sign * row.gain:+.3f} ± {row.gain_std:.3f} | {sign * row.gain_min:+.3f} "
            f"| {row.win_rate:.2f}, {row.win_rate_min:.2f} |"
        )
    lines.append("")
    for (objective, method), ratio in ratios.items():
        lines.append(
            f"Gain ratio {method.upper()} / DDPO, {OBJECTIVES[objective][0]}: **{ratio:.2f}**"
        )
    return "\n".join(lines)


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(OBJECTIVES), figsize=(5.2 * len(OBJECTIVES), 3.8))
    colours = {
        "d3po": "tab:blue",
        "diffusion-dpo": "tab:purple",
        "ddpo": "tab:orange",
        "kto": "tab:red",
        "p3o": "tab:green",
        runs.CONTROL: "gray",
    }
    for ax, (objective, (label, _sign, better)) in zip(axes, OBJECTIVES.items(), strict=True):
        part = df[df["objective"] == objective]
        if part.empty:
            continue
        for method in (*METHODS, runs.CONTROL):
            m = part[part["method"] == method].groupby("images")["kb"]
            if m.ngroups == 0:
                continue
            mean, std = m.mean(), m.std().fillna(0.0)
            lo, hi = m.min(), m.max()
            ax.plot(mean.index, mean, marker="o", color=colours[method], label=method.upper())
            ax.fill_between(mean.index, mean - std, mean + std, color=colours[method], alpha=0.2)
            ax.plot(lo.index, lo, color=colours[method], lw=0.6, ls=":")
            ax.plot(hi.index, hi, color=colours[method], lw=0.6, ls=":")
        ax.axhline(part["base_kb"].iloc[0], color="gray", ls="--", label="no tuning")
        ax.set_title(f"{label} ({better})")
        ax.set_xlabel("images sampled for training")
        ax.set_ylabel("mean JPEG size of the eval set (kB)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Embedded model: mean ± sd over seeds (dotted: min and max)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(results: list[dict], plot_path: Path) -> None:
    df = frame(results)
    table = summary(df)
    print(markdown(table, gain_ratios(table)))
    plot(df, plot_path)


if __name__ == "__main__":
    runs.main(__doc__.splitlines()[0], specs, report, seeds=3, rounds=3, plot="learning.png")
