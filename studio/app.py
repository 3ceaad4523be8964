"""The Gradio app: five tabs over one StudioController. Layout here, logic in the controller.

Callbacks only translate between widgets and controller verbs; per-tab UI state (the grid on
screen, the pending best pick, the blind pair) is small and lives in ``gr.State``.
"""

from __future__ import annotations

import queue
import tempfile
import threading
from pathlib import Path

import gradio as gr
import pandas as pd

from d3po_core.models import ModelLoadError
from d3po_core.session import SessionError
from d3po_core.trainer import D3POConfig, NoPicksError, RoundCancelled

from .controller import StudioController, StudioError

USER_ERRORS = (StudioError, NoPicksError, SessionError, ModelLoadError, ValueError)

KEYS_JS = """
() => {
  if (window.__d3poKeys) return;
  window.__d3poKeys = true;
  document.addEventListener('keydown', (e) => {
    const tag = (e.target.tagName || '').toLowerCase();
    if (tag === 'input' || tag === 'textarea' || e.ctrlKey || e.metaKey || e.altKey) return;
    const click = (id) => { const b = document.getElementById(id); if (b) b.click(); };
    if (e.key >= '1' && e.key <= '9') {
      const items = document.querySelectorAll('#grid .thumbnail-item, #grid button.thumbnail-item');
      const item = items[parseInt(e.key) - 1];
      if (item) { item.click(); e.preventDefault(); }
    } else if (e.key === 't') { click('tie-btn'); }
    else if (e.key === 's') { click('skip-btn'); }
    else if (e.key === 'u') { click('undo-btn'); }
    else if (e.key === 'g') { click('generate-btn'); }
  });
}
"""

HELP = {
    "beta": "Scale of the preference margin; higher trusts each pick more.",
    "learning_rate": "Step size of the LoRA updates.",
    "epochs": "Passes over this round's picks.",
    "pairs": "best-worst: one pair a pick; implied: also best>others>worst.",
    "reduction": "sum: true log-density ratio; mean: per-dimension (the original code).",
    "timestep_fraction": "Share of denoising steps trained per pair.",
    "reference": "base: stay close to the original model; previous: to the last round.",
}


def _labeler(name: str) -> str:
    return (name or "").strip()[:64]


def _error(exc: Exception) -> str:
    return f"⚠️ {exc}"


def _grid_caption(view) -> str:
    source = "base model" if view.adapter_round is None else f"round {view.adapter_round}"
    return f"Grid {view.grid_id} · “{view.prompt}” · {source} · {view.seconds:.1f} s"


