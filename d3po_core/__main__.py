"""Headless CLI: ``python -m d3po_core {generate,label,train,simulate,export,check}``.

Each command's options are settings dataclasses (d3po_core.settings) parsed by one
``SettingsParser``: the sampling settings, a method's round settings, the adapter's and the
command's own. ``simulate --method ddpo|p3o`` trains a reward-based baseline with the scorer
as reward. ``train`` also runs unchanged under ``accelerate launch`` (multi-GPU data parallel).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import D3POError, RoundCancelled, SettingsError, report_unexpected
from .settings import (
    DEFAULT_METHOD,
    LoraSettings,
    ModelArgs,
    SampleSettings,
    SessionArgs,
    Settings,
    SettingsParser,
    setting,
    spec,
)


@dataclass
class GenerateArgs(Settings):
    """Generate"""

    prompt: str = setting(help="The prompt of the grids.")
    grids: int = setting(1, low=1, high=10_000, help="How many grids.")
    seed: int | None = setting(None, low=0, help="First seed; none: random.")


@dataclass
class LabelArgs(Settings):
    """Label"""

    scorer: str = setting(help="Built-in name, pkg.module:fn or file.py:fn (best = max).")
    labeler: str = setting("scorer", help="Name recorded with each pick.")


@dataclass
class TrainArgs(Settings):
    """Train"""

    method: str = setting(
        DEFAULT_METHOD, help="How to train on the picks: d3po, diffusion-dpo, sft or kto."
    )


@dataclass
class SimulateArgs(Settings):
    """Simulate"""

    scorer: str = setting(
        help="Built-in name, pkg.module:fn or file.py:fn (D3PO: its ranking; DDPO/P3O: its "
        "values as rewards)."
    )
    prompts: str = setting(help="A prompts file (one a line) or one prompt.")
    method: str = setting(
        DEFAULT_METHOD,
        help="How to train: d3po, diffusion-dpo, sft or kto on the scorer's picks, or ddpo / p3o "
        "with the scorer as reward.",
    )
    rounds: int = setting(3, low=1, high=1000, help="Rounds to run.")
    grids: int = setting(8, low=1, high=10_000, help="Grids a round.")
    eval_prompts: str | None = setting(
        None, help="A prompts file or text; none: the first 4 prompts."
    )
    eval_seeds: int = setting(
        16,
        low=1,
        high=10_000,
        help="Fixed seeds of the evaluation set (4 prompts × 16 = 64 paired samples: a win "
        "rate's steps of 1/64 can tell a real gain from noise).",
    )
    grid_seed: int = setting(0, low=0, help="Seed of the first training grid.")
    json: str | None = setting(None, help="Also write the table as JSON here.")


@dataclass
class ExportArgs(Settings):
    """Export"""

    round: int | None = setting(None, low=1, help="Round id; none: the active one.")
    lora: str | None = setting(None, help="Folder for the diffusers/peft LoRA.")
    kohya: str | None = setting(None, help="File for the A1111/ComfyUI LoRA.")
    picks: str | None = setting(None, help="Picks as .parquet or .jsonl.")
    strength: float = setting(
        SampleSettings.strength,
        low=0,
        high=3,
        aliases=("--adapter-strength",),
        help="The adapter's strength in the exported LoRA (its up weights scaled), so that "
        "loaded at weight 1 it draws what sampling at this strength draws; the default is "
        "the one grids sample at.",
    )


def _method(name: str):
    from .objectives import METHODS

    if name not in METHODS:
        raise SettingsError(f"unknown --method {name!r} (choose from {', '.join(METHODS)})")
    return METHODS[name]


def _prompts(text: str) -> list[str]:
    """A prompts file (one a line) if the argument names one, else the text itself."""
    path = Path(text)
    if path.suffix in (".txt", ".csv") or path.is_file():
        if not path.is_file():
            raise SettingsError(f"prompts file not found: {path}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise SettingsError(
                f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8"
            ) from None
        prompts = [line.strip() for line in lines if line.strip()]
    else:
        prompts = [text.strip()] if text.strip() else []
    if not prompts:
        raise SettingsError(f"no prompts in {text!r}")
    return prompts


def _load(model: ModelArgs, session, device=None):
    from .models import default_model, load_pipeline
    from .workflow import sync_active

    pipe = load_pipeline(model.model or default_model(), device=device or model.device)
    said = sync_active(pipe, session)
    if said:  # a damaged adapter: an earlier round (or the base) is active now
        print(f"warning: {said}", file=sys.stderr)
    return pipe


def _sampling(settings: SampleSettings, given: set[str], pipe) -> SampleSettings:
    """The model's recommended sampling settings for what the command line left unset."""
    recommended = {k: v for k, v in pipe.recommended.items() if k not in given}
    return replace(settings, **recommended)


