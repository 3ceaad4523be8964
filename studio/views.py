"""What the Gradio app and the notebook panels both show: captions, messages and tables.

Plain functions of the controller's results, so the two front ends say the same thing.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from .controller import BlindPair, GridView

#: the rounds' columns worth reading, by the name History shows them under
ROUND_COLUMNS = {
    "id": "Round",
    "active": "Active",
    "created": "Trained",
    "setting_method": "Method",
    "metric_picks": "Picks",
    "metric_loss": "Loss",
    "metric_accuracy": "Accuracy",
    "heldout_agreement": "Held-out agreement",
    "metric_seconds": "Seconds",
}
PICK_COLUMNS = {
    "id": "Pick",
    "grid_id": "Grid",
    "prompt": "Prompt",
    "best": "Best",
    "worst": "Worst",
    "kind": "Kind",
    "labeler": "Labeler",
    "created": "Made",
}
PLOTTED_METRICS = {
    "metric_loss": "loss",
    "metric_accuracy": "accuracy",
    "heldout_agreement": "held-out agreement",
}
LABELER_COLUMNS = {
    "labeler": "Labeler",
    "picks": "Picks",
    "ties": "Ties",
    "skips": "Skips",
    "shared_grids": "Grids shared with others",
    "agreement": "Same best and worst",
    "best_agreement": "Same best",
}
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
    for line in metrics.get("damaged", []):  # a damaged trajectory the round left out
        text += f"\n\n**Left out:** {line[:1].upper()}{line[1:]}."
    for warning in warnings:
        text += f"\n\n**Warning:** {warning}"
    return text


def rollback_label(round_id: int | None) -> str:
    return "Roll back to the base model" if round_id is None else f"Roll back to round {round_id}"


def activated(round_id: int | None) -> str:
    return "Base model active." if round_id is None else f"Round {round_id} active."


def round_ids(rounds: pd.DataFrame) -> list[int]:
    return [int(r) for r in rounds["id"]] if len(rounds) else []


def local_time(stamps: pd.Series) -> pd.Series:
    """UTC timestamps as this machine's local time, to the minute."""
    zone = datetime.now().astimezone().tzinfo
    return stamps.dt.tz_convert(zone).dt.strftime("%Y-%m-%d %H:%M")


def _readable(table: pd.DataFrame, names: dict[str, str], digits: int = 3) -> pd.DataFrame:
    """The named columns, numbers rounded, timestamps local, under their human names."""
    table = table[[c for c in names if c in table]].copy()
    for column in table:
        if pd.api.types.is_datetime64_any_dtype(table[column]):
            table[column] = local_time(table[column])
        elif pd.api.types.is_float_dtype(table[column]):
            table[column] = table[column].round(digits)
    return table.rename(columns=names)


def round_table(rounds: pd.DataFrame) -> pd.DataFrame:
    """The rounds as History shows them: human names, rounded numbers, local time."""
    table = _readable(rounds, ROUND_COLUMNS)
    if "Active" in table:
        table["Active"] = table["Active"].map({True: "yes", False: ""})
    if "Seconds" in table:
        table["Seconds"] = table["Seconds"].round(1)
    return table


def picks_table(picks: pd.DataFrame) -> pd.DataFrame:
    """The picks as History shows them; images are numbered from 1, as on the grid."""
    table = _readable(picks, PICK_COLUMNS)
    for column in ("Best", "Worst"):
        if column in table:
            table[column] = (table[column] + 1).astype("Int64")
    return table


AGREEMENT_COLUMNS = {
    "labeler_a": "Labeler",
    "labeler_b": "and labeler",
    "n_grids": "Grids both picked",
    "agreement": "Same best and worst",
    "best_agreement": "Same best",
}


def agreement_table(agreement: pd.DataFrame) -> pd.DataFrame:
    """How often two labelers chose alike on the grids they both picked."""
    return _readable(agreement, AGREEMENT_COLUMNS, digits=2)


def labelers_table(labelers: pd.DataFrame) -> pd.DataFrame:
    """Each labeler's picks and agreement with the others on the grids they share."""
    return _readable(labelers, LABELER_COLUMNS, digits=2)


def metrics_long(rounds: pd.DataFrame) -> pd.DataFrame:
    """Per-round metrics in long form (round, metric, value)."""
    if not len(rounds):
        return pd.DataFrame({"round": [], "metric": [], "value": []})
    cols = [c for c in PLOTTED_METRICS if c in rounds]
    long = rounds.melt(id_vars="id", value_vars=cols, var_name="metric", value_name="value")
    long["metric"] = long["metric"].map(PLOTTED_METRICS)
    long = long.dropna(subset=["value"])
    return long.rename(columns={"id": "round"})


def metrics_figure(rounds: pd.DataFrame):
    """Every round's loss, accuracy and held-out agreement, a marker per round (one round
    is a point, not an empty plot)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 2.6), layout="constrained")
    axes = figure.subplots()
    long = metrics_long(rounds)
    for metric, part in long.groupby("metric", sort=False):
        axes.plot(part["round"], part["value"], marker="o", label=metric)
    axes.set_xlabel("round")
    axes.set_title("Metrics per round")
    if len(long):
        axes.set_xticks(sorted(long["round"].unique()))
        axes.legend(loc="best", fontsize="small")
    else:
        axes.text(0.5, 0.5, "no rounds yet", ha="center", va="center", transform=axes.transAxes)
    return figure


def crisp(images: list, side: int = 256) -> list:
    """Small images scaled up by a whole factor with nearest neighbour, so the browser shows
    their pixels sharp instead of smoothing a 64 px image into a blur; large ones as they are."""
    from PIL import Image

    out = []
    for image in images:
        factor = -(-side // max(image.size))
        if factor > 1:
            image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
        out.append(image)
    return out


def grid_columns(n: int) -> int:
    """Columns of a grid of n images: at most 8 a row (a laptop-sized window), rows as even
    as they can be, so at most one cell a row is left empty."""
    rows = -(-n // 8)
    return -(-n // rows)


def win_rate_table(rates: pd.DataFrame) -> pd.DataFrame:
    """Each round's wins, losses and ties against the base model."""
    if rates.empty:
        return pd.DataFrame({c: [] for c in WIN_RATE_COLUMNS})
    vs_base = rates[rates["round_a"].isna()]
    return vs_base.rename(columns={"round_b": "round"})[WIN_RATE_COLUMNS]


LOADING_MODEL = "⏳ Loading the model… (the page works already; a grid waits for the model)"


def model_line(info: dict) -> str:
    """The model the studio samples with, in one line."""
    line = (
        f"Model: **{info['model']}** · {info['family']} · {info['width']}×{info['height']} px · "
        f"{info['device']} {info['dtype']}"
    )
    return line + (f" · session `{info['session']}`" if "session" in info else "")
