"""What the Gradio app and the notebook panels both show: captions, messages and tables.

Plain functions of the controller's results, so the two front ends say the same thing.
"""

from __future__ import annotations

import pandas as pd

from .controller import BlindPair, GridView

ROUND_COLUMNS = (
    "id",
    "active",
    "created",
    "metric_picks",
    "metric_loss",
    "metric_accuracy",
    "heldout_agreement",
    "metric_seconds",
)
PLOTTED_METRICS = ("metric_loss", "metric_accuracy", "heldout_agreement")
WIN_RATE_COLUMNS = ["round", "wins", "losses", "ties", "win_rate"]
CANCELLED = "Cancelled; nothing was saved and your picks wait for the next round."


def grid_caption(view: GridView) -> str:
    source = "base model" if view.adapter_round is None else f"round {view.adapter_round}"
    return f"Grid {view.grid_id} · “{view.prompt}” · {source} · {view.seconds:.1f} s"


def picks_waiting(count: int) -> str:
    """The counter under the grid (Markdown, which the panels render as HTML)."""
    return f"**{count}** pick(s) since the last round"


def reveal_text(pair: BlindPair) -> str:
    """After a blind vote: which side was the base and which the round."""
    tuned = f"round {pair.round_id}"
    left, right = ("base", tuned) if pair.left_is == "a" else (tuned, "base")
    return f"Left was **{left}**, right was **{right}**."


def progress_text(event) -> str:
    if event.message:
        return event.message[:1].upper() + event.message[1:]
    return f"step {event.step}/{event.total}, ETA {event.eta_s:.0f} s"


def curve_rows(event) -> list[dict]:
    """One progress event as rows of the loss/accuracy curve (step, metric, value)."""
    return [
        {"step": event.step, "metric": "loss", "value": event.loss},
        {"step": event.step, "metric": "accuracy", "value": event.accuracy},
    ]


def round_saved(round_id: int, metrics: dict, warnings: list[str] = ()) -> str:
    """The Train result: the round's loss and accuracy, the held-out agreement its training
    measured on the round before it, and any warning (one paragraph each)."""
    text = (
        f"Round {round_id} saved and active: loss {metrics['loss']:.4f}, "
        f"accuracy {metrics['accuracy']:.2f}, {metrics['seconds']:.1f} s."
    )
    if metrics.get("heldout_agreement") is not None:
        n = metrics["heldout_picks"]
        agreed = round(metrics["heldout_agreement"] * n)
        text += (
            f"\n\nHeld-out agreement of round {metrics['heldout_round']}: it ranked {agreed} of "
            f"your {n} new picks the way you did ({metrics['heldout_agreement']:.0%}) before "
            "training on them."
        )
    for warning in warnings:
        text += f"\n\n**Warning:** {warning}"
    return text


def rollback_label(round_id: int | None) -> str:
    return "Roll back to the base model" if round_id is None else f"Roll back to round {round_id}"


def activated(round_id: int | None) -> str:
    return "Base model active." if round_id is None else f"Round {round_id} active."


def round_ids(rounds: pd.DataFrame) -> list[int]:
    return [int(r) for r in rounds["id"]] if len(rounds) else []


def round_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """The rounds with the columns worth reading."""
    return rounds[[c for c in ROUND_COLUMNS if c in rounds]]


def picks_table(picks: pd.DataFrame) -> pd.DataFrame:
    return picks.drop(columns=["created"], errors="ignore")


def metrics_long(rounds: pd.DataFrame) -> pd.DataFrame:
    """Per-round metrics in long form (round, metric, value) for a line plot."""
    if not len(rounds):
        return pd.DataFrame({"round": [], "metric": [], "value": []})
    cols = [c for c in PLOTTED_METRICS if c in rounds]
    long = rounds.melt(id_vars="id", value_vars=cols, var_name="metric", value_name="value")
    long["metric"] = long["metric"].str.removeprefix("metric_").str.replace("_", " ")
    long = long.dropna(subset=["value"])
    return long.rename(columns={"id": "round"})


def win_rate_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Each round's wins, losses and ties against the base model."""
    if rates.empty:
        return pd.DataFrame({c: [] for c in WIN_RATE_COLUMNS})
    vs_base = rates[rates["round_a"].isna()]
    return vs_base.rename(columns={"round_b": "round"})[WIN_RATE_COLUMNS]


def model_line(info: dict) -> str:
    """The model the studio samples with, in one line."""
    return (
        f"Model: **{info['model']}** · {info['family']} · {info['width']}×{info['height']} px · "
        f"{info['device']} {info['dtype']}"
    )