def _step_bar(desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit="step", leave=False)

    def update(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()
        if step == total:
            bar.reset()

    return bar, update


def _train_bar():
    from tqdm.auto import tqdm

    bar = tqdm(desc="round", unit="step")

    def update(event) -> None:
        if event.message:  # e.g. out of memory: a smaller micro-batch
            bar.write(event.message)
            return
        bar.total = event.total
        bar.n = event.step
        bar.set_postfix(loss=f"{event.loss:.4f}", acc=f"{event.accuracy:.2f}")

    return bar, update


def cmd_generate(parsed: tuple, given: set[str]) -> None:
    from tqdm.auto import tqdm

    from .session import Session
    from .workflow import generate

    where, model, settings, args = parsed
    with Session.open(where.session) as session:
        pipe = _load(model, session)
        settings = _sampling(settings, given, pipe)
        bar, on_step = _step_bar("sampling")
        for g in tqdm(range(args.grids), desc="grids", unit="grid"):
            seed = None if args.seed is None else args.seed + g * settings.n
            grid_id, grid = generate(
                pipe, session, args.prompt, settings, seed=seed, on_step=on_step
            )
            tqdm.write(f"grid {grid_id}: seeds {grid.trajectory.seeds} ({grid.seconds:.1f} s)")
            for path in session.grid(grid_id)["image_paths"]:
                tqdm.write(f"  {path}")
        bar.close()


def cmd_label(parsed: tuple, given: set[str]) -> None:
    from tqdm.auto import tqdm

    from .scorers import load_scorer
    from .session import Session
    from .workflow import label_with_scorer, unlabeled_grids

    where, args = parsed
    scorer = load_scorer(args.scorer)
    with Session.open(where.session) as session:
        grids = unlabeled_grids(session)
        for grid_id in tqdm(grids, desc="labeling", unit="grid"):
            label_with_scorer(session, grid_id, scorer, labeler=args.labeler)
        print(f"labeled {len(grids)} grid(s) with {args.scorer}")


def cmd_train(parsed: tuple, given: set[str]) -> None:
    from accelerate import PartialState

    from .rounds import make_accelerator
    from .session import Session
    from .workflow import train_round

    where, model, _train, config, lora = parsed
    config = replace(config, lora=lora)
    with Session.open(where.session) as session:
        pipe = _load(model, session, device=model.device or PartialState().device)
        accelerator = make_accelerator(config, pipe.unet)
        bar, on_progress = _train_bar()
        round_id, metrics = train_round(
            pipe, session, config, on_progress=on_progress, accelerator=accelerator
        )
        bar.close()
        if accelerator.is_main_process:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"round {round_id} committed: {json.dumps(shown)}")


