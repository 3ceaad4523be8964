"""Reports over a session, computed from its tables (the DataFrames :class:`Session` returns).

They read and never write, so they need no lock beyond the one each ``*_df`` call takes.
"""

from __future__ import annotations

import pandas as pd

from .store import Session

_AGREE = ("grid_id", "agreement", "best_agreement")


def _shared_grids(session: Session) -> pd.DataFrame:
    """One row per grid and pair of labelers who both picked on it (each labeler's latest
    live label of a grid counts: a later tie/skip replaces a pick), with ``agreement`` (same
    best and same worst) and ``best_agreement`` (same best)."""
    picks = session.picks_df()
    latest = picks.sort_values("id").groupby(["grid_id", "labeler"]).tail(1)
    latest = latest.loc[latest["kind"] == "pick", ["grid_id", "labeler", "best", "worst"]]
    pairs = latest.merge(latest, on="grid_id", suffixes=("_a", "_b"))
    pairs = pairs[pairs["labeler_a"] < pairs["labeler_b"]]
    same_best = (pairs["best_a"] == pairs["best_b"]).astype(float)
    same_worst = (pairs["worst_a"] == pairs["worst_b"]).astype(float)
    return pairs.assign(agreement=same_best * same_worst, best_agreement=same_best)


def agreement_df(session: Session) -> pd.DataFrame:
    """Agreement per labeler pair over grids both labeled with a best/worst pick.

    Columns: labeler_a, labeler_b, n_grids, agreement (same best and same worst),
    best_agreement (same best). Empty if no grid has picks from two labelers.
    """
    return (
        _shared_grids(session)
        .groupby(["labeler_a", "labeler_b"], as_index=False)
        .agg(
            n_grids=("grid_id", "size"),
            agreement=("agreement", "mean"),
            best_agreement=("best_agreement", "mean"),
        )
    )


def labelers_df(session: Session) -> pd.DataFrame:
    """Per labeler: live picks, ties and skips, the grids shared with another labeler, and
    how often the others chose the same best and worst there (``agreement``) or the same
    best (``best_agreement``); NaN for someone who shares no grid."""
    picks = session.picks_df()
    columns = ["labeler", "picks", "ties", "skips", "shared_grids", "agreement", "best_agreement"]
    if picks.empty:
        return pd.DataFrame(columns=columns)
    counts = pd.crosstab(picks["labeler"], picks["kind"])
    counts = counts.reindex(columns=["pick", "tie", "skip"], fill_value=0)
    counts.columns = ["picks", "ties", "skips"]
    pairs = _shared_grids(session)
    both = pd.concat(
        [
            pairs.rename(columns={"labeler_a": "labeler"})[["labeler", *_AGREE]],
            pairs.rename(columns={"labeler_b": "labeler"})[["labeler", *_AGREE]],
        ]
    )
    shared = both.groupby("labeler").agg(
        shared_grids=("grid_id", "nunique"),
        agreement=("agreement", "mean"),
        best_agreement=("best_agreement", "mean"),
    )
    table = counts.join(shared, how="left").reset_index()
    table["shared_grids"] = table["shared_grids"].fillna(0).astype(int)
    return table[columns]


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


#: A round whose held-out agreement is below this, or fell by at least AGREEMENT_DROP from
#: the round measured before it, gets a warning. Chosen on the taste benchmark's rounds
#: (docs/benchmarks.md §5): no pair of thresholds makes 8 picks' agreement a sure sign (on
#: examples' prompts 1 in 4 flagged rounds had lost ground, 1 in 5 of all rounds did; on the
#: open prompts 1 in 7, against 1 in 6), so the warning is kept for the clearer cases: at most
#: 2 of 8 picks, or 3 fewer than the round before (12% of the rounds, where 0.5 and 0.2
#: flagged 29%).
AGREEMENT_FLOOR = 0.375
AGREEMENT_DROP = 0.375
#: A round whose training moved its pairs' log-ratios (the round's ``kl`` metric) more than
#: KL_JUMP times as far as the round before it did gets a warning.
KL_JUMP = 4.0


def heldout_df(session: Session) -> pd.DataFrame:
    """Held-out agreement per round: how each round ranked the picks made after it, before
    any round trained on them (measured when the next round trains).

    Columns: round, agreement, picks, measured_by (the round whose training measured it).
    Rounds not measured yet (the newest, until the next round trains) have no row.
    """
    return heldout_of(session.rounds_df())


