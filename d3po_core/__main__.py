"""Headless CLI: ``python -m d3po_core {generate,label,train,simulate,export}``.

``simulate --method ddpo`` trains the DDPO baseline with the scorer as reward.

``train`` also runs unchanged under ``accelerate launch`` for multi-GPU data parallelism.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from .d3po import PairMode
from .ddpo import DDPOConfig
from .models import LoraSettings, ModelLoadError, default_model, load_pipeline
from .sampling import SampleSettings
from .scorers import ScorerError, load_scorer
from .session import Session, SessionError
from .trainer import D3POConfig, NoPicksError, RoundCancelled

DEFAULT_SESSION = Path("sessions") / "default"


def _common(parser: argparse.ArgumentParser, *, model: bool = True) -> None:
    parser.add_argument(
        "--session", type=Path, default=DEFAULT_SESSION, help="session folder (created if new)"
    )
    if model:
        parser.add_argument(
            "--model", default=None, help="diffusers folder or hub id (default: embedded model)"
        )
        parser.add_argument("--device", default=None, help="cuda, cpu, … (default: auto)")


def _sampling(parser: argparse.ArgumentParser) -> None:
    d = SampleSettings()
    parser.add_argument("--grid-size", type=int, default=d.n, help="images a grid (2–16)")
    parser.add_argument("--steps", type=int, default=d.steps, help="DDIM steps")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help=f"CFG scale (default: the model's recommendation, else {d.guidance})",
    )
    parser.add_argument("--eta", type=float, default=d.eta, help="DDIM eta (> 0 to train)")
    parser.add_argument(
        "--shared-noise",
        action="store_true",
        help="one initial noise x_T for the whole grid (default: one per image)",
    )
    parser.add_argument("--negative-prompt", default="")


def _d3po(parser: argparse.ArgumentParser) -> None:
    d = D3POConfig()
    g = parser.add_argument_group("D3PO round")
    g.add_argument("--beta", type=float, default=d.beta)
    g.add_argument("--reduction", choices=["sum", "mean"], default=d.reduction)
    g.add_argument(
        "--ratio-clip", type=_optional_float, default=d.ratio_clip, help="ε, or 'none' (off)"
    )
    g.add_argument("--pairs", choices=["best-worst", "implied"], default=d.pairs)
    g.add_argument("--timestep-fraction", type=float, default=d.timestep_fraction)
    g.add_argument("--lr", type=float, default=None, help=f"learning rate ({d.learning_rate})")
    g.add_argument("--epochs", type=int, default=None, help=f"passes over the round ({d.epochs})")
    g.add_argument(
        "--batch-size", type=int, default=d.batch_size, help="(pair, step) items a UNet call"
    )
    g.add_argument(
        "--grad-accum",
        type=int,
        default=None,
        help=f"UNet calls an optimizer step ({d.grad_accum})",
    )
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--reference", choices=["base", "previous"], default=d.reference)
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--replay", action="store_true", help="train on all picks, not only new ones")
    g.add_argument("--rank", type=int, default=d.lora.rank)
    g.add_argument("--alpha", type=float, default=d.lora.alpha)
    g.add_argument("--train-seed", type=int, default=d.seed)


def _ddpo(parser: argparse.ArgumentParser) -> None:
    d = DDPOConfig()
    g = parser.add_argument_group(
        "DDPO round (--method ddpo; --lr, --epochs and --grad-accum default to "
        f"{d.learning_rate}, {d.epochs} and {d.grad_accum})"
    )
    g.add_argument("--method", choices=["d3po", "ddpo"], default="d3po", help="how to train")
    g.add_argument("--clip-range", type=float, default=d.clip_range, help="PPO's ε")
    g.add_argument("--adv-clip", type=float, default=d.adv_clip, help="advantage clip")


def _loop_settings(args: argparse.Namespace, defaults: D3POConfig | DDPOConfig) -> dict:
    """The options both methods' rounds take; --lr, --epochs, --grad-accum default per method."""
    return {
        "learning_rate": defaults.learning_rate if args.lr is None else args.lr,
        "timestep_fraction": args.timestep_fraction,
        "epochs": defaults.epochs if args.epochs is None else args.epochs,
        "batch_size": args.batch_size,
        "grad_accum": defaults.grad_accum if args.grad_accum is None else args.grad_accum,
        "max_grad_norm": args.max_grad_norm,
        "mixed_precision": args.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seed": args.train_seed,
        "lora": LoraSettings(rank=args.rank, alpha=args.alpha),
    }


def _ddpo_config(args: argparse.Namespace) -> DDPOConfig:
    return DDPOConfig(
        clip_range=args.clip_range,
        adv_clip=args.adv_clip,
        **_loop_settings(args, DDPOConfig()),
    )


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "") else float(text)