def cmd_simulate(parsed: tuple, given: set[str]) -> None:
    from tqdm.auto import tqdm

    from .scorers import load_scorer
    from .session import Session
    from .simulate import EvalSet, simulate

    where, model, settings, args, config, lora = parsed
    config = replace(config, lora=lora)
    scorer = load_scorer(args.scorer)
    prompts = _prompts(args.prompts)
    eval_prompts = _prompts(args.eval_prompts) if args.eval_prompts else prompts[:4]
    eval_set = EvalSet(eval_prompts, [10_000 + i for i in range(args.eval_seeds)])
    header = (
        f"{'round':>5} {'base':>10} {'tuned':>10} {'win rate':>9} {'loss':>8} {'acc':>6} "
        f"{'held-out':>8}"
    )
    with Session.open(where.session) as session:
        pipe = _load(model, session)
        settings = _sampling(settings, given, pipe)
        tqdm.write(
            f"scorer {args.scorer}; eval: {len(eval_prompts)} prompts × {args.eval_seeds} seeds"
        )
        tqdm.write(header)
        grid_bar = tqdm(desc="grids", unit="grid", leave=False)
        train_bar, on_progress = _train_bar()

        def on_grid(done: int, total: int) -> None:
            grid_bar.total, grid_bar.n = total, done
            grid_bar.refresh()

        def on_measured(row: dict) -> None:
            loss = "" if row["loss"] is None else f"{row['loss']:.4f}"
            acc = "" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
            held = row.get("heldout_agreement")
            held = "" if held is None else f"{held:.2f}"
            tqdm.write(
                f"{row['round']:>5} {row['base_mean']:>10.4f} {row['tuned_mean']:>10.4f} "
                f"{row['win_rate']:>9.2f} {loss:>8} {acc:>6} {held:>8}"
            )

        table = simulate(
            pipe,
            session,
            scorer,
            prompts,
            rounds=args.rounds,
            grids=args.grids,
            settings=settings,
            config=config,
            eval_set=eval_set,
            seed=args.grid_seed,
            on_grid=on_grid,
            on_progress=on_progress,
            on_measured=on_measured,
        )
        grid_bar.close()
        train_bar.close()
    if args.json:
        payload = {
            "scorer": args.scorer,
            "prompts": prompts,
            "eval_prompts": eval_prompts,
            "eval_seeds": eval_set.seeds,
            "sample_settings": settings.to_dict(),
            "method": args.method,
            args.method: config.to_dict(),
            "rounds": table,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        tqdm.write(f"wrote {args.json}")


def cmd_export(parsed: tuple, given: set[str]) -> None:
    from .export import export_diffusers, export_kohya, export_picks
    from .models import default_model, load_lora, load_pipeline
    from .session import Session

    where, model, args = parsed
    if not (args.lora or args.kohya or args.picks):
        raise SettingsError("nothing to export: give --lora DIR, --kohya FILE and/or --picks FILE")
    with Session.open(where.session, create=False) as session:
        round_id = args.round if args.round is not None else session.active_round
        if (args.lora or args.kohya) and round_id is None:
            raise SettingsError("no round to export: train a round first (or pass --round N)")
        if args.lora:
            path = export_diffusers(session, round_id, args.lora, strength=args.strength)
            print(f"diffusers LoRA: {path}")
        if args.kohya:
            pipe = load_pipeline(model.model or default_model(), device="cpu")
            load_lora(pipe.unet, session.round_path(round_id))
            path = export_kohya(
                pipe.unet, args.kohya, base_model=pipe.model_id, strength=args.strength
            )
            print(f"kohya LoRA (A1111/ComfyUI): {path}")
        if args.picks:
            print(f"picks: {export_picks(session, args.picks)}")


def cmd_check(parsed: tuple, given: set[str]) -> int:
    from .session.check import check_session, report

    (where,) = parsed
    findings = check_session(where.session)
    print(report(findings))
    return 0 if all(f.whole for f in findings) else 1


@dataclass(frozen=True)
class Command:
    help: str
    options: Callable[[list[str]], tuple[type, ...]]
    run: Callable[[tuple, set[str]], int | None]  # the exit code (None: 0)


def _simulate_options(argv: list[str]) -> tuple[type, ...]:
    """simulate's options: the chosen method's round settings (``--method``, default d3po)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=spec(SimulateArgs, "method").default)
    config = _method(pre.parse_known_args(argv)[0].method).config
    return (SessionArgs, ModelArgs, SampleSettings, SimulateArgs, config, LoraSettings)


def _train_options(argv: list[str]) -> tuple[type, ...]:
    """train's options: the chosen method's round settings (``--method``)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--method", default=spec(TrainArgs, "method").default)
    method = _method(pre.parse_known_args(argv)[0].method)
    if method.inputs != "picks":
        raise SettingsError(
            f"train --method {method.name} needs rewards, not picks: use simulate --method "
            f"{method.name} with a scorer"
        )
    return (SessionArgs, ModelArgs, TrainArgs, method.config, LoraSettings)


COMMANDS = {
    "generate": Command(
        "sample grids for a prompt into the session",
        lambda argv: (SessionArgs, ModelArgs, SampleSettings, GenerateArgs),
        cmd_generate,
    ),
    "label": Command(
        "label unlabeled grids with a scorer (best = max, worst = min)",
        lambda argv: (SessionArgs, LabelArgs),
        cmd_label,
    ),
    "train": Command(
        "train one round on the new picks (Diffusion-KTO by default; --method to choose another)",
        _train_options,
        cmd_train,
    ),
    "simulate": Command(
        "rounds of scripted labeling and training, with an evaluation",
        _simulate_options,
        cmd_simulate,
    ),
    "export": Command(
        "export a round's LoRA and/or the picks",
        lambda argv: (SessionArgs, ModelArgs, ExportArgs),
        cmd_export,
    ),
    "check": Command(
        "list what of a session is whole and what is damaged (exit code 1 if anything is)",
        lambda argv: (SessionArgs,),
        cmd_check,
    ),
}


def _usage() -> str:
    lines = ["usage: python -m d3po_core COMMAND [options]   (COMMAND --help for its options)", ""]
    lines += [f"  {name:<10} {command.help}" for name, command in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"error: unknown command {argv[0]!r}\n{_usage()}", file=sys.stderr)
        return 2
    session_root = None
    try:
        parser = SettingsParser(
            command.options(argv[1:]),
            prog=f"python -m d3po_core {argv[0]}",
            description=command.help,
        )
        parsed = parser.parse(argv[1:])
        session_root = parsed[0].session
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()  # our own bars say what is going on
        code = command.run(parsed, parser.given(argv[1:]))
    except D3POError as exc:
        if isinstance(exc, RoundCancelled):
            print("interrupted; nothing half-written was kept", file=sys.stderr)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: say so briefly, keep the traceback
        root = session_root if session_root and Path(session_root).is_dir() else None
        print(f"error: {report_unexpected(exc, root)}", file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
