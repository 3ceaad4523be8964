"""ipywidgets panels for Jupyter: the studio's tabs as widgets over the same controller.

Each panel is one line in a notebook (``LabelPanel(ctl)``) and displays itself; its buttons
call controller verbs only. A script or a test drives a panel by calling ``button.click()``,
exactly as a click would.
"""

from __future__ import annotations

import io

import ipywidgets as widgets
import pandas as pd
from PIL import Image

from d3po_core.trainer import D3POConfig, NoPicksError, RoundCancelled

from .controller import StudioController, StudioError

USER_ERRORS = (StudioError, NoPicksError, ValueError)


def _png(image: Image.Image, size: int = 160) -> bytes:
    buffer = io.BytesIO()
    image.resize((size, size), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


class _Panel:
    def __init__(self, ctl: StudioController) -> None:
        self.ctl = ctl
        self.status = widgets.HTML("")

    def _say(self, text: str) -> None:
        self.status.value = text

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


class LabelPanel(_Panel):
    """Generate a grid, mark the best and the worst image, save; the next grid follows."""

    def __init__(self, ctl: StudioController, labeler: str = "") -> None:
        super().__init__(ctl)
        self.labeler = widgets.Text(value=labeler, description="Name")
        self.prompt = widgets.Text(value="a circle", description="Prompt")
        self.grid_size = widgets.IntSlider(
            value=ctl.sample_settings.n, min=2, max=16, description="Grid"
        )
        self.generate_button = widgets.Button(description="Generate", button_style="primary")
        self.save_button = widgets.Button(description="Save pick", button_style="success")
        self.tie_button = widgets.Button(description="Tie")
        self.skip_button = widgets.Button(description="Skip")
        self.undo_button = widgets.Button(description="Undo")
        self.counter = widgets.HTML("")
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
                widgets.HBox([self.labeler, self.prompt, self.grid_size]),
                widgets.HBox([*buttons, self.undo_button]),
                self.counter,
                self.grid_box,
                self.status,
            ]
        )
        self._count()

    def _count(self) -> None:
        self.counter.value = (
            f"<b>{self.ctl.picks_since_last_round()}</b> pick(s) since the last round"
        )

    def generate(self, seed: int | None = None) -> None:
        try:
            view = self.ctl.generate(self.prompt.value, self.grid_size.value, seed=seed)
        except USER_ERRORS as exc:
            self._say(f"⚠️ {exc}")
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
        self._say(f"Grid {view.grid_id}: mark the best and the worst, then Save pick.")

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
        try:
            pick_id = self.ctl.pick(self.grid_id, best[0], worst[0], labeler=self.labeler.value)
        except USER_ERRORS as exc:
            self._say(f"⚠️ {exc}")
            return
        self._count()
        self._next(f"Saved pick {pick_id}.")

    def _mark(self, kind: str) -> None:
        if self.grid_id is None:
            self._say("Generate a grid first.")
            return
        getattr(self.ctl, kind)(self.grid_id, labeler=self.labeler.value)
        self._count()
        self._next(f"Saved {kind}.")

    def _next(self, said: str) -> None:
        self.prompt.value = self.ctl.next_prompt(self.prompt.value) or self.prompt.value
        self.generate()
        self._say(f"{said} {self.status.value}")

    def undo(self) -> None:
        undone = self.ctl.undo(self.labeler.value or None)
        self._count()
        self._say("Nothing to undo." if undone is None else f"Undid pick {undone}.")


