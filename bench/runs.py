"""Shared runner of the learning benchmarks: one scripted run a spec, cached as JSON.

A spec names an objective (a scorer), a method (d3po, ddpo or p3o), a seed, and overrides of the
method's config and of the sampling settings. ``run_specs`` runs what is not cached yet
(``--part i/k`` splits the work across processes; ``--jobs N`` starts N worker processes that
take the next spec nobody has claimed, so several commands, on a GPU and on CPU cores, can
share one results folder); ``load_results`` reads them back. ``--device cuda`` runs on a GPU
(in fp32, as on the CPU: the embedded model is small), where one process per job keeps it busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from d3po_core.models import default_model, load_pipeline
from d3po_core.objectives import METHODS
from d3po_core.sampling import SampleSettings
from d3po_core.scorers import load_scorer
from d3po_core.session import Session
from d3po_core.simulate import EvalSet, simulate

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    line.strip()
    for line in (ROOT / "examples" / "prompts.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]
#: 4 prompts × 16 seeds: 64 paired samples, so a win rate moves in steps of 1/64
EVAL = EvalSet(PROMPTS[:4], [10_000 + i for i in range(16)])
CONTROL = "random"
IMAGES_PER_ROUND = 32
#: the device runs use (``--device`` sets it for the process and its workers)
DEVICE_ENV = "D3PO_BENCH_DEVICE"


def spec(
    variant: str,
    objective: str,
    method: str,
    seed: int,
    *,
    rounds: int,
    config: dict | None = None,
    settings: dict | None = None,
    random_picks: bool = False,
    prompts: list[str] | None = None,
) -> dict:
    """A run: the same images per round whatever the grid size (grids = 32 / n); with
    ``random_picks`` it picks at random and its objective only scores it. It labels grids of
    ``prompts`` in turn (when not given, examples/prompts.txt: :data:`PROMPTS`, which a spec
    does not name, as the runs from before the prompts varied did not)."""
    return {
        "id": f"{variant}--{objective}--s{seed}",
        "variant": variant,
        "objective": objective,
        "method": method,
        "seed": seed,
        "rounds": rounds,
        "config": config or {},
        "settings": settings or {},
        "random_picks": random_picks,
    } | ({"prompts": list(prompts)} if prompts and prompts != PROMPTS else {})


def prompts_of(s: dict) -> list[str]:
    """The prompts a spec (or a run made from one) labels grids of."""
    return s.get("prompts", PROMPTS)


#: how a spec samples unless it asks otherwise: the adapter at strength 1, as the stored runs
#: were made before the engine sampled at another strength by default
SAMPLED_AS = {"strength": 1.0}

#: settings that change a round's memory, not its result (micro-batches add up the same
#: gradients; checkpointing recomputes the same activations)
MEMORY_ONLY = frozenset({"gradient_checkpointing", "micro_batch", "max_memory_gb"})


def config_of(s: dict):
    """The round settings a spec asks of today's engine: its method's defaults, its overrides
    and its seed."""
    return METHODS[s["method"]].config.from_dict({**s["config"], "seed": s["seed"]})


def stale_settings(result: dict, s: dict) -> dict[str, tuple]:
    """Where a cached run's settings differ from what its spec asks now (a default changed
    since it ran, or ``--rounds``): {name: (ran with, asked now)}; empty when the run still
    stands. A setting added since (its default keeps the old behaviour) or one that only
    changes memory is not a difference, nor is anything in a result that records no
    settings. A run on other prompts (``{"prompts": …}``) or of other rounds
    (``{"rounds": …}``) is another benchmark's, which :func:`main` refuses to touch."""
    if prompts_of(result) != prompts_of(s):
        return {"prompts": (prompts_of(result), prompts_of(s))}
    if result.get("rounds", s["rounds"]) != s["rounds"]:  # its last round is another's
        return {"rounds": (result["rounds"], s["rounds"])}
    # a run from before a sampling setting was recorded sampled as SAMPLED_AS says
    ran_sampling = (
        {**SAMPLED_AS, **result["sample_settings"]} if "sample_settings" in result else {}
    )
    for k, v in {**SAMPLED_AS, **s.get("settings", {})}.items():
        if k in ran_sampling and _differs(ran_sampling[k], v):
            return {k: (ran_sampling[k], v)}
    if "full_config" not in result:
        return {}
    if result.get("method") != s["method"]:
        return {"method": (result.get("method"), s["method"])}
    ran, asked = result["full_config"], config_of(s).to_dict()
    return {
        k: (ran[k], asked[k])
        for k in sorted((ran.keys() & asked.keys()) - MEMORY_ONLY)
        if _differs(ran[k], asked[k])
    }


