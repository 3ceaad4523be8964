"""ipywidgets panels for Jupyter: the studio's tabs as widgets over the same controller.

Each panel is one line in a notebook (``LabelPanel(ctl)``) and displays itself; its buttons
call controller verbs only. A script or a test drives a panel by calling ``button.click()``,
exactly as a click would. Settings widgets come from their declarations
(:mod:`studio.controls`), messages and tables from :mod:`studio.views`, as in the app.
"""

from __future__ import annotations

import io
import re

import ipywidgets as widgets
import pandas as pd
from PIL import Image

from d3po_core.errors import RoundCancelled
from d3po_core.objectives import METHODS

from . import controls, views
from .controller import StudioController


def _png(image: Image.Image, size: int = 160) -> bytes:
    buffer = io.BytesIO()
    image.resize((size, size), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def _html(markdown: str) -> str:
    """The views' short Markdown (bold only) as HTML."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", markdown).replace("\n\n", "<br><br>")


def _settings_box(
    root: type, main: tuple[str, ...], more: tuple[str, ...], title: str, base=None
) -> tuple[dict[str, widgets.Widget], widgets.Widget]:
    """Widgets for the main settings and, folded under ``title``, the others."""
    value = (lambda path: getattr(base, path)) if base is not None else (lambda path: None)
    found = {path: controls.widget(root, path, value(path)) for path in main + more}
    folded = widgets.Accordion(
        children=[widgets.VBox([found[p] for p in more])], titles=(title,), selected_index=None
    )
    return found, widgets.VBox([widgets.HBox([found[p] for p in main]), folded])


class _Panel:
    def __init__(self, ctl: StudioController) -> None:
        self.ctl = ctl
        self.status = widgets.HTML("")

    def _say(self, text: str) -> None:
        self.status.value = _html(text)

    def _attempt(self, action, *args, **kwargs):
        """The action's result, or None after showing why it failed."""
        result, error = self.ctl.attempt(action, *args, **kwargs)
        if error:
            self._say(error)
        return result, error

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class LabelPanel(_Panel):
    """Generate a grid, mark the best and the worst image, save; the next grid follows."""

    def __init__(self, ctl: StudioController, labeler: str = "") -> None:
        super().__init__(ctl)
        self.labeler = widgets.Text(value=labeler, description="Name")
        self.prompt = widgets.Text(value="a circle", description="Prompt")
        self.sampling, settings_box = _settings_box(
            controls.SAMPLE_ROOT,
            controls.LABEL_MAIN,
            controls.SAMPLING,
            "Sampling",
            ctl.sample_settings,
        )
        self.grid_size = self.sampling["n"]
        self.generate_button = widgets.Button(description="Generate", button_style="primary")
        self.save_button = widgets.Button(description="Save pick", button_style="success")
        self.tie_button = widgets.Button(description="Tie")
        self.skip_button = widgets.Button(description="Skip")
        self.undo_button = widgets.Button(description="Undo")
        self.counter = widgets.HTML("")
        self.model = widgets.HTML(_html(views.model_line(ctl.model_info())))
        self.grid_box = widgets.GridBox(
            layout=widgets.Layout(grid_template_columns="repeat(4, 180px)")
        )
        self.roles: list[widgets.ToggleButtons] = []
        self.grid_id: int | None = None
        self.generate_button.on_click(lambda _: self.generate())
        self.save_button.on_click(lambda _: self.save())
        self.tie_button.on_click(lambda _: self._mark("tie"))
        self.skip_button.on_click(lambda _: self._mark("skip"))
        self.undo_button.on_click(lambda _: self.undo())
        buttons = [self.generate_button, self.save_button, self.tie_button, self.skip_button]
        self.widget = widgets.VBox(
            [
                self.model,
                widgets.HBox([self.labeler, self.prompt]),
                settings_box,
                widgets.HBox([*buttons, self.undo_button]),
                self.counter,
                self.grid_box,
                self.status,
            ]
        )
        self._count()

    def _count(self) -> None:
        self.counter.value = _html(views.picks_waiting(self.ctl.picks_since_last_round()))

    def _sample(self, seed: int | None):
        values = {path: w.value for path, w in self.sampling.items()}
        settings = controls.settings_from(self.ctl.sample_settings, values)
        return self.ctl.generate(self.prompt.value, settings=settings, seed=seed)

    def generate(self, seed: int | None = None) -> None:
        view, error = self._attempt(self._sample, seed)
        if error:
            return
        self.grid_id = view.grid_id
        self.roles = [
            widgets.ToggleButtons(
                options=["—", "best", "worst"], value="—", style={"button_width": "52px"}
            )
            for _ in view.images
        ]
        self.grid_box.children = [
            widgets.VBox([widgets.Image(value=_png(img), width=160, height=160), role])
            for img, role in zip(view.images, self.roles, strict=True)
        ]
        self._say(f"{views.grid_caption(view)}: mark the best and the worst, then Save pick.")

    def choose(self, best: int, worst: int) -> None:
        """Set the toggles as a user would (used by scripts and tests)."""
        for i, role in enumerate(self.roles):
            role.value = "best" if i == best else "worst" if i == worst else "—"

    def save(self) -> None:
        best = [i for i, r in enumerate(self.roles) if r.value == "best"]
        worst = [i for i, r in enumerate(self.roles) if r.value == "worst"]
        if self.grid_id is None or len(best) != 1 or len(worst) != 1:
            self._say("Mark exactly one best and one worst image first.")
            return
        name = self.labeler.value
        pick_id, error = self._attempt(self.ctl.pick, self.grid_id, best[0], worst[0], name)
        if not error:
            self._count()
            self._next(f"Saved pick {pick_id}.")

    def _mark(self, kind: str) -> None:
        if self.grid_id is None:
            self._say("Generate a grid first.")
            return
        _, error = self._attempt(getattr(self.ctl, kind), self.grid_id, self.labeler.value)
        if not error:
            self._count()
            self._next(f"Saved {kind}.")

    def _next(self, said: str) -> None:
        self.prompt.value = self.ctl.next_prompt(self.prompt.value) or self.prompt.value
        self.generate()
        self._say(f"{said} {self.status.value}")

    def undo(self) -> None:
        undone, error = self._attempt(self.ctl.undo, self.labeler.value or None)
        if not error:
            self._count()
            self._say("Nothing to undo." if undone is None else f"Undid pick {undone}.")


class TrainPanel(_Panel):
    """The method, its round settings (main and advanced), a progress bar with ETA, a live
    loss/accuracy plot, and the round's result with a rollback offer when it warns.

    A setting's widget of the chosen method is also an attribute by its name:
    ``panel.epochs.value = 1``.
    """

    def __init__(self, ctl: StudioController) -> None:
        super().__init__(ctl)
        self.method = widgets.Dropdown(
            options=[(METHODS[name].summary, name) for name in controls.TRAIN_FORMS],
            value=controls.DEFAULT_METHOD,
            description="Method",
            style={"description_width": "initial"},
        )
        self.forms: dict[str, dict[str, widgets.Widget]] = {}
        boxes = {}
        for name, form in controls.TRAIN_FORMS.items():
            self.forms[name], boxes[name] = _settings_box(
                form.root, form.main, form.advanced, "Advanced"
            )
        self.settings = self.forms[self.method.value]
        settings_box = widgets.VBox([self.method, boxes[self.method.value]])

        def switch(change) -> None:
            self.settings = self.forms[change["new"]]
            settings_box.children = (self.method, boxes[change["new"]])

        self.method.observe(switch, names="value")
        self.train_button = widgets.Button(description="Train a round", button_style="primary")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="round")
        self.eta = widgets.Label("")
        self.plot = widgets.Output()
        self.history: list[dict] = []
        self.result: tuple[int, dict] | None = None
        self.train_button.on_click(lambda _: self.train())
        self.rollback_to: int | None = None
        self.rollback_button = widgets.Button(
            description="Roll back", layout=widgets.Layout(display="none", width="auto")
        )
        self.rollback_button.on_click(lambda _: self.roll_back())
        self.widget = widgets.VBox(
            [
                settings_box,
                widgets.HBox([self.train_button, self.progress, self.eta]),
                self.plot,
                self.status,
                self.rollback_button,
            ]
        )

    def __getattr__(self, name: str):
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def _on_progress(self, event) -> None:
        self.eta.value = views.progress_text(event)
        if event.message:  # a note (e.g. a smaller micro-batch after out of memory)
            return
        self.progress.max, self.progress.value = event.total, event.step
        self.history.append({"step": event.step, "loss": event.loss, "accuracy": event.accuracy})
        self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt

        frame = pd.DataFrame(self.history).set_index("step")
        with self.plot:
            self.plot.clear_output(wait=True)
            frame.plot(figsize=(6, 2.5), title="loss and accuracy")
            plt.show()

    def _train(self) -> tuple[int, dict]:
        values = {path: w.value for path, w in self.settings.items()}
        config = controls.settings_from(controls.TRAIN_FORMS[self.method.value].root(), values)
        return self.ctl.train(config, on_progress=self._on_progress)

    def train(self) -> None:
        self.history = []
        try:
            self.result = self._train()
        except RoundCancelled:
            self._say(views.CANCELLED)
            return
        except Exception as exc:
            self._say(self.ctl.describe_error(exc))
            return
        round_id, metrics = self.result
        warnings, self.rollback_to = self.ctl.round_warnings(round_id)
        self._say(views.round_saved(round_id, metrics, warnings))
        self.rollback_button.description = views.rollback_label(self.rollback_to)
        self.rollback_button.layout.display = None if warnings else "none"

    def roll_back(self) -> None:
        """Activate the round a warning offered (the one before the round it was about)."""
        _, error = self._attempt(self.ctl.activate, self.rollback_to)
        if not error:
            self._say(views.activated(self.rollback_to))
            self.rollback_button.layout.display = "none"


