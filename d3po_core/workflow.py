"""The engine's verbs over a session and a loaded pipeline, shared by the CLI and the studio.

generate a grid → store it; label a grid with a scorer; train a round on the stored picks and
commit its adapter; activate a round (or the base model) in the pipeline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Callable, Sequence

from .errors import DamagedAdapter, DamagedFile, NoPicksError, SessionError
from .mirror import members_of, read_twins, run_members, write_twins
from .models import load_lora, remove_lora, save_lora
from .objectives import METHODS, OBJECTIVES, method_of
from .objectives.d3po import Example
from .objectives.ddpo import RewardExample
from .objectives.implicit import pick_agreement
from .rounds import ProgressEvent, RoundResult, run_round
from .sampling import Grid, SampleSettings, Trajectory, sample_grid
from .scorers import Scorer, score_images, scripted_pick
from .session import Session
from .settings import DEFAULT_METHOD, RoundSettings, check_prompt


def activate(pipe, session: Session, round_id: int | None) -> None:
    """Put a round's adapter (or none: the base model) into the pipeline and the session."""
    if round_id is None:
        remove_lora(pipe.unet)
    else:
        load_lora(pipe.unet, session.round_path(round_id))
    session.set_active_round(round_id)


def sync_active(pipe, session: Session) -> str:
    """Put the session's active round into the pipeline (or none: the base model).

    When the active round's adapter is damaged, the last whole round before it becomes
    active (or the base model), in the session too; the returned line says so (else "").
    An adapter that does not fit this model raises :class:`ModelLoadError`.
    """
    active = session.active_round
    if active is None:
        remove_lora(pipe.unet)
        return ""
    damaged = []
    for round_id in range(active, 0, -1):
        try:
            load_lora(pipe.unet, session.round_path(round_id))
        except DamagedAdapter as exc:
            damaged.append(f"round {round_id} ({exc})")
            continue
        except SessionError:  # no such round (ids are never reused, but may be missing)
            continue
        if round_id == active:
            return ""
        session.set_active_round(round_id)
        return f"{_damaged_line(damaged)}; round {round_id}, the last whole one, is active now"
    remove_lora(pipe.unet)
    session.set_active_round(None)
    return f"{_damaged_line(damaged)}; no whole round is left, so the base model is active now"


def _damaged_line(damaged: list[str]) -> str:
    return "the adapter of " + ", and of ".join(damaged) + " cannot be read"