def _differs(ran, asked) -> bool:
    """Whether a setting ran otherwise than asked; in a group of settings (the adapter's),
    only the ones both know count, as at the top level."""
    if isinstance(ran, dict) and isinstance(asked, dict):
        return any(_differs(ran[k], asked[k]) for k in ran.keys() & asked.keys())
    return ran != asked


def set_aside_stale(specs: list[dict], out: Path) -> list[str]:
    """Move cached runs whose settings are no longer what their spec asks into ``out/stale``
    (kept, not deleted), so the next run makes them again; the ids moved, each with why."""
    moved = []
    for s in specs:
        path = out / f"{s['id']}.json"
        if not path.exists():
            continue
        diff = stale_settings(json.loads(path.read_text()), s)
        if diff:
            (out / "stale").mkdir(exist_ok=True)
            os.replace(path, out / "stale" / path.name)
            why = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
            moved.append(f"{s['id']} ({why})")
    return moved


def deterministic_kernels() -> None:
    """Ask torch for deterministic kernels (``--deterministic``). On a GPU the same spec
    otherwise draws another run each time it runs: some kernels add in an order that varies,
    and the last bits decide which images are drawn (docs/benchmarks.md §5). cuBLAS needs its
    workspace fixed before CUDA starts; an op with no deterministic kernel warns and runs as
    before (``bench/repeat.py`` tells whether a round then repeats)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    # the vector instructions torch's CPU kernels use: machines with other ones can round
    # differently (their kernels reduce in another order)
    cpu += f" ({torch.backends.cpu.get_cpu_capability()})"
    text = f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"
    if torch.are_deterministic_algorithms_enabled():
        text += ", deterministic kernels"
    device = os.environ.get(DEVICE_ENV, "cpu")
    if device.startswith("cuda") and torch.cuda.is_available():
        text = f"{torch.cuda.get_device_name(torch.device(device))} ({text})"
    return text


@dataclass
class Run:
    """A spec made concrete: the pipeline, its sampling settings, the round settings."""

    spec: dict
    pipe: object
    settings: SampleSettings
    config: object
    grids: int
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def of(cls, s: dict, model: str | None) -> Run:
        device = os.environ.get(DEVICE_ENV, "cpu")
        pipe = load_pipeline(model or default_model(), device=device, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        guidance = pipe.recommended.get("guidance", SampleSettings().guidance)
        settings = replace(SampleSettings(guidance=guidance, **SAMPLED_AS), **s["settings"])
        config = config_of(s)
        return cls(s, pipe, settings, config, IMAGES_PER_ROUND // settings.n)

    def simulate(self, scorer, eval_set: EvalSet, on_session=None, **kwargs) -> list[dict]:
        """The spec's rounds in a throw-away session, labeled and evaluated by ``scorer``
        (``labeler=`` labels instead; see :func:`d3po_core.simulate.simulate`); ``on_session``
        gets the session at the end, before it is thrown away."""
        with tempfile.TemporaryDirectory() as tmp, Session.open(Path(tmp) / "s") as session:
            rows = simulate(
                self.pipe,
                session,
                scorer,
                prompts_of(self.spec),
                rounds=self.spec["rounds"],
                grids=self.grids,
                settings=self.settings,
                config=self.config,
                eval_set=eval_set,
                seed=1_000_000 * (self.spec["seed"] + 1),
                **kwargs,
            )
            if on_session is not None:
                on_session(session)
            return rows

    def result(self, **fields_: object) -> dict:
        """The record saved for the run: the spec, what it ran with, and ``fields_``."""
        return {
            **self.spec,
            "sample_settings": asdict(self.settings),
            "full_config": self.config.to_dict(),
            "grids_per_round": self.grids,
            **fields_,
            "seconds": time.perf_counter() - self.start,
            "machine": machine(),
        }


def random_labeler(seed: int):
    """The control's labeler: each call a uniform random value (seeded, by call order), so a
    grid's best and worst are uniformly random and distinct."""
    rng = np.random.default_rng(seed)

    def score(image, prompt: str = "") -> float:
        return float(rng.random())

    return score