class ComparePanel(_Panel):
    """Blind A/B votes: base vs a round on one seed, order hidden until the vote."""

    def __init__(self, ctl: StudioController, labeler: str = "") -> None:
        super().__init__(ctl)
        self.labeler = labeler
        rounds = views.round_ids(ctl.rounds())
        self.round = widgets.Dropdown(
            options=rounds, value=rounds[-1] if rounds else None, description="Round"
        )
        self.prompt = widgets.Text(value="a circle", description="Prompt")
        self.pair_button = widgets.Button(description="New pair", button_style="primary")
        self.left_button = widgets.Button(description="Left is better")
        self.tie_button = widgets.Button(description="Tie")
        self.right_button = widgets.Button(description="Right is better")
        self.left, self.right = widgets.Image(width=200), widgets.Image(width=200)
        self.rates = widgets.HTML("")
        self.pair = None
        self.pair_button.on_click(lambda _: self.new_pair())
        self.left_button.on_click(lambda _: self.vote("left"))
        self.tie_button.on_click(lambda _: self.vote("tie"))
        self.right_button.on_click(lambda _: self.vote("right"))
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.round, self.prompt, self.pair_button]),
                widgets.HBox([self.left, self.right]),
                widgets.HBox([self.left_button, self.tie_button, self.right_button]),
                self.status,
                self.rates,
            ]
        )

    def new_pair(self) -> None:
        if self.round.value is None:
            self._say("Train a round first.")
            return
        pair, error = self._attempt(self.ctl.blind_pair, self.round.value, self.prompt.value)
        if error:
            return
        self.pair = pair
        self.left.value, self.right.value = _png(pair.left, 200), _png(pair.right, 200)
        self._say("Which is better?")

    def vote(self, choice: str) -> None:
        if self.pair is None:
            self._say("Ask for a new pair first.")
            return
        table, error = self._attempt(self.ctl.vote, self.pair, choice, labeler=self.labeler)
        if error:
            return
        self._say(views.reveal_text(self.pair))
        self.rates.value = views.win_rate_table(table).to_html(index=False)
        self.pair = None