class TrainPanel(_Panel):
    """Round settings, a progress bar with ETA, a live loss/accuracy plot."""

    def __init__(self, ctl: StudioController) -> None:
        super().__init__(ctl)
        d = D3POConfig()
        self.beta = widgets.FloatText(value=d.beta, description="beta")
        self.learning_rate = widgets.FloatText(value=d.learning_rate, description="lr")
        self.epochs = widgets.IntSlider(value=d.epochs, min=1, max=20, description="epochs")
        self.train_button = widgets.Button(description="Train a round", button_style="primary")
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="round")
        self.eta = widgets.Label("")
        self.plot = widgets.Output()
        self.history: list[dict] = []
        self.result: tuple[int, dict] | None = None
        self.train_button.on_click(lambda _: self.train())
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.beta, self.learning_rate, self.epochs]),
                widgets.HBox([self.train_button, self.progress, self.eta]),
                self.plot,
                self.status,
            ]
        )

    def _on_progress(self, event) -> None:
        self.progress.max, self.progress.value = event.total, event.step
        self.eta.value = f"step {event.step}/{event.total}, ETA {event.eta_s:.0f} s"
        self.history.append({"step": event.step, "loss": event.loss, "accuracy": event.accuracy})
        self._draw()

    def _draw(self) -> None:
        import matplotlib.pyplot as plt

        frame = pd.DataFrame(self.history).set_index("step")
        with self.plot:
            self.plot.clear_output(wait=True)
            frame.plot(figsize=(6, 2.5), title="loss and accuracy")
            plt.show()

    def train(self) -> None:
        self.history = []
        config = D3POConfig(
            beta=self.beta.value, learning_rate=self.learning_rate.value, epochs=self.epochs.value
        )
        try:
            self.result = self.ctl.train(config, on_progress=self._on_progress)
        except RoundCancelled:
            self._say("Cancelled; nothing was saved.")
            return
        except USER_ERRORS as exc:
            self._say(f"⚠️ {exc}")
            return
        round_id, metrics = self.result
        self._say(
            f"Round {round_id} saved and active: loss {metrics['loss']:.4f}, "
            f"accuracy {metrics['accuracy']:.2f}, {metrics['seconds']:.1f} s."
        )


class ComparePanel(_Panel):
    """Blind A/B votes: base vs a round on one seed, order hidden until the vote."""

    def __init__(self, ctl: StudioController, labeler: str = "") -> None:
        super().__init__(ctl)
        self.labeler = labeler
        rounds = [int(r) for r in ctl.rounds()["id"]] if len(ctl.rounds()) else []
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
        try:
            self.pair = self.ctl.blind_pair(self.round.value, self.prompt.value)
        except USER_ERRORS as exc:
            self._say(f"⚠️ {exc}")
            return
        self.left.value, self.right.value = _png(self.pair.left, 200), _png(self.pair.right, 200)
        self._say("Which is better?")

    def vote(self, choice: str) -> None:
        if self.pair is None:
            self._say("Ask for a new pair first.")
            return
        table = self.ctl.vote(self.pair, choice, labeler=self.labeler)
        left = "base" if self.pair.left_is == "a" else f"round {self.pair.round_id}"
        self._say(f"Left was {left}.")
        self.rates.value = table.to_html(index=False)
        self.pair = None


class HistoryPanel(_Panel):
    """Rounds and picks as tables; activate a round or roll back to the base model."""

    def __init__(self, ctl: StudioController) -> None:
        super().__init__(ctl)
        self.tables = widgets.HTML("")
        self.round = widgets.Dropdown(options=[("base model", None)], description="Activate")
        self.activate_button = widgets.Button(description="Activate")
        self.refresh_button = widgets.Button(description="Refresh")
        self.activate_button.on_click(lambda _: self.activate())
        self.refresh_button.on_click(lambda _: self.refresh())
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.refresh_button, self.round, self.activate_button]),
                self.status,
                self.tables,
            ]
        )
        self.refresh()

    def refresh(self) -> None:
        rounds = self.ctl.rounds()
        ids = [int(r) for r in rounds["id"]] if len(rounds) else []
        self.round.options = [("base model", None)] + [(f"round {i}", i) for i in ids]
        keep = [
            c
            for c in ("id", "active", "metric_picks", "metric_loss", "metric_accuracy")
            if c in rounds
        ]
        picks = self.ctl.picks().drop(columns=["created"], errors="ignore")
        self.tables.value = (
            "<h4>Rounds</h4>"
            + rounds[keep].to_html(index=False)
            + "<h4>Picks</h4>"
            + picks.to_html(index=False)
        )

    def activate(self) -> None:
        try:
            self.ctl.activate(self.round.value)
        except USER_ERRORS as exc:
            self._say(f"⚠️ {exc}")
            return
        self._say(
            "Base model active."
            if self.round.value is None
            else f"Round {self.round.value} active."
        )
        self.refresh()
