"""Scripted rounds: grids → a scorer → one training round, repeated.

With a method on picks (D3PO) the scorer only ranks each grid (its best and worst become a
pick); with a method on rewards (DDPO, P3O) its values are the rewards.

After each round the scorer is measured on a fixed evaluation set (fixed prompts × fixed
seeds, each image drawn from its own seed), for the base model and the current adapter on the
same noise, so the win rate of tuned vs base is a paired comparison.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .models import base_model, has_lora
from .objectives import method_of
from .rounds import ProgressEvent
from .sampling import SampleSettings, sample_grid
from .scorers import Scorer, score_images
from .session import Session
from .settings import RoundSettings
from .workflow import (
    generate,
    heldout_agreement,
    label_with_scorer,
    load_examples,
    train_round,
)


@dataclass
class EvalSet:
    prompts: list[str]
    seeds: list[int]


def evaluate(pipe, scorer: Scorer, eval_set: EvalSet, settings: SampleSettings) -> list[float]:
    """The scorer on every (prompt, seed) of the set, with the pipeline as it stands."""
    scores: list[float] = []
    one_by_one = replace(settings, shared_noise=False)
    for prompt in eval_set.prompts:
        grid = sample_grid(pipe, prompt, one_by_one, seeds=eval_set.seeds)
        scores += score_images(scorer, grid.images, prompt)
    return scores


def paired_win_rate(tuned: Sequence[float], base: Sequence[float]) -> float:
    """Share of paired samples where tuned beats base; a tie counts half."""
    wins = sum(1.0 if t > b else 0.5 if t == b else 0.0 for t, b in zip(tuned, base, strict=True))
    return wins / len(base)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def simulate(
    pipe,
    session: Session,
    scorer: Scorer,
    prompts: Sequence[str],
    *,
    rounds: int,
    grids: int,
    settings: SampleSettings,
    config: RoundSettings,
    eval_set: EvalSet,
    seed: int = 0,
    on_grid: Callable[[int, int], None] | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    on_round: Callable[[dict], None] | None = None,
    on_measured: Callable[[dict], None] | None = None,
    heldout_last: bool = True,
    labeler: Scorer | None = None,
) -> list[dict]:
    """Run ``rounds`` of (``grids`` grids → scorer → one round); one table row a round.

    D3PO trains on the scorer's best/worst of each grid, DDPO and P3O on its values (by the
    method of ``config``). Row 0 is the starting point (the session's active adapter, or the base
    model); each row counts the images sampled for training so far.

    With a method on picks each row also has ``heldout_agreement``: the share of the next
    round's picks (made before any training on them) that the row's model ranks as the
    scorer did (None for the base model, whose implicit reward is 0). ``on_round`` gets each
    row as soon as it is made (the pipeline then holds the row's model), ``on_measured`` once
    its held-out agreement is known too; for the last row ``heldout_last`` labels one more
    round of grids, measures, and leaves those picks untrained in the session.

    ``labeler`` picks (or rewards) in the scorer's place while the scorer still evaluates:
    e.g. random picks, the control that shows what training moves on its own.
    """
    labeler = labeler or scorer
    with base_model(pipe.unet):
        base_scores = evaluate(pipe, scorer, eval_set, settings)
    start_scores = (
        evaluate(pipe, scorer, eval_set, settings) if has_lora(pipe.unet) else base_scores
    )

    def row(round_id, scores, metrics, seconds) -> dict:
        return {
            "round": round_id,
            "base_mean": _mean(base_scores),
            "tuned_mean": _mean(scores),
            "win_rate": paired_win_rate(scores, base_scores),
            "loss": metrics.get("loss"),
            "accuracy": metrics.get("accuracy"),
            "seconds": seconds,
            "train_seconds": metrics.get("seconds"),
            "images_sampled": sampled,
        }

    on_rewards = method_of(config).inputs == "rewards"
    sampled = 0
    table = [row(session.active_round or 0, start_scores, {}, 0.0)]
    if on_round is not None:
        on_round(table[0])
    prompt_cycle = itertools.cycle(prompts)
    grid_seed = seed

    def label_grids() -> list[tuple[int, list[float]]]:
        nonlocal grid_seed, sampled
        rewarded = []
        for g in range(grids):
            grid_id, grid = generate(pipe, session, next(prompt_cycle), settings, seed=grid_seed)
            grid_seed += settings.n
            sampled += settings.n
            if on_rewards:
                rewarded.append(
                    (grid_id, score_images(labeler, grid.images, grid.trajectory.prompt))
                )
            else:
                label_with_scorer(session, grid_id, labeler)
            if on_grid is not None:
                on_grid(g + 1, grids)
        return rewarded

    def close(last: dict, heldout: dict) -> None:
        """A row is complete once the picks made after it have measured it."""
        last["heldout_agreement"] = heldout.get("heldout_agreement")
        if on_measured is not None:
            on_measured(last)

    for _ in range(rounds):
        start = time.perf_counter()
        rewarded = label_grids()
        round_id, metrics = train_round(
            pipe, session, config, rewarded=rewarded, on_progress=on_progress
        )
        close(table[-1], metrics)
        scores = evaluate(pipe, scorer, eval_set, settings)
        table.append(row(round_id, scores, metrics, time.perf_counter() - start))
        if on_round is not None:
            on_round(table[-1])
    heldout: dict = {}
    if heldout_last and not on_rewards:
        before = sampled
        label_grids()
        sampled = before  # measured, not trained on
        heldout = heldout_agreement(pipe, session, load_examples(session)[1])
    close(table[-1], heldout)
    return table