def build_app(ctl: StudioController) -> gr.Blocks:
    """The Blocks app for a controller (not launched)."""
    defaults = D3POConfig()

    def counter() -> str:
        n = ctl.picks_since_last_round()
        return f"**{n}** pick(s) since the last round"

    with gr.Blocks(title="D3PO Studio") as app:
        gr.Markdown("# D3PO Studio\nPick the best and the worst image of each grid; train a round.")
        with gr.Row():
            labeler = gr.Textbox(label="Your name (saved with every pick)", scale=2)
            status = gr.Markdown("Ready.", elem_id="status")
        stored_name = gr.BrowserState("", storage_key="d3po-labeler")

        # -- Label ------------------------------------------------------------------------------
        with gr.Tab("Label", id="label"):
            with gr.Row():
                prompt = gr.Textbox(label="Prompt", value="a circle", scale=4, elem_id="prompt")
                grid_size = gr.Slider(2, 16, value=ctl.sample_settings.n, step=1, label="Grid size")
            with gr.Row():
                generate_btn = gr.Button("Generate (g)", variant="primary", elem_id="generate-btn")
                next_prompt_btn = gr.Button("Next prompt from list")
                tie_btn = gr.Button("Tie (t)", elem_id="tie-btn")
                skip_btn = gr.Button("Skip (s)", elem_id="skip-btn")
                undo_btn = gr.Button("Undo (u)", elem_id="undo-btn")
            picks_count = gr.Markdown(counter(), elem_id="pick-counter")
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
            shown = gr.State(None)  # grid id on screen
            pending_best = gr.State(None)

        # -- Train ------------------------------------------------------------------------------
        with gr.Tab("Train", id="train"):
            gr.Markdown("Settings start at safe defaults; hover the labels for what they do.")
            with gr.Row():
                beta = gr.Number(defaults.beta, label="beta", info=HELP["beta"])
                lr = gr.Number(
                    defaults.learning_rate, label="learning rate", info=HELP["learning_rate"]
                )
                epochs = gr.Slider(
                    1, 20, defaults.epochs, step=1, label="epochs", info=HELP["epochs"]
                )
            with gr.Row():
                pairs = gr.Radio(
                    ["best-worst", "implied"],
                    value=defaults.pairs,
                    label="pairs",
                    info=HELP["pairs"],
                )
                reduction = gr.Radio(
                    ["sum", "mean"],
                    value=defaults.reduction,
                    label="reduction",
                    info=HELP["reduction"],
                )
                reference = gr.Radio(
                    ["base", "previous"],
                    value=defaults.reference,
                    label="reference",
                    info=HELP["reference"],
                )
                fraction = gr.Slider(
                    0.1,
                    1.0,
                    defaults.timestep_fraction,
                    step=0.05,
                    label="timestep fraction",
                    info=HELP["timestep_fraction"],
                )
            with gr.Row():
                train_btn = gr.Button("Train a round", variant="primary", elem_id="train-btn")
                cancel_btn = gr.Button("Cancel", elem_id="cancel-btn")
            train_status = gr.Markdown("", elem_id="train-status")
            curve = gr.LinePlot(
                x="step", y="value", color="metric", label="Loss and accuracy", height=260
            )

        # -- Compare ----------------------------------------------------------------------------
        with gr.Tab("Compare", id="compare"):
            with gr.Row():
                round_pick = gr.Dropdown(label="Round", choices=[], elem_id="round-pick")
                compare_prompt = gr.Textbox(label="Prompt", value="a circle")
                n_seeds = gr.Slider(1, 8, 4, step=1, label="Seeds")
            side_btn = gr.Button("Side by side")
            with gr.Row():
                base_gallery = gr.Gallery(label="Base", columns=4, allow_preview=False)
                tuned_gallery = gr.Gallery(label="Round", columns=4, allow_preview=False)
            gr.Markdown(
                "### Blind A/B\n"
                "Which do you prefer? The order is random; it is revealed after the vote."
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
            rates = gr.Dataframe(label="Win rate of each round vs base", interactive=False)
            blind = gr.State(None)

        # -- History ----------------------------------------------------------------------------
        with gr.Tab("History", id="history"):
            refresh_btn = gr.Button("Refresh")
            metrics_plot = gr.LinePlot(
                x="round", y="value", color="metric", label="Metrics per round", height=240
            )
            rounds_table = gr.Dataframe(label="Rounds", interactive=False, elem_id="rounds-table")
            with gr.Row():
                activate_pick = gr.Dropdown(label="Activate round", choices=[])
                activate_btn = gr.Button("Activate")
                base_btn = gr.Button("Roll back to the base model")
            picks_table = gr.Dataframe(label="Picks", interactive=False)
            agreement_table = gr.Dataframe(label="Agreement between labelers", interactive=False)

        # -- Export -----------------------------------------------------------------------------
        with gr.Tab("Export", id="export"):
            gr.Markdown(
                "The active round's LoRA, for diffusers and for A1111/ComfyUI; "
                "your picks as tables."
            )
            with gr.Row():
                lora_btn = gr.Button("LoRA (diffusers/peft)")
                kohya_btn = gr.Button("LoRA (A1111/ComfyUI)")
                parquet_btn = gr.Button("Picks (parquet)")
                jsonl_btn = gr.Button("Picks (JSONL)")
            export_file = gr.File(label="Download", interactive=False)
            export_status = gr.Markdown("")

        # -- callbacks: Label -------------------------------------------------------------------
        def show_grid(text, n, progress=gr.Progress()):
            try:
                view = ctl.generate(
                    text, int(n), on_step=lambda s, t: progress(s / t, desc="sampling")
                )
            except USER_ERRORS as exc:  # the grid on screen stays as it was
                return gr.update(), gr.update(), gr.update(), gr.update(), _error(exc)
            return view.images, view.grid_id, None, _grid_caption(view), "Click the **best** image."

        def select(grid_id, best, name, evt: gr.SelectData):
            if grid_id is None:
                return best, "Generate a grid first.", counter(), False
            index = evt.index
            if best is None:
                return index, f"Best: image {index + 1}. Now click the **worst**.", counter(), False
            if index == best:
                return (
                    best,
                    "That is the best one; click a different image for the worst.",
                    counter(),
                    False,
                )
            try:
                pick_id = ctl.pick(grid_id, best, index, labeler=_labeler(name))
            except USER_ERRORS as exc:
                return None, _error(exc), counter(), False
            return (
                None,
                f"Saved pick {pick_id} (best {best + 1}, worst {index + 1}).",
                counter(),
                True,
            )

        def mark(kind, grid_id, name):
            if grid_id is None:
                return "Generate a grid first.", counter(), False
            try:
                pick_id = getattr(ctl, kind)(grid_id, labeler=_labeler(name))
            except USER_ERRORS as exc:
                return _error(exc), counter(), False
            return f"Saved {kind} ({pick_id}).", counter(), True

        def undo(name):
            undone = ctl.undo(_labeler(name) or None)
            return ("Nothing to undo." if undone is None else f"Undid pick {undone}."), counter()

        def next_prompt(text):
            return ctl.next_prompt(text) or text

        def maybe_next_grid(advance, text, n, progress=gr.Progress()):
            """After a saved pick: the next grid, for the next prompt of the list if any."""
            if not advance:
                return (gr.update(),) * 6
            text = ctl.next_prompt(text) or text
            return (text, *show_grid(text, n, progress))

        advance = gr.State(False)
        generate_btn.click(
            show_grid,
            [prompt, grid_size],
            [grid, shown, pending_best, grid_info, status],
            concurrency_id="gpu",
            concurrency_limit=1,
        )

        def then_next_grid(event) -> None:
            """After a saved pick, tie or skip, the next grid comes on its own."""
            event.then(
                maybe_next_grid,
                [advance, prompt, grid_size],
                [prompt, grid, shown, pending_best, grid_info, status],
                concurrency_id="gpu",
                concurrency_limit=1,
            )

        marked = [pending_best, status, picks_count, advance]
        then_next_grid(grid.select(select, [shown, pending_best, labeler], marked))
        for button, kind in ((tie_btn, "tie"), (skip_btn, "skip")):
            then_next_grid(
                button.click(
                    lambda g, n, k=kind: mark(k, g, n),
                    [shown, labeler],
                    [status, picks_count, advance],
                )
            )
        undo_btn.click(undo, [labeler], [status, picks_count])
        next_prompt_btn.click(next_prompt, [prompt], [prompt])
        add_prompts_btn.click(
            lambda text: f"Added {ctl.add_prompts(text or '')} prompt(s) to the list.",
            [prompt_list],
            [status],
        )
        labeler.change(lambda name: name, [labeler], [stored_name])
        app.load(lambda saved: saved or gr.update(), [stored_name], [labeler]).then(
            counter, None, [picks_count]
        )

        # -- callbacks: Train -------------------------------------------------------------------
        def train(b, rate, ep, pr, red, ref, frac, progress=gr.Progress()):
            """Runs the round in a worker thread and streams the loss/accuracy curve."""
            try:
                config = D3POConfig(
                    beta=float(b),
                    learning_rate=float(rate),
                    epochs=int(ep),
                    pairs=pr,
                    reduction=red,
                    reference=ref,
                    timestep_fraction=float(frac),
                )
                config.validate()
            except (TypeError, ValueError) as exc:
                yield _error(exc), gr.update(), counter()
                return
            events: queue.Queue = queue.Queue()
            outcome: dict = {}

            def work() -> None:
                try:
                    outcome["result"] = ctl.train(config, on_progress=events.put)
                except BaseException as exc:  # reported below, in the UI thread
                    outcome["error"] = exc
                finally:
                    events.put(None)

            threading.Thread(target=work, daemon=True).start()
            rows: list[dict] = []
            while (event := events.get()) is not None:
                progress(
                    event.step / event.total,
                    desc=f"step {event.step}/{event.total}, ETA {event.eta_s:.0f} s",
                )
                rows += [
                    {"step": event.step, "metric": "loss", "value": event.loss},
                    {"step": event.step, "metric": "accuracy", "value": event.accuracy},
                ]
                text = f"Training: step {event.step}/{event.total}, ETA {event.eta_s:.0f} s"
                yield text, pd.DataFrame(rows), gr.update()
            error = outcome.get("error")
            if isinstance(error, RoundCancelled):
                text = "Cancelled; nothing was saved and your picks wait for the next round."
                yield text, gr.update(), counter()
            elif isinstance(error, USER_ERRORS):
                yield _error(error), gr.update(), counter()
            elif error is not None:
                raise error
            else:
                round_id, metrics = outcome["result"]
                text = (
                    f"Round {round_id} saved and active: loss {metrics['loss']:.4f}, "
                    f"accuracy {metrics['accuracy']:.2f}, {metrics['seconds']:.1f} s."
                )
                yield text, gr.update(), counter()

        train_event = train_btn.click(
            train,
            [beta, lr, epochs, pairs, reduction, reference, fraction],
            [train_status, curve, picks_count],
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        cancel_btn.click(
            lambda: (ctl.cancel_training(), "Cancelling…")[1],
            None,
            [train_status],
            concurrency_limit=None,
        )

        # -- callbacks: Compare -----------------------------------------------------------------
        def round_choices():
            ids = [int(r) for r in ctl.rounds()["id"]] if len(ctl.rounds()) else []
            return gr.update(choices=ids, value=ids[-1] if ids else None)

        def side_by_side(round_id, text, n, progress=gr.Progress()):
            if round_id is None:
                return gr.update(), gr.update(), "Train a round first."
            try:
                base, tuned = ctl.compare(int(round_id), text, list(range(int(n))))
            except USER_ERRORS as exc:
                return gr.update(), gr.update(), _error(exc)
            return base, tuned, f"Base vs round {round_id}, seeds 0–{int(n) - 1}."

        def new_pair(round_id, text):
            if round_id is None:
                return None, None, None, "Train a round first."
            try:
                pair = ctl.blind_pair(int(round_id), text)
            except USER_ERRORS as exc:
                return None, None, None, _error(exc)
            return pair.left, pair.right, pair, "Vote: which is better?"

        def vote(pair, choice, name):
            if pair is None:
                return None, "Ask for a new pair first.", gr.update()
            table = ctl.vote(pair, choice, labeler=_labeler(name))
            left = "base" if pair.left_is == "a" else f"round {pair.round_id}"
            right = f"round {pair.round_id}" if pair.left_is == "a" else "base"
            return None, f"Left was **{left}**, right was **{right}**.", _rates(table)

        side_btn.click(
            side_by_side,
            [round_pick, compare_prompt, n_seeds],
            [base_gallery, tuned_gallery, status],
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        pair_btn.click(
            new_pair,
            [round_pick, compare_prompt],
            [left_img, right_img, blind, reveal],
            concurrency_id="gpu",
            concurrency_limit=1,
        )
        for button, choice in ((left_btn, "left"), (right_btn, "right"), (tie_vote_btn, "tie")):
            button.click(
                lambda p, n, c=choice: vote(p, c, n), [blind, labeler], [blind, reveal, rates]
            )

        # -- callbacks: History -----------------------------------------------------------------
        def history():
            rounds = ctl.rounds()
            metric_cols = [
                c for c in ("metric_loss", "metric_accuracy", "metric_mean_delta") if c in rounds
            ]
            long = (
                rounds.melt(
                    id_vars="id", value_vars=metric_cols, var_name="metric", value_name="value"
                ).rename(columns={"id": "round"})
                if len(rounds)
                else pd.DataFrame({"round": [], "metric": [], "value": []})
            )
            long["metric"] = long["metric"].str.removeprefix("metric_")
            shown_cols = [
                c
                for c in (
                    "id",
                    "active",
                    "created",
                    "metric_picks",
                    "metric_loss",
                    "metric_accuracy",
                    "metric_seconds",
                )
                if c in rounds
            ]
            ids = [int(r) for r in rounds["id"]] if len(rounds) else []
            return (
                long,
                rounds[shown_cols],
                ctl.picks().drop(columns=["created"], errors="ignore"),
                ctl.agreement(),
                gr.update(choices=ids),
                round_choices(),
                _rates(ctl.win_rates()),
            )

        history_outputs = [
            metrics_plot,
            rounds_table,
            picks_table,
            agreement_table,
            activate_pick,
            round_pick,
            rates,
        ]
        refresh_btn.click(history, None, history_outputs)
        train_event.then(history, None, history_outputs)  # new round in Compare/History

        def activate(round_id):
            try:
                ctl.activate(None if round_id is None else int(round_id))
            except USER_ERRORS as exc:
                return _error(exc)
            return "Base model active." if round_id is None else f"Round {round_id} active."

        activate_btn.click(
            activate, [activate_pick], [status], concurrency_id="gpu", concurrency_limit=1
        ).then(history, None, history_outputs)
        base_btn.click(
            lambda: activate(None), None, [status], concurrency_id="gpu", concurrency_limit=1
        ).then(history, None, history_outputs)
        app.load(history, None, history_outputs)

        # -- callbacks: Export ------------------------------------------------------------------
        out_dir = Path(tempfile.mkdtemp(prefix="d3po-export-"))

        def do_export(kind):
            try:
                if kind == "lora":
                    path = ctl.export_lora(out_dir / f"round-{ctl.session.active_round}-lora")
                elif kind == "kohya":
                    path = ctl.export_kohya(
                        out_dir / f"d3po-round-{ctl.session.active_round}.safetensors"
                    )
                else:
                    path = ctl.export_picks(out_dir / f"picks.{kind}")
            except USER_ERRORS as exc:
                return None, _error(exc)
            return str(path), f"Exported {path.name}."

        for button, kind in (
            (lora_btn, "lora"),
            (kohya_btn, "kohya"),
            (parquet_btn, "parquet"),
            (jsonl_btn, "jsonl"),
        ):
            button.click(lambda k=kind: do_export(k), None, [export_file, export_status])
    app.queue(default_concurrency_limit=None)
    return app


def _rates(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return pd.DataFrame({"round": [], "wins": [], "losses": [], "ties": [], "win_rate": []})
    base = table[table["round_a"].isna()]
    return base.rename(columns={"round_b": "round"})[
        ["round", "wins", "losses", "ties", "win_rate"]
    ]
