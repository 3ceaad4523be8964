"""The studio's five tabs, one function each: layout and callbacks over the controller.

A callback only translates between widgets and controller verbs. Settings controls come from
their declarations (:mod:`studio.controls`), captions and tables from :mod:`studio.views`.
Labeling state (the grid on screen, the pending best) lives on the server, per browser tab
(:mod:`studio.labeling`); other per-tab state (the blind pair) is small and lives in
``gr.State``. A failed action shows one line (:meth:`StudioController.attempt`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import pandas as pd

from d3po_core.errors import RoundCancelled
from d3po_core.methods import METHODS
from d3po_core.settings import SampleSettings

from . import controls, views
from .labeling import LOADING, Labeling
from .starting import Starting

GPU = {"concurrency_id": "gpu", "concurrency_limit": 1}  # one sampling/training job at a time
# clicks and keys on a grid are applied one at a time, in the order they arrive
IN_ORDER = {"concurrency_id": "labels", "concurrency_limit": 1}


def _labeler(name: str) -> str:
    return (name or "").strip()[:64]


@dataclass
class Shared:
    """Components more than one tab reads or writes (set as the tabs are laid out)."""

    labeler: gr.Textbox
    status: gr.Markdown
    picks_count: gr.Markdown | None = None
    sampling: dict[str, gr.components.Component] = field(default_factory=dict)  # by setting
    round_pick: gr.Dropdown | None = None
    rates: gr.Dataframe | None = None


def label_tab(ctl: Starting, shared: Shared) -> None:
    """Prompt, grid size and sampling; click best then worst (keys 1–9), tie, skip, undo."""
    sample = ctl.peek(lambda c: c.sample_settings, SampleSettings())  # the model's, once in
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value="a circle", scale=4, elem_id="prompt")
        sample_controls = {
            path: controls.gradio_control(controls.SAMPLE_ROOT, path, getattr(sample, path))
            for path in controls.LABEL_MAIN
        }
    with gr.Accordion("Sampling", open=False):
        for path in controls.SAMPLING:
            sample_controls[path] = controls.gradio_control(
                controls.SAMPLE_ROOT, path, getattr(sample, path)
            )
    with gr.Row():
        generate_btn = gr.Button("Generate (g)", variant="primary", elem_id="generate-btn")
        next_prompt_btn = gr.Button("Next prompt from list")
        tie_btn = gr.Button("Tie (t)", elem_id="tie-btn")
        skip_btn = gr.Button("Skip (s)", elem_id="skip-btn")
        undo_btn = gr.Button("Undo (u)", elem_id="undo-btn")
    shared.sampling = sample_controls
    waiting = ctl.peek(lambda c: views.picks_waiting(c.picks_since_last_round()), "")
    picks_count = shared.picks_count = gr.Markdown(waiting, elem_id="pick-counter")
    grid_info = gr.Markdown("", elem_id="grid-info")
    grid = gr.Gallery(
        label="Click the best, then the worst (keys 1–9)",
        columns=4,
        allow_preview=False,
        elem_id="grid",
        height="auto",
    )
    with gr.Accordion("Prompt list", open=False):
        prompt_list = gr.Textbox(label="Prompts, one a line", lines=4)
        add_prompts_btn = gr.Button("Add to the list")
    status, labeler = shared.status, shared.labeler
    labeling = Labeling(ctl)  # each tab's grid on screen and pending best, on the server

    def count() -> str:
        return views.picks_waiting(ctl.picks_since_last_round())

    def sample_grid(text, data, progress):
        values = {path: data[c] for path, c in sample_controls.items()}
        settings = controls.settings_from(ctl.sample_settings, values)
        return ctl.generate(
            text, settings=settings, on_step=lambda s, t: progress(s / t, desc="sampling")
        )

    def show_grid(data, request: gr.Request, progress=gr.Progress()):
        labeling.loading(request.session_hash)  # clicks wait until the grid is on screen
        if not ctl.is_loaded:  # the studio has just started: the grid waits for the model
            progress(0, desc="loading the model")
        view, error = ctl.attempt(sample_grid, data[prompt], data, progress)
        if error:  # the grid on screen stays as it was
            labeling.settled(request.session_hash)
            return gr.update(), gr.update(), error
        labeling.arrived(request.session_hash, view.grid_id)
        shown = gr.Gallery(
            value=views.crisp(view.images), columns=views.grid_columns(len(view.images))
        )
        return shown, views.grid_caption(view), LOADING

    def grid_ready(request: gr.Request):
        """Chained after a grid is shown: from now on clicks and keys count on it."""
        if labeling.ready(request.session_hash):
            return "Click the **best** image."
        return gr.update()

    def next_grid(data, request: gr.Request, progress=gr.Progress()):
        """After a saved pick: the next grid, for the next prompt of the list if any (the
        server knows whether a save asked for it: a browser state could be stale)."""
        if not labeling.take_next(request.session_hash):
            return (gr.update(),) * 4
        text = ctl.next_prompt(data[prompt]) or data[prompt]
        return (text, *show_grid({**data, prompt: text}, request, progress))

    def select(name, evt: gr.SelectData, request: gr.Request):
        said = labeling.select(request.session_hash, evt.index, _labeler(name))
        return said.message, count()

    def marker(kind: str):
        def mark(name, request: gr.Request):
            said = labeling.mark(request.session_hash, kind, _labeler(name))
            return said.message, count()

        return mark

    def undo(name):
        undone, error = ctl.attempt(ctl.undo, _labeler(name) or None)
        said = error or ("Nothing to undo." if undone is None else f"Undid pick {undone}.")
        return said, count()

    def add_prompts(text):
        added, error = ctl.attempt(ctl.add_prompts, text or "")
        return error or f"Added {added} prompt(s) to the list."

    grid_inputs = {prompt, *sample_controls.values()}
    grid_outputs = [grid, grid_info, status]
    generate_btn.click(show_grid, grid_inputs, grid_outputs, **GPU).then(
        grid_ready, None, [status], **IN_ORDER
    )

    # "multiple": a click or a chained next grid is never dropped because an earlier one (say
    # the no-op chain after a best click, waiting behind a sampling job) is still pending
    def then_next_grid(event) -> None:
        inputs, outputs = grid_inputs, [prompt, *grid_outputs]
        shown = event.then(next_grid, inputs, outputs, trigger_mode="multiple", **GPU)
        shown.then(grid_ready, None, [status], trigger_mode="multiple", **IN_ORDER)

    marked = [status, picks_count]
    picked = grid.select(select, [labeler], marked, trigger_mode="multiple", **IN_ORDER)
    then_next_grid(picked)
    for button, kind in ((tie_btn, "tie"), (skip_btn, "skip")):
        event = button.click(
            marker(kind),
            [labeler],
            marked,
            trigger_mode="multiple",
            **IN_ORDER,
        )
        then_next_grid(event)
    undo_btn.click(undo, [labeler], [status, picks_count])
    next_prompt_btn.click(lambda text: ctl.next_prompt(text) or text, [prompt], [prompt])
    add_prompts_btn.click(add_prompts, [prompt_list], [status])


def train_tab(ctl: Starting, shared: Shared):
    """Round settings (main and advanced), progress with ETA, the loss/accuracy curve, cancel.

    Returns the train event, so that other tabs can refresh after it.
    """
    gr.Markdown("Settings start at safe defaults; the text under each says what it does.")
    method = gr.Radio(
        [(METHODS[name].summary, name) for name in controls.TRAIN_FORMS],
        value=controls.DEFAULT_METHOD,
        label="Method",
        elem_id="train-method",
    )
    forms: dict[str, dict[str, gr.components.Component]] = {}
    groups = []
    for name, form in controls.TRAIN_FORMS.items():
        with gr.Group(visible=name == controls.DEFAULT_METHOD) as group:
            with gr.Row():
                found = {p: controls.gradio_control(form.root, p, min_width=200) for p in form.main}
            with gr.Accordion("Advanced", open=False), gr.Row():
                for path in form.advanced:
                    found[path] = controls.gradio_control(form.root, path, min_width=200)
        forms[name], groups = found, [*groups, group]
    method.change(
        lambda chosen: [gr.update(visible=name == chosen) for name in controls.TRAIN_FORMS],
        [method],
        groups,
    )
    inputs = {method} | {c for found in forms.values() for c in found.values()}
    with gr.Row():
        train_btn = gr.Button("Train a round", variant="primary", elem_id="train-btn")
        cancel_btn = gr.Button("Cancel", elem_id="cancel-btn")
    train_status = gr.Markdown("", elem_id="train-status")
    rollback_btn = gr.Button("Roll back", visible=False, elem_id="rollback-btn")
    rollback_to = gr.State(None)
    curve = gr.LinePlot(x="step", y="value", color="metric", label="Loss and accuracy", height=260)

    def train(data, progress=gr.Progress()):
        """Streams the round's progress and loss/accuracy curve as it trains; the result
        says the held-out agreement and offers a rollback when a warning was raised."""
        rows: list[dict] = []
        rollback, target = gr.update(visible=False), None
        try:
            chosen = data[method]
            values = {path: data[c] for path, c in forms[chosen].items()}
            config = controls.settings_from(controls.TRAIN_FORMS[chosen].root(), values)
            for event in ctl.train_stream(config):
                if isinstance(event, tuple):  # the round is saved: (round id, metrics)
                    round_id, metrics = event
                    warnings, target = ctl.round_warnings(round_id)
                    text = views.round_saved(round_id, metrics, warnings)
                    if warnings:
                        rollback = gr.update(visible=True, value=views.rollback_label(target))
                    break
                progress(event.step / event.total, desc=views.progress_text(event))
                if not event.message:  # a note has no loss to plot
                    rows += views.curve_rows(event)
                yield (
                    f"Training: {views.progress_text(event)}",
                    pd.DataFrame(rows),
                    gr.update(),
                    rollback,
                    target,
                )
        except RoundCancelled:
            text = views.CANCELLED
        except Exception as exc:
            text = ctl.describe_error(exc)
        picks = views.picks_waiting(ctl.picks_since_last_round())
        yield text, gr.update(), picks, rollback, target

    def roll_back(target):
        _, error = ctl.attempt(ctl.activate, target)
        return error or views.activated(target), gr.update(visible=False)

    cancel_btn.click(
        lambda: (ctl.cancel_training(), "Cancelling…")[1],
        None,
        [train_status],
        concurrency_limit=None,
    )
    rollback_btn.click(roll_back, [rollback_to], [train_status, rollback_btn], **GPU)
    outputs = [train_status, curve, shared.picks_count, rollback_btn, rollback_to]
    return train_btn.click(train, inputs, outputs, **GPU)


def compare_tab(ctl: Starting, shared: Shared) -> None:
    """Base vs a round side by side on the same seeds; blind A/B votes with a win rate."""
    with gr.Row():
        round_pick = shared.round_pick = gr.Dropdown(
            label="Round", choices=[], elem_id="round-pick"
        )
        compare_prompt = gr.Textbox(label="Prompt", value="a circle")
        n_seeds = gr.Slider(1, 8, 4, step=1, label="Seeds")
    side_btn = gr.Button("Side by side")
    with gr.Row():
        base_gallery = gr.Gallery(label="Base", columns=4, allow_preview=False)
        tuned_gallery = gr.Gallery(label="Round", columns=4, allow_preview=False)
    gr.Markdown(
        "### Blind A/B\nWhich do you prefer? The order is random; it is revealed after the vote."
    )
    pair_btn = gr.Button("New pair", elem_id="pair-btn")
    with gr.Row():
        left_img = gr.Image(label="Left", interactive=False, elem_id="left-img")
        right_img = gr.Image(label="Right", interactive=False, elem_id="right-img")
    with gr.Row():
        left_btn = gr.Button("Left is better", elem_id="vote-left")
        tie_vote_btn = gr.Button("Tie", elem_id="vote-tie")
        right_btn = gr.Button("Right is better", elem_id="vote-right")
    reveal = gr.Markdown("", elem_id="reveal")
    rates = shared.rates = gr.Dataframe(label="Win rate of each round vs base", interactive=False)
    blind = gr.State(None)

    def side_by_side(round_id, text, n, progress=gr.Progress()):
        if round_id is None:
            return gr.update(), gr.update(), "Train a round first."
        seeds = list(range(int(n)))
        images, error = ctl.attempt(ctl.compare, int(round_id), text, seeds)
        if error:
            return gr.update(), gr.update(), error
        base, tuned = (views.crisp(side) for side in images)
        return base, tuned, f"Base vs round {round_id}, seeds 0–{int(n) - 1}."

    def new_pair(round_id, text):
        if round_id is None:
            return None, None, None, "Train a round first."
        pair, error = ctl.attempt(ctl.blind_pair, int(round_id), text)
        if error:
            return None, None, None, error
        left, right = views.crisp([pair.left, pair.right])
        return left, right, pair, "Vote: which is better?"

    def vote(pair, choice, name):
        if pair is None:
            return None, "Ask for a new pair first.", gr.update()
        table, error = ctl.attempt(ctl.vote, pair, choice, labeler=_labeler(name))
        if error:
            return pair, error, gr.update()
        return None, views.reveal_text(pair), views.win_rate_table(table)

    side_btn.click(
        side_by_side,
        [round_pick, compare_prompt, n_seeds],
        [base_gallery, tuned_gallery, shared.status],
        **GPU,
    )
    pair_btn.click(
        new_pair, [round_pick, compare_prompt], [left_img, right_img, blind, reveal], **GPU
    )
    for button, choice in ((left_btn, "left"), (right_btn, "right"), (tie_vote_btn, "tie")):
        button.click(
            lambda p, n, c=choice: vote(p, c, n), [blind, shared.labeler], [blind, reveal, rates]
        )


def history_tab(ctl: Starting, shared: Shared) -> tuple[Callable, None, list]:
    """Rounds, picks and labeler agreement as tables, metrics per round; activate a round.

    Returns the listener that refreshes the history, Compare's round list and the win rates,
    as ``(fn, inputs, outputs)`` for ``event.then(*...)`` and ``app.load(*...)``.
    """
    refresh_btn = gr.Button("Refresh")
    metrics_plot = gr.Plot(label="Metrics per round", elem_id="metrics-plot")
    rounds_table = gr.Dataframe(label="Rounds", interactive=False, elem_id="rounds-table")
    with gr.Row():
        activate_pick = gr.Dropdown(label="Activate round", choices=[])
        activate_btn = gr.Button("Activate")
        base_btn = gr.Button("Roll back to the base model")
    gr.Markdown("**What the model was taught**: each pick's best beside its worst.")
    with gr.Row():
        gallery_round = gr.Dropdown(
            [("all rounds", "all"), ("not trained yet", "new")], value="all", label="Round"
        )
        gallery_labeler = gr.Dropdown([("everyone", "")], value="", label="Labeler")
    pick_gallery = gr.Gallery(
        columns=3,
        allow_preview=True,
        height="auto",
        object_fit="contain",
        elem_id="pick-gallery",
        label="Picks",
    )
    labelers_table = gr.Dataframe(label="Labelers", interactive=False, elem_id="labelers-table")
    agreement_table = gr.Dataframe(label="Agreement between labelers", interactive=False)
    picks_table = gr.Dataframe(label="Picks", interactive=False)

    def gallery(round_filter, labeler):
        return ctl.pick_gallery(round_filter or "all", labeler or None)

    def refresh(round_filter="all", labeler=""):
        rounds = ctl.rounds()
        ids = views.round_ids(rounds)
        names = sorted(n for n in ctl.picks()["labeler"].unique() if n)
        return (
            views.metrics_figure(rounds),
            views.round_table(rounds),
            views.picks_table(ctl.picks()),
            views.labelers_table(ctl.labelers()),
            views.agreement_table(ctl.agreement()),
            gr.update(choices=ids),
            gr.update(choices=ids, value=ids[-1] if ids else None),
            views.win_rate_table(ctl.win_rates()),
            gr.update(
                choices=[("all rounds", "all"), ("not trained yet", "new")]
                + [(f"round {i}", str(i)) for i in ids]
            ),
            gr.update(choices=[("everyone", "")] + [(n, n) for n in names]),
            gallery(round_filter, labeler),
        )

    outputs = [
        metrics_plot,
        rounds_table,
        picks_table,
        labelers_table,
        agreement_table,
        activate_pick,
        shared.round_pick,
        shared.rates,
        gallery_round,
        gallery_labeler,
        pick_gallery,
    ]
    for choice in (gallery_round, gallery_labeler):
        choice.input(gallery, [gallery_round, gallery_labeler], [pick_gallery])

    def activate(round_id):
        round_id = None if round_id is None else int(round_id)
        _, error = ctl.attempt(ctl.activate, round_id)
        return error or views.activated(round_id)

    refresh_btn.click(refresh, [gallery_round, gallery_labeler], outputs)
    activate_btn.click(activate, [activate_pick], [shared.status], **GPU).then(
        refresh, None, outputs
    )
    base_btn.click(lambda: activate(None), None, [shared.status], **GPU).then(
        refresh, None, outputs
    )
    return refresh, None, outputs


def export_tab(ctl: Starting) -> None:
    """The active round's LoRA for diffusers and for A1111/ComfyUI; the picks as tables."""
    gr.Markdown(
        "The active round's LoRA, for diffusers and for A1111/ComfyUI; your picks as tables."
    )
    with gr.Row():
        lora_btn = gr.Button("LoRA (diffusers/peft)")
        kohya_btn = gr.Button("LoRA (A1111/ComfyUI)")
        parquet_btn = gr.Button("Picks (parquet)")
        jsonl_btn = gr.Button("Picks (JSONL)")
    export_file = gr.File(label="Download", interactive=False)
    export_status = gr.Markdown("")
    out_dir = Path(tempfile.mkdtemp(prefix="d3po-export-"))

    def export(kind: str) -> Path:
        if kind == "lora":
            return ctl.export_lora(out_dir / f"round-{ctl.active_round()}-lora")
        if kind == "kohya":
            return ctl.export_kohya(out_dir / f"d3po-round-{ctl.active_round()}.safetensors")
        return ctl.export_picks(out_dir / f"picks.{kind}")

    def do_export(kind: str):
        path, error = ctl.attempt(export, kind)
        if error:
            return None, error
        strength = ctl.peek(lambda c: c.sample_settings.strength, 1.0)
        if kind in ("lora", "kohya") and strength != 1:
            return str(path), (
                f"Exported {path.name}, at adapter strength {strength:g} (as the studio samples): "
                "load it at weight 1."
            )
        return str(path), f"Exported {path.name}."

    for button, kind in (
        (lora_btn, "lora"),
        (kohya_btn, "kohya"),
        (parquet_btn, "parquet"),
        (jsonl_btn, "jsonl"),
    ):
        button.click(lambda k=kind: do_export(k), None, [export_file, export_status])