def generate(
    pipe,
    session: Session,
    prompt: str,
    settings: SampleSettings | None = None,
    *,
    seed: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[int, Grid]:
    """Sample a grid with the active adapter, store it, and return (grid id, grid)."""
    prompt = check_prompt(prompt)
    grid = sample_grid(
        pipe, prompt, settings, seed=seed, adapter_round=session.active_round, on_step=on_step
    )
    traj = grid.trajectory
    grid_id = session.add_grid(
        prompt,
        traj.seeds,
        grid.images,
        traj.to_tensors(),
        model=traj.model_id,
        adapter_round=traj.adapter_round,
        settings=traj.metadata(),
        negative_prompt=traj.settings.negative_prompt,
    )
    return grid_id, grid


def load_trajectory(session: Session, grid_id: int) -> Trajectory:
    return Trajectory.from_tensors(session.load_tensors(grid_id), session.grid(grid_id)["settings"])


def label_with_scorer(
    session: Session, grid_id: int, scorer: Scorer, *, labeler: str = "scorer"
) -> int:
    """Pick best = argmax and worst = argmin of the scorer on a stored grid (a tie if equal)."""
    grid = session.grid(grid_id)
    scores = score_images(scorer, session.load_images(grid_id), grid["prompt"])
    pick = scripted_pick(scores)
    if pick is None:
        return session.add_pick(grid_id, best=None, worst=None, kind="tie", labeler=labeler)
    return session.add_pick(grid_id, best=pick[0], worst=pick[1], labeler=labeler)


def unlabeled_grids(session: Session) -> list[int]:
    grids = session.grids_df()
    picks = session.picks_df()
    labeled = set(picks["grid_id"]) if len(picks) else set()
    return [int(g) for g in grids["id"] if int(g) not in labeled]


def load_examples(
    session: Session,
    *,
    replay: bool = False,
    spread: bool = False,
    seed: int = 0,
    damaged: list[str] | None = None,
) -> tuple[list[Example], list[Example], int]:
    """The picks to train on as Examples, those among them no round has trained on yet (the
    new picks), and the newest pick id. With ``replay``, as many earlier picks as new ones
    (all if fewer), drawn at random by ``seed`` and the round's number, join the new ones;
    with ``spread`` too, every earlier pick joins, each with that many's share of the noise
    draws (``Example.share``). Picks on a grid whose trajectory is damaged are left out, a
    line each in ``damaged``."""
    picks = session.training_picks(since_last_round=True)
    if not picks:
        raise NoPicksError("no new picks to train on: label some grids (best and worst) first")
    new_ids = {p["pick_id"] for p in picks}
    share = 1.0
    if replay:
        earlier = [p for p in session.training_picks(since_last_round=False)]
        earlier = [p for p in earlier if p["pick_id"] not in new_ids]
        if spread:
            kept, share = earlier, min(1.0, len(picks) / max(1, len(earlier)))
        else:
            rng = random.Random(f"{seed}-{session.last_round() or 0}")
            kept = rng.sample(earlier, min(len(earlier), len(picks)))
        picks = sorted(kept, key=lambda p: p["pick_id"]) + picks
    trajectories = readable_trajectories(session, [p["grid_id"] for p in picks], damaged)
    examples = [
        Example(
            trajectories[p["grid_id"]],
            p["best"],
            p["worst"],
            p["pick_id"],
            share=1.0 if p["pick_id"] in new_ids else share,
        )
        for p in picks
        if p["grid_id"] in trajectories
    ]
    new = [ex for ex in examples if ex.pick_id in new_ids]
    if not new:
        raise NoPicksError(
            "every new pick's grid has a damaged trajectory file, so nothing can be trained: "
            "label new grids (`python -m d3po_core check` lists what is whole)"
        )
    return examples, new, max(p["pick_id"] for p in picks)


def readable_trajectories(
    session: Session, grid_ids: Sequence[int], damaged: list[str] | None = None
) -> dict[int, Trajectory]:
    """The trajectories of these grids that can be read, by grid id; a damaged one is left
    out, with a line in ``damaged``."""
    found: dict[int, Trajectory] = {}
    for grid_id in dict.fromkeys(grid_ids):
        try:
            found[grid_id] = load_trajectory(session, grid_id)
        except DamagedFile as exc:
            if damaged is not None:
                damaged.append(f"{exc}: this round leaves it out")
    return found


def heldout_agreement(pipe, session: Session, new: list[Example]) -> dict:
    """How the adapter as it stands (the active round) ranks the new picks it was never
    trained on, as metrics of the round about to train on them: ``heldout_round`` (the round
    measured), ``heldout_agreement`` and ``heldout_picks``; empty on the base model."""
    result = pick_agreement(pipe, new) if session.active_round is not None else None
    if result is None:
        return {}
    return {
        "heldout_round": session.active_round,
        "heldout_agreement": result["agreement"],
        "heldout_picks": result["picks"],
    }


def train_round(
    pipe,
    session: Session,
    config: RoundSettings | None = None,
    *,
    rewarded: Sequence[tuple[int, Sequence[float]]] = (),
    on_progress: Callable[[ProgressEvent], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
    accelerator=None,
) -> tuple[int | None, dict]:
    """Train one round of the config's method and commit its adapter; (round id, metrics).

    A method on picks (D3PO) trains on the picks since the last round (and as many earlier
    ones with ``replay``)
    and first measures the active round's held-out agreement on the new picks;
    one round at a time on a session (another process's round: :class:`SessionBusy`);
    a method on rewards (DDPO, P3O) on ``rewarded``: (grid id, a reward per image) pairs, and
    consumes no picks. Under a multi-process launch only the main process writes the round
    (round id None elsewhere). A cancelled or failed round commits nothing and leaves the
    adapter unchanged.
    """
    config = config or METHODS[DEFAULT_METHOD].config()
    main = accelerator is None or accelerator.is_main_process
    # one round at a time on a session; a launch's other processes follow its main one
    with session.round_lock() if main else contextlib.nullcontext():
        return _train_round(
            pipe, session, config, rewarded, on_progress, should_cancel, accelerator
        )


def _train_round(pipe, session, config, rewarded, on_progress, should_cancel, accelerator):
    method = method_of(config)
    extra: dict = {}
    damaged: list[str] = []
    if method.inputs == "picks":
        examples, new, last_pick_id = load_examples(
            session,
            replay=getattr(config, "replay", False),
            spread=getattr(config, "replay_spread", False),
            seed=config.seed,
            damaged=damaged,
        )
        extra.update(heldout_agreement(pipe, session, new))
    else:
        rewarded = list(rewarded or [])
        found = readable_trajectories(session, [g for g, _ in rewarded], damaged)
        examples = [RewardExample(found[g], list(r)) for g, r in rewarded if g in found]
        if not examples:
            raise NoPicksError("every rewarded grid's trajectory is damaged: nothing to train")
        rounds = session.rounds_df()
        last_pick_id = int(rounds["last_pick_id"].iloc[-1]) if len(rounds) else 0
        extra["grid_ids"] = [g for g, _ in rewarded if g in found]
    if damaged:  # said now, and kept with the round
        extra["damaged"] = damaged
        for line in damaged:
            if on_progress is not None:
                on_progress(ProgressEvent(0, 0, math.nan, math.nan, 0.0, "data", line))
    if getattr(config, "fresh_draws", False):  # the replayed picks drawn afresh too
        config = dataclasses.replace(config, seed=config.seed + (session.last_round() or 0))
    progress = {"on_progress": on_progress, "should_cancel": should_cancel}
    twins = None
    members = members_of(config)
    if members is not None:  # mirror twins or an ensemble, combined into one adapter
        active = session.active_round
        start = read_twins(session.round_path(active), members) if active is not None else None
        result, *kept = run_members(
            pipe,
            lambda picks, own: OBJECTIVES[method.name](picks, own),
            examples,
            config,
            start,
            members,
            accelerator=accelerator,
            **progress,
        )
        twins = (*kept, members)  # (their weights, their adapter settings, which members)
    else:
        result = run_round(
            pipe, OBJECTIVES[method.name](examples, config), accelerator=accelerator, **progress
        )
    metrics = {**result.metrics, **extra}
    if accelerator is not None and not accelerator.is_main_process:
        return None, metrics
    round_id = commit_round(pipe, session, config, result, last_pick_id, extra, twins=twins)
    return round_id, metrics


def commit_round(
    pipe,
    session: Session,
    config: RoundSettings,
    result: RoundResult,
    last_pick_id: int,
    extra: dict | None = None,
    *,
    twins: tuple | None = None,
) -> int:
    """Save the pipeline's adapter as a new round of the session, with its settings and
    metrics (and a round's member adapters: ``(their weights, their adapter settings,
    Members)``, mirror twins or an ensemble's); the round becomes the active one."""
    tmp = session.new_round_dir()
    save_lora(pipe.unet, tmp)
    if twins:
        write_twins(tmp, *twins)
    return session.commit_round(
        tmp,
        settings=config.to_dict(),
        metrics={**result.metrics, "history": result.history, **(extra or {})},
        last_pick_id=last_pick_id,
    )