def run_one(s: dict, out: Path, model: str | None) -> dict:
    """Run a spec (or read its cached result) and return the result; a spec with random picks
    is evaluated by its objective."""
    path = out / f"{s['id']}.json"
    if path.exists():
        return json.loads(path.read_text())
    run = Run.of(s, model)
    labeler = random_labeler(s["seed"]) if s["random_picks"] else None
    result = run.result(table=run.simulate(load_scorer(s["objective"]), EVAL, labeler=labeler))
    save_result(path, result)
    return result


Runner = Callable[[dict, Path, "str | None"], dict]


def save_result(path: Path, result: dict) -> None:
    """Write a result atomically (a killed run leaves no half-written cache)."""
    tmp_path = path.with_suffix(".tmp")
    tmp_path.write_text(json.dumps(result, indent=2))
    os.replace(tmp_path, path)


def outcome(result: dict) -> str:
    """One line on a run: the objective's eval mean before -> after, and the last win rate."""
    last = result["table"][-1]
    return (
        f"{result['table'][0]['base_mean']:.4f} -> {last['tuned_mean']:.4f} "
        f"(win {last['win_rate']:.2f})"
    )


def claim(out: Path, spec_id: str) -> bool:
    """Take a spec for this process: False if it is done or another live process has it.

    A claim is a file holding the claimer's host and pid; a claim of a process that is gone
    (killed, or a machine that restarted) is taken over.
    """
    if (out / f"{spec_id}.json").exists():
        return False
    path = out / f"{spec_id}.claim"
    me = f"{platform.node()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _claimer_alive(path):
                return False
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return not (out / f"{spec_id}.json").exists()
    return False


def _claimer_alive(path: Path) -> bool:
    try:
        host, pid = path.read_text().split()
    except (OSError, ValueError):
        return True  # being written just now
    if host != platform.node():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, another user's
    return True


def run_specs(
    specs: list[dict],
    out: Path,
    model: str | None,
    part: str = "1/1",
    *,
    runner: Runner | None = None,
    describe: Callable[[dict], str] = outcome,
    stop_at: float | None = None,
) -> None:
    """Run every spec of this part (``i/k``: every k-th spec from the i-th) not cached yet.

    ``runner(spec, out, model)`` runs one spec or reads its cache (default :func:`run_one`).
    A spec is run only by the process that claims it (:func:`claim`), so processes on one
    folder share the specs in order; ``stop_at`` (a ``time.time()``) starts no spec after it.
    """
    runner = runner or run_one
    i, k = (int(x) for x in part.split("/"))
    out.mkdir(parents=True, exist_ok=True)
    mine = specs[i - 1 :: k]
    for n, s in enumerate(mine, 1):
        if stop_at is not None and time.time() > stop_at:
            print(f"stopping: the deadline passed with {len(mine) - n + 1} specs left", flush=True)
            return
        cached = (out / f"{s['id']}.json").exists()
        if not cached and not claim(out, s["id"]):
            continue
        t0 = time.perf_counter()
        try:
            result = runner(s, out, model)
        finally:
            if not cached:
                (out / f"{s['id']}.claim").unlink(missing_ok=True)
        print(
            f"[{n}/{len(mine)}] {s['id']}: {describe(result)}"
            + (" cached" if cached else f" {time.perf_counter() - t0:.0f}s"),
            flush=True,
        )


def load_results(specs: list[dict], out: Path, *more: Path) -> list[dict]:
    """The cached results of ``specs`` (missing ones are skipped): each from ``out``, or else
    from the first of ``more`` folders that holds it."""
    results = []
    for s in specs:
        places = [folder / f"{s['id']}.json" for folder in (out, *more)]
        path = next((p for p in places if p.exists()), None)
        if path is not None:
            results.append(json.loads(path.read_text()))
    return results