def _config(args: argparse.Namespace) -> D3POConfig:
    pairs: PairMode = args.pairs
    return D3POConfig(
        beta=args.beta,
        reduction=args.reduction,
        ratio_clip=args.ratio_clip,
        pairs=pairs,
        reference=args.reference,
        replay=args.replay,
        **_loop_settings(args, D3POConfig()),
    )


def _check_grid_size(args: argparse.Namespace) -> None:
    if not 2 <= args.grid_size <= 16:
        raise ValueError(f"--grid-size {args.grid_size} is out of range (2 to 16)")


def _settings(args: argparse.Namespace, pipe) -> SampleSettings:
    _check_grid_size(args)
    guidance = args.guidance
    if guidance is None:
        guidance = pipe.recommended.get("guidance", SampleSettings().guidance)
    return SampleSettings(
        n=args.grid_size,
        steps=args.steps,
        guidance=guidance,
        eta=args.eta,
        shared_noise=args.shared_noise,
        negative_prompt=args.negative_prompt,
    )


def _prompts(text: str) -> list[str]:
    """A prompts file (one a line) if the argument names one, else the text itself."""
    path = Path(text)
    if path.suffix in (".txt", ".csv") or path.is_file():
        if not path.is_file():
            raise ValueError(f"prompts file not found: {path}")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [text.strip()] if text.strip() else []
    if not prompts:
        raise ValueError(f"no prompts in {text!r}")
    return prompts


def _load(args: argparse.Namespace, session: Session, device=None):
    from .workflow import sync_active

    pipe = load_pipeline(args.model or default_model(), device=device or args.device)
    sync_active(pipe, session)
    return pipe


def _step_bar(desc: str):
    bar = tqdm(desc=desc, unit="step", leave=False)

    def update(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()
        if step == total:
            bar.reset()

    return bar, update


def _train_bar():
    bar = tqdm(desc="round", unit="step")

    def update(event) -> None:
        bar.total = event.total
        bar.n = event.step
        bar.set_postfix(loss=f"{event.loss:.4f}", acc=f"{event.accuracy:.2f}")

    return bar, update


def cmd_generate(args: argparse.Namespace) -> None:
    from .workflow import generate

    _check_grid_size(args)
    with Session.open(args.session) as session:
        pipe = _load(args, session)
        settings = _settings(args, pipe)
        bar, on_step = _step_bar("sampling")
        for g in tqdm(range(args.grids), desc="grids", unit="grid"):
            seed = None if args.seed is None else args.seed + g * settings.n
            grid_id, grid = generate(
                pipe, session, args.prompt, settings, seed=seed, on_step=on_step
            )
            paths = session.grid(grid_id)["image_paths"]
            tqdm.write(f"grid {grid_id}: seeds {grid.trajectory.seeds} ({grid.seconds:.1f} s)")
            for path in paths:
                tqdm.write(f"  {path}")
        bar.close()


def cmd_label(args: argparse.Namespace) -> None:
    from .workflow import label_with_scorer, unlabeled_grids

    scorer = load_scorer(args.scorer)
    with Session.open(args.session) as session:
        grids = unlabeled_grids(session)
        for grid_id in tqdm(grids, desc="labeling", unit="grid"):
            label_with_scorer(session, grid_id, scorer, labeler=args.labeler)
        print(f"labeled {len(grids)} grid(s) with {args.scorer}")


def cmd_train(args: argparse.Namespace) -> None:
    from accelerate import Accelerator

    from .workflow import train_round

    config = _config(args)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum
    )
    with Session.open(args.session) as session:
        pipe = _load(args, session, device=args.device or accelerator.device)
        bar, on_progress = _train_bar()
        round_id, metrics = train_round(
            pipe, session, config, on_progress=on_progress, accelerator=accelerator
        )
        bar.close()
        if accelerator.is_main_process:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
            print(f"round {round_id} committed: {json.dumps(shown)}")


