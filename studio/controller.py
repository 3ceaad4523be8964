"""The studio's controller: one object over a session and a loaded pipeline.

The Gradio app and the notebook panels are views over it with the same verbs; all logic lives
here or in the engine. GPU work (sampling, training) runs one job at a time under a lock.
"""

from __future__ import annotations

import queue
import random
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import torch
from PIL import Image

from d3po_core import export, workflow
from d3po_core.errors import D3POError, ModelLoadError, SettingsError, report_unexpected
from d3po_core.families import family_of
from d3po_core.models import base_model, default_model, load_lora, load_pipeline, remove_lora
from d3po_core.rounds import ProgressEvent
from d3po_core.sampling import SampleSettings, sample_grid
from d3po_core.session import Session, reports
from d3po_core.settings import RoundSettings, check_prompt


class StudioError(D3POError):
    """A studio action that cannot be done now (e.g. export with no active round)."""


@dataclass
class GridView:
    grid_id: int
    prompt: str
    images: list[Image.Image]
    seeds: list[int]
    adapter_round: int | None
    seconds: float


@dataclass
class BlindPair:
    """Two images of one prompt and seed, base vs a round, in random order."""

    prompt: str
    seed: int
    round_id: int
    left: Image.Image
    right: Image.Image
    left_is: str  # "a" (the base) or "b" (the round)


T = TypeVar("T")