def main(
    description: str,
    specs: Callable[[int, int], list[dict]],
    report: Callable[[list[dict], Path], None],
    *,
    seeds: int,
    plot: str,
    rounds: int = 4,
    out: str = "learning",
    runner: Runner | None = None,
    describe: Callable[[dict], str] = outcome,
    prompt_sets: dict[str, tuple[list[str], str]] | None = None,
) -> None:
    """The command line the learning benchmarks share: run what is missing, then report.

    ``out`` names the cache folder under bench/results; ``runner`` and ``describe`` as in
    :func:`run_specs`. With ``prompt_sets`` ({name: (prompts, cache folder)}, the first the
    default) ``--prompts NAME`` chooses the prompts, passed on as ``specs(seeds, rounds,
    prompts)``, and with them the cache folder; the plot is then named after the results
    folder (docs/img/<folder>.png), so runs kept elsewhere with ``--out`` get their own.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--seeds", type=int, default=seeds)
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="run and report seeds from this one on (fresh seeds no default was chosen on)",
    )
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--model", default=None, help="default: the embedded model")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/<folder>")
    if prompt_sets:
        p.add_argument(
            "--prompts",
            choices=list(prompt_sets),
            default=next(iter(prompt_sets)),
            help="the prompts to label and evaluate on (each set has its own results folder)",
        )
    p.add_argument("--plot", type=Path, default=None, help="default: docs/img/<plot>")
    p.add_argument("--part", default="1/1", help="i/k: run every k-th spec from the i-th")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--jobs", type=int, default=1, help="worker processes sharing the specs")
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels: on a GPU a spec otherwise draws another run each time",
    )
    p.add_argument(
        "--stop-after", type=float, default=None, help="seconds: start no spec after them"
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--only", default=None, help="comma-separated variants to run")
    p.add_argument("--labelers", default=None, help="comma-separated objectives/tastes to run")
    p.add_argument("--report-only", action="store_true")
    p.add_argument(
        "--also",
        type=Path,
        action="append",
        default=[],
        help="another results folder to report from (repeatable): a run --out lacks is taken "
        "from the first that holds it; runs still go to --out",
    )
    args = p.parse_args()
    if args.deterministic:
        deterministic_kernels()
    if args.device:
        os.environ[DEVICE_ENV] = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    stop_at = args.stop_at
    if stop_at is None and args.stop_after is not None:
        stop_at = time.time() + args.stop_after
    if prompt_sets:
        prompts, out = prompt_sets[args.prompts]
        all_specs = specs(args.seeds, args.rounds, prompts)
    else:
        all_specs = specs(args.seeds, args.rounds)
    args.out = args.out or ROOT / "bench" / "results" / out
    if prompt_sets:  # each folder's own plot: --out elsewhere leaves the docs' plots alone
        plot = f"{args.out.name}.png"
    args.plot = args.plot or ROOT / "docs" / "img" / plot
    all_specs = [s for s in all_specs if s["seed"] >= args.first_seed]
    if args.only:
        all_specs = [s for s in all_specs if s["variant"] in args.only.split(",")]
    if args.labelers:
        all_specs = [s for s in all_specs if s["objective"] in args.labelers.split(",")]
    by_id = {s["id"]: s for s in all_specs}
    other = {  # another benchmark's runs, not stale ones: never set aside
        r["id"]: what
        for r in load_results(all_specs, args.out)
        for what in stale_settings(r, by_id[r["id"]]).keys() & {"prompts", "rounds"}
    }
    if other:
        first, what = next(iter(other.items()))
        p.error(
            f"{args.out} holds runs made with other {what} than asked ({first} and "
            f"{len(other) - 1} more): choose their --prompts and --rounds, or another --out"
        )
    if not args.report_only:
        if not args.worker:
            print(f"machine: {machine()}")
            for moved in set_aside_stale(all_specs, args.out):
                print(f"set aside, to run again with today's settings: {moved}")
        if args.jobs > 1:
            _run_workers(args.jobs, stop_at)
        else:
            run_specs(
                all_specs,
                args.out,
                args.model,
                args.part,
                runner=runner,
                describe=describe,
                stop_at=stop_at,
            )
    if args.worker:
        return  # the command that started the workers reports
    results = load_results(all_specs, args.out, *args.also)
    stale = [r["id"] for r in results if stale_settings(r, by_id[r["id"]])]
    if stale:  # --report-only over runs made before a default changed
        print(f"left out of the report, made with other settings than asked now: {stale}")
        results = [r for r in results if r["id"] not in stale]
    if results:
        report(results, args.plot)
        print(f"plot: {args.plot}")


def _run_workers(jobs: int, stop_at: float | None) -> None:
    """This command ``jobs`` times over as workers (each one process, one torch thread unless
    told), sharing the specs by claims; returns when all have ended."""
    argv = sys.argv[1:]
    extra = ["--worker", "--jobs", "1"] + ([] if stop_at is None else ["--stop-at", str(stop_at)])
    if "--threads" not in argv:
        extra += ["--threads", "1"]
    procs = [subprocess.Popen([sys.executable, sys.argv[0], *argv, *extra]) for _ in range(jobs)]
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"workers ended with codes {codes}", flush=True)
