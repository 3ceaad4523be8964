"""Reports over a session, computed from its tables (the DataFrames :class:`Session` returns).

They read and never write, so they need no lock beyond the one each ``*_df`` call takes.
"""

from __future__ import annotations

import pandas as pd

from .store import Session


def agreement_df(session: Session) -> pd.DataFrame:
    """Agreement per labeler pair over grids both labeled with a best/worst pick.

    Each labeler's latest live label of a grid counts (a later tie/skip replaces a pick).
    Columns: labeler_a, labeler_b, n_grids, agreement (same best and same worst),
    best_agreement (same best). Empty if no grid has picks from two labelers.
    """
    picks = session.picks_df()
    latest = picks.sort_values("id").groupby(["grid_id", "labeler"]).tail(1)
    latest = latest.loc[latest["kind"] == "pick", ["grid_id", "labeler", "best", "worst"]]
    pairs = latest.merge(latest, on="grid_id", suffixes=("_a", "_b"))
    pairs = pairs[pairs["labeler_a"] < pairs["labeler_b"]]
    same_best = (pairs["best_a"] == pairs["best_b"]).astype(float)
    same_worst = (pairs["worst_a"] == pairs["worst_b"]).astype(float)
    pairs = pairs.assign(agreement=same_best * same_worst, best_agreement=same_best)
    return pairs.groupby(["labeler_a", "labeler_b"], as_index=False).agg(
        n_grids=("grid_id", "size"),
        agreement=("agreement", "mean"),
        best_agreement=("best_agreement", "mean"),
    )


def win_rates(session: Session) -> pd.DataFrame:
    """Votes per (round_a, round_b) pair: wins (b won), losses, ties, n, and win_rate =
    wins / (wins + losses), NaN when every vote was a tie. round_a <NA> = base."""
    votes = session.comparisons_df()
    winner = votes["winner"]
    counts = votes[["round_a", "round_b"]].assign(
        wins=(winner == "b").astype("int64"),
        losses=(winner == "a").astype("int64"),
        ties=(winner == "tie").astype("int64"),
        n=1,
    )
    df = counts.groupby(["round_a", "round_b"], dropna=False, as_index=False).sum()
    df = df.sort_values(["round_b", "round_a"], na_position="first", ignore_index=True)
    df["round_a"] = df["round_a"].astype("Int64")
    decided = (df["wins"] + df["losses"]).astype(float)
    df["win_rate"] = df["wins"].astype(float) / decided
    return df