def side_by_side(best: Image.Image, worst: Image.Image, size: int = 192) -> Image.Image:
    """Best beside worst, each scaled to ``size`` px crisply (nearest neighbour), a gap
    between them."""
    gap = max(4, size // 24)
    pair = Image.new("RGB", (2 * size + gap, size), "white")
    for i, image in enumerate((best, worst)):
        pair.paste(image.resize((size, size), Image.NEAREST), (i * (size + gap), 0))
    return pair


def _pick_images(root: Path, *paths: str) -> tuple[Image.Image, Image.Image, list[str]]:
    """A pick's best and worst image (a grey square for one that cannot be read: the pick
    itself is in the database, whole) and the paths that could not be read."""
    images, damaged = [], []
    for path in paths:
        try:
            with Image.open(root / path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError):  # missing, truncated or not an image
            images.append(Image.new("RGB", (64, 64), "lightgray"))
            damaged.append(path)
    return images[0], images[1], damaged


def _oom_message() -> str:
    return "out of GPU memory: use a smaller grid or fewer steps (a round lowers its own use)"


class StudioController:
    """Owns a session and a pipeline; every front end calls these verbs."""

    def __init__(
        self,
        session_dir: str | Path,
        *,
        model: str | None = None,
        device: str | None = None,
        sample_settings: SampleSettings | None = None,
        pipe=None,
    ) -> None:
        self.session = Session.open(session_dir)
        self.model = str(model or default_model())
        self.pipe = pipe if pipe is not None else load_pipeline(self.model, device=device)
        #: what the user should read on opening (a damaged adapter set aside), else ""
        self.notice = workflow.sync_active(self.pipe, self.session)
        self._notice_shown = False
        self.sample_settings = sample_settings or SampleSettings(**self.pipe.recommended)
        self._gpu = threading.Lock()
        self._cancel = threading.Event()

    def take_notice(self) -> str:
        """The opening notice for the first page that asks, then "": it tells what happened
        when the session was opened, so a reload does not say it again."""
        shown, self._notice_shown = self._notice_shown, True
        return "" if shown else self.notice

    def close(self) -> None:
        self.session.close()

    def model_info(self) -> dict:
        """What the studio samples with: model, family, image size, device and dtype."""
        unet = self.pipe.unet
        side = unet.config.sample_size * self.pipe.vae_scale_factor
        s = self.sample_settings
        return {
            "session": str(self.session.root),
            "model": "embedded model" if self.model == str(default_model()) else self.model,
            "family": family_of(self.pipe).label,
            "height": s.height or side,
            "width": s.width or side,
            "device": unet.device.type,
            "dtype": str(unet.dtype).removeprefix("torch."),
        }

    def switch_session(self, folder: str | Path) -> str:
        """Work in another session folder (created if new) from now on; the current one
        stays open if the new one cannot be opened. The new session's active round is
        loaded when its adapter fits the model (else the base model, said)."""
        with self._gpu:
            new = Session.open(folder)
            old, self.session = self.session, new
            old.close()
            return f"Opened {new.root}." + self._follow_active_round()

    def switch_model(self, model: str | None, *, device: str | None = None, dtype=None) -> str:
        """Load another model (a folder or hub id; None: the embedded model) in place of this
        one, on the same device unless told; the current one stays if loading fails. The
        session's active round follows when its adapter fits the new model; otherwise the
        new model starts from its base and the returned line says so."""
        name = str(model or default_model())
        with self._gpu:
            new = load_pipeline(name, device=device or self.pipe.unet.device, dtype=dtype)
            old, self.pipe, self.model = self.pipe, new, name
            del old
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.sample_settings = replace(self.sample_settings, **self.pipe.recommended)
            return f"Loaded {name}." + self._follow_active_round()

    def _follow_active_round(self) -> str:
        """Put the session's active round into the pipeline; when its adapter does not fit
        the model, the base model becomes active (in the session too, so grids are not
        credited to a round that did not sample them) and the returned words say so."""
        try:
            said = workflow.sync_active(self.pipe, self.session)
        except ModelLoadError:
            round_id = self.session.active_round
            workflow.activate(self.pipe, self.session, None)
            return f" Round {round_id}'s adapter does not fit this model, so the base is active."
        return f" {said[0].upper()}{said[1:]}." if said else ""

    @property
    def session_root(self) -> Path:
        return self.session.root

    def describe_error(self, exc: Exception) -> str:
        """The line a front end shows for a failed action: a user error's own message; for
        anything else a short note, its traceback logged to the session's logs/errors.log."""
        if isinstance(exc, D3POError):
            return f"⚠️ {exc}"
        return f"⚠️ {report_unexpected(exc, self.session_root)}"

    def attempt(
        self, action: Callable[..., T], *args: Any, **kwargs: Any
    ) -> tuple[T | None, str | None]:
        """Run a front end's action: (its result, None), or (None, the line to show) when it
        fails. Every exception is caught; only a :class:`D3POError` is shown as it is."""
        try:
            return action(*args, **kwargs), None
        except Exception as exc:
            return None, self.describe_error(exc)

    @contextmanager
    def _job(self) -> Iterator[None]:
        """One GPU job at a time; out-of-memory becomes a clear message."""
        with self._gpu:
            try:
                yield
            except torch.cuda.OutOfMemoryError as exc:
                torch.cuda.empty_cache()
                raise StudioError(_oom_message()) from exc

    # -- label ----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        n: int | None = None,
        *,
        settings: SampleSettings | None = None,
        seed: int | None = None,
        on_step: Callable[[int, int], None] | None = None,
    ) -> GridView:
        """Sample and store a grid for the prompt with the active adapter.

        settings: how to sample (default: the controller's); n, when given, is the grid size.
        """
        prompt = check_prompt(prompt or "")
        settings = settings or self.sample_settings
        if n is not None:  # checked against the grid size's declared bounds
            settings = replace(settings, n=int(n))
        with self._job():
            grid_id, grid = workflow.generate(
                self.pipe, self.session, prompt, settings, seed=seed, on_step=on_step
            )
        # the adapter strength last sampled at is the studio's: Compare and Export follow it
        self.sample_settings = replace(self.sample_settings, strength=settings.strength)
        return GridView(
            grid_id,
            prompt,
            grid.images,
            grid.trajectory.seeds,
            grid.trajectory.adapter_round,
            grid.seconds,
        )

    def pick(self, grid_id: int, best: int, worst: int, labeler: str = "") -> int:
        """Record best/worst; durable when it returns."""
        if best == worst:
            raise SettingsError("best and worst must be two different images")
        return self.session.add_pick(grid_id, best=best, worst=worst, labeler=labeler)

    def tie(self, grid_id: int, labeler: str = "") -> int:
        return self.session.add_pick(grid_id, best=None, worst=None, kind="tie", labeler=labeler)

    def skip(self, grid_id: int, labeler: str = "") -> int:
        return self.session.add_pick(grid_id, best=None, worst=None, kind="skip", labeler=labeler)

    def undo(self, labeler: str | None = None) -> int | None:
        return self.session.undo_last_pick(labeler)

    def picks_since_last_round(self) -> int:
        return len(self.session.training_picks(since_last_round=True))

    def add_prompts(self, text: str) -> int:
        """Add prompts, one a line; returns how many were new."""
        return self.session.add_prompts([line for line in text.splitlines() if line.strip()])

    def next_prompt(self, after: str | None = None) -> str | None:
        return self.session.next_prompt(after)

    # -- train ----------------------------------------------------------------------------------

    def train(
        self,
        config: RoundSettings | None = None,
        *,
        on_progress: Callable[[ProgressEvent], None] | None = None,
    ) -> tuple[int, dict]:
        """Train one round of the config's method (default: the engine's default method) on the
        picks since the last round (and earlier ones with replay); returns (round id, metrics)."""
        self._cancel.clear()
        with self._job():
            round_id, metrics = workflow.train_round(
                self.pipe,
                self.session,
                config,
                on_progress=on_progress,
                should_cancel=self._cancel.is_set,
            )
        return round_id, metrics

    def train_stream(
        self, config: RoundSettings | None = None
    ) -> Iterator[ProgressEvent | tuple[int, dict]]:
        """:meth:`train` in a worker thread, as a stream for a UI thread: the round's progress
        events, then (round id, metrics). The round's error is raised here."""
        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["result"] = self.train(config, on_progress=events.put)
            except BaseException as exc:  # raised below, in the caller's thread
                outcome["error"] = exc
            finally:
                events.put(None)

        threading.Thread(target=work, daemon=True).start()
        while (event := events.get()) is not None:
            yield event
        if "error" in outcome:
            raise outcome["error"]
        yield outcome["result"]

    def cancel_training(self) -> None:
        """Ask the running round to stop at its next step; it then commits nothing."""
        self._cancel.set()

    # -- compare --------------------------------------------------------------------------------

    @contextmanager
    def _round_adapter(self, round_id: int) -> Iterator[None]:
        """Temporarily put a round's adapter in the pipeline, then restore the active one."""
        unet = self.pipe.unet
        try:
            load_lora(unet, self.session.round_path(round_id))
            yield
        finally:
            active = self.session.active_round
            if active is None:
                remove_lora(unet)
            else:
                load_lora(unet, self.session.round_path(active))

    def compare(
        self, round_id: int, prompt: str, seeds: list[int]
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        """Base and round images for one prompt on the same seeds (independent noise)."""
        prompt = check_prompt(prompt or "")
        settings = replace(self.sample_settings, shared_noise=False)
        with self._job(), self._round_adapter(round_id):
            tuned = sample_grid(self.pipe, prompt, settings, seeds=seeds).images
            with base_model(self.pipe.unet):
                base = sample_grid(self.pipe, prompt, settings, seeds=seeds).images
        return base, tuned

    def blind_pair(self, round_id: int, prompt: str, seed: int | None = None) -> BlindPair:
        """One base/round image pair on the same seed, shown in random order."""
        rng = random.Random()
        seed = rng.randrange(2**31) if seed is None else seed
        (base,), (tuned,) = self.compare(round_id, prompt, [seed])
        if rng.random() < 0.5:
            return BlindPair(prompt, seed, round_id, base, tuned, left_is="a")
        return BlindPair(prompt, seed, round_id, tuned, base, left_is="b")

    def vote(self, pair: BlindPair, choice: str, labeler: str = "") -> pd.DataFrame:
        """Record a blind vote ('left', 'right' or 'tie'); returns the win rates."""
        if choice not in ("left", "right", "tie"):
            raise SettingsError(f"a vote is left, right or tie, not {choice!r}")
        right_is = "b" if pair.left_is == "a" else "a"
        winner = {"left": pair.left_is, "right": right_is, "tie": "tie"}[choice]
        self.session.add_comparison(
            prompt=pair.prompt,
            seed=pair.seed,
            round_a=None,
            round_b=pair.round_id,
            winner=winner,
            labeler=labeler,
            shown_left=pair.left_is,
        )
        return reports.win_rates(self.session)

    # -- history --------------------------------------------------------------------------------

    def rounds(self) -> pd.DataFrame:
        """The rounds, each with its held-out agreement (``heldout_agreement``: how it ranked
        the picks made after it; empty until the next round has measured it)."""
        rounds = self.session.rounds_df()
        heldout = reports.heldout_of(rounds)[["round", "agreement"]]
        heldout = heldout.rename(columns={"round": "id", "agreement": "heldout_agreement"})
        return rounds.merge(heldout, on="id", how="left")

    def round_warnings(self, round_id: int) -> tuple[list[str], int | None]:
        """Warnings on round ``round_id``, just trained (its held-out measure of the round
        before it, its distance from the base), and the round to offer a rollback to (None:
        the base model)."""
        return reports.round_warnings(self.session, round_id)

    def picks(self) -> pd.DataFrame:
        return self.session.picks_df()

    def agreement(self) -> pd.DataFrame:
        return reports.agreement_df(self.session)

    def labelers(self) -> pd.DataFrame:
        return reports.labelers_df(self.session)

    def pick_gallery(
        self, round_filter: int | str = "all", labeler: str | None = None, limit: int = 48
    ) -> list[tuple[Image.Image, str]]:
        """The latest best/worst picks as images, best beside worst, with a caption.

        ``round_filter``: "all", a round id (the picks it trained on) or "new" (not trained
        yet); ``labeler``: one person's picks (None: everyone's).
        """
        table = export.picks_table(self.session)
        table = table[table["kind"] == "pick"]
        if labeler is not None:
            table = table[table["labeler"] == labeler]
        if round_filter == "new":
            table = table[table["trained_round"].isna()]
        elif round_filter != "all":
            table = table[table["trained_round"] == int(round_filter)]
        shown = []
        for pick in table.sort_values("pick_id", ascending=False).head(limit).itertuples():
            best, worst, damaged = _pick_images(
                self.session.root, pick.best_image, pick.worst_image
            )
            trained = (
                "not trained yet"
                if pd.isna(pick.trained_round)
                else (f"round {int(pick.trained_round)}")
            )
            who = pick.labeler or "anonymous"
            caption = f"Pick {pick.pick_id} · {who} · {trained} · “{pick.prompt}”: best | worst"
            if damaged:
                caption += f" (cannot read {', '.join(damaged)}: damaged or missing)"
            shown.append((side_by_side(best, worst), caption))
        return shown

    def win_rates(self) -> pd.DataFrame:
        return reports.win_rates(self.session)

    def active_round(self) -> int | None:
        """The round whose adapter samples now (None: the base model)."""
        return self.session.active_round

    def activate(self, round_id: int | None) -> None:
        """Sample from a round's adapter from now on, or from the base model (None)."""
        with self._job():
            workflow.activate(self.pipe, self.session, round_id)

    # -- export ---------------------------------------------------------------------------------

    def _export_round(self) -> int:
        round_id = self.session.active_round
        if round_id is None:
            raise StudioError("no active round to export: train a round (or activate one)")
        return round_id

    def export_lora(self, out_dir: str | Path) -> Path:
        """The active round as a diffusers/peft LoRA folder, at the strength it samples at."""
        return export.export_diffusers(
            self.session, self._export_round(), out_dir, strength=self.sample_settings.strength
        )

    def export_kohya(self, out_file: str | Path) -> Path:
        """The active round as one kohya-format file for A1111/ComfyUI, at the strength it
        samples at."""
        self._export_round()
        with self._gpu:
            return export.export_kohya(
                self.pipe.unet,
                out_file,
                base_model=self.model,
                strength=self.sample_settings.strength,
            )

    def export_picks(self, out_file: str | Path) -> Path:
        return export.export_picks(self.session, out_file)