def heldout_of(rounds: pd.DataFrame) -> pd.DataFrame:
    """:func:`heldout_df` from a ``Session.rounds_df()`` already read."""
    columns = ["round", "agreement", "picks", "measured_by"]
    if "metric_heldout_round" not in rounds:
        return pd.DataFrame(columns=columns)
    measured = rounds.dropna(subset=["metric_heldout_round"])
    return pd.DataFrame(
        {
            "round": measured["metric_heldout_round"].astype("int64"),
            "agreement": measured["metric_heldout_agreement"].astype(float),
            "picks": measured["metric_heldout_picks"].astype("int64"),
            "measured_by": measured["id"].astype("int64"),
        },
        columns=columns,
    ).reset_index(drop=True)


def agreement_flag(
    agreement: float,
    before: float | None,
    floor: float = AGREEMENT_FLOOR,
    drop: float | None = AGREEMENT_DROP,
) -> str | None:
    """Why a round's held-out ``agreement`` gets a warning: "floor" (below ``floor``), "drop"
    (at least ``drop`` under ``before``, the round measured before it; None: no such arm),
    or None. The benchmark's check of the thresholds calls it too."""
    if agreement < floor:
        return "floor"
    if before is not None and drop is not None and agreement <= before - drop + 1e-9:
        return "drop"
    return None


def round_warnings(session: Session, round_id: int) -> tuple[list[str], int | None]:
    """Plain-words warnings after round ``round_id`` trained, and the round to offer a
    rollback to (None: the base model).

    - its training measured the round before it (the one the new picks were labeled on) and
      found its held-out agreement below AGREEMENT_FLOOR, or AGREEMENT_DROP under the round
      measured before that: roll back to the round before the measured one;
    - it moved its log-ratios (``kl``) over KL_JUMP times as far as the round before it:
      roll back to that round.
    """
    rounds = session.rounds_df()
    ids = rounds["id"].tolist()
    warnings: list[str] = []
    target: int | None = None
    records = heldout_of(rounds).to_dict("records")
    this = [r for r in records if r["measured_by"] == round_id]
    if this:
        row = this[-1]
        earlier = [r for r in records if r["round"] < row["round"]]
        before = earlier[-1] if earlier else None
        older = [i for i in ids if i < row["round"]]
        fallback = older[-1] if older else None
        where = f"round {fallback}" if fallback is not None else "the base model"
        share = f"{round(row['agreement'] * row['picks'])} of your {row['picks']} new picks"
        # what the benchmark says such a warning is worth (see AGREEMENT_FLOOR)
        odds = (
            "A few picks make this a weak sign: on the taste benchmark 1 in 7 to 1 in 4 "
            "rounds flagged like this had lost ground (1 in 6 to 1 in 5 of all rounds did), "
            "and most still gained."
        )
        flag = agreement_flag(row["agreement"], None if before is None else before["agreement"])
        if flag == "floor":
            warnings.append(
                f"Round {row['round']} ranked only {share} the way you did "
                f"({row['agreement']:.0%}): it may have moved away from your taste. {odds} "
                f"If its grids look worse, roll back to {where}."
            )
            target = fallback
        elif flag == "drop":
            warnings.append(
                f"Round {row['round']} ranked {share} the way you did "
                f"({row['agreement']:.0%}), fewer than round {before['round']} "
                f"({before['agreement']:.0%}). {odds} If its grids look worse, roll back to "
                f"{where}."
            )
            target = fallback
    if "metric_kl" in rounds and round_id in ids and ids.index(round_id) > 0:
        kl = rounds.set_index("id")["metric_kl"]
        previous = ids[ids.index(round_id) - 1]
        now, then = kl.get(round_id), kl.get(previous)
        if pd.notna(now) and pd.notna(then) and now > KL_JUMP * then > 0:
            warnings.append(
                f"Round {round_id} moved the model {now / then:.0f}× as far from the base as "
                f"round {previous} did: its images may lose variety. A lower learning rate or "
                f"fewer epochs keeps rounds closer; roll back to round {previous} if they look "
                "worse."
            )
            target = previous if target is None else target
    return warnings, target