def cmd_simulate(args: argparse.Namespace) -> None:
    from .simulate import EvalSet, simulate

    scorer = load_scorer(args.scorer)
    prompts = _prompts(args.prompts)
    eval_prompts = _prompts(args.eval_prompts) if args.eval_prompts else prompts[:4]
    eval_set = EvalSet(eval_prompts, [10_000 + i for i in range(args.eval_seeds)])
    _check_grid_size(args)
    config = _ddpo_config(args) if args.method == "ddpo" else _config(args)
    header = f"{'round':>5} {'base':>10} {'tuned':>10} {'win rate':>9} {'loss':>8} {'acc':>6}"
    with Session.open(args.session) as session:
        pipe = _load(args, session)
        settings = _settings(args, pipe)
        tqdm.write(
            f"scorer {args.scorer}; eval: {len(eval_prompts)} prompts × {args.eval_seeds} seeds"
        )
        tqdm.write(header)
        grid_bar = tqdm(desc="grids", unit="grid", leave=False)
        train_bar, on_progress = _train_bar()

        def on_grid(done: int, total: int) -> None:
            grid_bar.total, grid_bar.n = total, done
            grid_bar.refresh()

        def on_round(row: dict) -> None:
            loss = "" if row["loss"] is None else f"{row['loss']:.4f}"
            acc = "" if row["accuracy"] is None else f"{row['accuracy']:.2f}"
            tqdm.write(
                f"{row['round']:>5} {row['base_mean']:>10.4f} {row['tuned_mean']:>10.4f} "
                f"{row['win_rate']:>9.2f} {loss:>8} {acc:>6}"
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
            seed=args.seed,
            on_grid=on_grid,
            on_progress=on_progress,
            on_round=on_round,
        )
        grid_bar.close()
        train_bar.close()
    if args.json:
        payload = {
            "scorer": args.scorer,
            "prompts": prompts,
            "eval_prompts": eval_prompts,
            "eval_seeds": eval_set.seeds,
            "sample_settings": settings.__dict__,
            "method": args.method,
            args.method: config.to_dict(),
            "rounds": table,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2))
        tqdm.write(f"wrote {args.json}")


def cmd_export(args: argparse.Namespace) -> None:
    from .export import export_diffusers, export_kohya, export_picks

    if not (args.lora or args.kohya or args.picks):
        raise ValueError("nothing to export: give --lora DIR, --kohya FILE and/or --picks FILE")
    with Session.open(args.session, create=False) as session:
        round_id = args.round if args.round is not None else session.active_round
        if (args.lora or args.kohya) and round_id is None:
            raise ValueError("no round to export: train a round first (or pass --round N)")
        if args.lora:
            print(f"diffusers LoRA: {export_diffusers(session, round_id, args.lora)}")
        if args.kohya:
            pipe = load_pipeline(args.model or default_model(), device="cpu")
            from .models import load_lora

            load_lora(pipe.unet, session.round_path(round_id))
            path = export_kohya(pipe.unet, args.kohya, base_model=pipe.model_id)
            print(f"kohya LoRA (A1111/ComfyUI): {path}")
        if args.picks:
            print(f"picks: {export_picks(session, args.picks)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d3po_core",
        description="D3PO Studio engine: sample grids, label, train LoRA rounds, export.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="sample grids for a prompt into the session")
    _common(p)
    _sampling(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--grids", type=int, default=1, help="how many grids")
    p.add_argument("--seed", type=int, default=None, help="first seed (default: random)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("label", help="label unlabeled grids with a scorer (best=max, worst=min)")
    _common(p, model=False)
    p.add_argument("--scorer", required=True, help="built-in name, pkg.module:fn or file.py:fn")
    p.add_argument("--labeler", default="scorer", help="name recorded with each pick")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("train", help="train one D3PO round on the new picks")
    _common(p)
    _d3po(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("simulate", help="rounds of scripted labeling and training, with an eval")
    _common(p)
    _sampling(p)
    _d3po(p)
    _ddpo(p)
    p.add_argument(
        "--scorer",
        required=True,
        help="built-in name, pkg.module:fn or file.py:fn (D3PO: its ranking; DDPO: its values)",
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--grids", type=int, default=8, help="grids a round")
    p.add_argument("--prompts", required=True, help="a prompts file (one a line) or one prompt")
    p.add_argument("--eval-prompts", default=None, help="file or text (default: first 4 prompts)")
    p.add_argument("--eval-seeds", type=int, default=8, help="fixed seeds of the eval set")
    p.add_argument("--seed", type=int, default=0, help="first grid seed")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("export", help="export a round's LoRA and/or the picks")
    _common(p)
    p.add_argument("--round", type=int, default=None, help="round id (default: the active one)")
    p.add_argument("--lora", type=Path, default=None, help="folder for the diffusers/peft LoRA")
    p.add_argument("--kohya", type=Path, default=None, help="file for the A1111/ComfyUI LoRA")
    p.add_argument("--picks", type=Path, default=None, help="picks as .parquet or .jsonl")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    diffusers_logging.disable_progress_bar()  # our own bars say what is going on
    try:
        args.func(args)
    except (ModelLoadError, SessionError, ScorerError, NoPicksError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, RoundCancelled):
        print("interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