class HistoryPanel(_Panel):
    """Rounds and picks as tables; activate a round or roll back to the base model."""

    def __init__(self, ctl: StudioController) -> None:
        super().__init__(ctl)
        self.tables = widgets.HTML("")
        self.plot = widgets.Output()
        self.round = widgets.Dropdown(options=[("base model", None)], description="Activate")
        self.activate_button = widgets.Button(description="Activate")
        self.refresh_button = widgets.Button(description="Refresh")
        self.activate_button.on_click(lambda _: self.activate())
        self.refresh_button.on_click(lambda _: self.refresh())
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.refresh_button, self.round, self.activate_button]),
                self.status,
                self.plot,
                self.tables,
            ]
        )
        self.refresh()

    def refresh(self) -> None:
        rounds = self.ctl.rounds()
        ids = views.round_ids(rounds)
        self.round.options = [("base model", None)] + [(f"round {i}", i) for i in ids]
        self.tables.value = (
            "<h4>Rounds</h4>"
            + views.round_table(rounds).to_html(index=False)
            + "<h4>Labelers</h4>"
            + views.labelers_table(self.ctl.labelers()).to_html(index=False)
            + "<h4>Picks</h4>"
            + views.picks_table(self.ctl.picks()).to_html(index=False)
        )
        with self.plot:
            from IPython.display import display

            self.plot.clear_output(wait=True)
            display(views.metrics_figure(rounds))

    def activate(self) -> None:
        _, error = self._attempt(self.ctl.activate, self.round.value)
        if not error:
            self._say(views.activated(self.round.value))
            self.refresh()
