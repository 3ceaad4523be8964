"""The fault campaign's figures: every kill point of tests/_campaign.py, repeated.

    python bench/faults.py [--repeats 3]

Each run SIGKILLs the studio's verbs at one phase (generate, label, train, export, compare)
on a fresh session of a tiny random model, reopens the session in a new process that goes on
for a whole cycle, and counts what the two processes confirmed and what of it was lost,
duplicated, mis-attributed or found damaged by ``check``; then two processes label one
session at once (100 picks each; once with one of them killed halfway). Prints the table of
docs/reliability.md. Each run is appended to bench/results/faults.jsonl as it ends, so a
stopped campaign goes on where it was; delete the file to start over.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from d3po_core.tiny_model import build_tiny_pipeline  # noqa: E402
from tests._campaign import KILL_POINTS, KillPoint, run_point, run_two_labelers  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "faults.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS, help="one JSON line a run")
    args = parser.parse_args()
    start = time.perf_counter()
    done = (
        [json.loads(line) for line in args.out.read_text().splitlines()]
        if args.out.exists()
        else []
    )
    seen = {(d["repeat"], d["point"]) for d in done}
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_pipeline(Path(tmp) / "model", prediction_type="epsilon")
        runs = [(r, p.name, p) for r in range(args.repeats) for p in KILL_POINTS]
        runs += [
            (r, f"two labelers{'' if k is None else f', one killed at {k}'}", k)
            for r in range(args.repeats)
            for k in (None, 50)
        ]
        for i, (r, name, what) in enumerate(runs):
            if (r, name) in seen:  # cached: a re-run goes on where a stopped one ended
                continue
            root = Path(tmp) / f"s-{i}"
            if isinstance(what, KillPoint):
                t = run_point(root, model, what)
            else:
                t = run_two_labelers(root, 100, what)
            record = {"repeat": r, **asdict(t), "point": name, "lost": t.lost}
            done.append(record)
            with args.out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            print(f"{name}: lost {t.lost}", file=sys.stderr, flush=True)
    report(pd.DataFrame(done), time.perf_counter() - start)


def report(df: pd.DataFrame, seconds: float) -> None:
    table = df.groupby("point", sort=False).agg(
        runs=("point", "size"),
        confirmed=("confirmed_picks", "sum"),
        lost=("picks_lost", "sum"),
        duplicated=("picks_duplicated", "sum"),
        misattributed=("picks_misattributed", "sum"),
        in_flight=("picks_in_flight", "sum"),
        other_lost=("lost", "sum"),
        went_on=("went_on", "sum"),
    )
    table["other_lost"] -= table[["lost", "duplicated", "misattributed"]].sum(axis=1)
    print("| fault | " + " | ".join(table.columns) + " |")
    print("|---|" + "---|" * len(table.columns))
    for point, row in table.iterrows():
        print(f"| {point} | " + " | ".join(str(int(v)) for v in row) + " |")
    print(
        f"\n{len(df)} runs, {int(df['went_on'].sum())} went on after the fault, "
        f"{int(df['confirmed_picks'].sum())} confirmed picks, {int(df['lost'].sum())} lost, "
        f"duplicated, mis-attributed or damaged; this call {seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
