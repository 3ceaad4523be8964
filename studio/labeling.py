"""Labeling in a browser tab, kept on the server: the grid on screen, its pending best, and
whether the next grid is loading.

A browser sends a click or a key press with the state it had when the event left it; two
quick clicks, or a key pressed while the next grid is still sampling, would then act on a
stale state (a second best instead of the worst, a pick on the grid just labeled). Here each
tab's state lives on the server and events are applied in order (the app runs them one at a
time), so a click is always judged against what the tab shows now: while the next grid loads,
clicks and keys are ignored with a visible "loading" message.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .controller import StudioController

LOADING = "Loading the next grid… (clicks and keys wait for it)"


@dataclass
class TabState:
    grid_id: int | None = None  # the grid on screen
    best: int | None = None  # its pending best, before the worst is clicked
    loading: bool = False  # a grid is being sampled or is on its way to the screen
    incoming: int | None = None  # a sampled grid not yet on screen
    labeled: bool = False  # the grid on screen has its pick, tie or skip
    next_due: bool = False  # a save asked for the next grid; the first chained event takes it
    session: object = None  # the session folder the grid on screen belongs to


@dataclass(frozen=True)
class Outcome:
    message: str  # the status line
    advance: bool  # saved: the next grid follows


class Labeling:
    """Every tab's labeling state, keyed by the tab's session id (Gradio's session hash).

    A grid goes through ``loading`` (sampling starts), ``arrived`` (sampled, sent to the
    browser) and ``ready`` (on screen: an event chained after the one that showed it); only
    then do clicks count on it.
    """

    def __init__(self, ctl: StudioController) -> None:
        self.ctl = ctl
        self._tabs: dict[str, TabState] = {}
        self._lock = threading.Lock()

    def tab(self, client: str) -> TabState:
        """The tab's state; a grid of a session the studio has since left no longer counts."""
        with self._lock:
            state = self._tabs.setdefault(client, TabState())
        if state.grid_id is not None and state.session != self.ctl.session_root:
            state.grid_id, state.best = None, None
        return state

    def loading(self, client: str) -> None:
        """A grid is being sampled for this tab: clicks wait for it."""
        self.tab(client).loading = True

    def arrived(self, client: str, grid_id: int) -> None:
        """The grid is sampled and on its way to the screen (still loading)."""
        state = self.tab(client)
        state.incoming, state.session = grid_id, self.ctl.session_root

    def ready(self, client: str) -> bool:
        """The arrived grid is on screen; False when none was on its way."""
        state = self.tab(client)
        if state.incoming is None:
            return False
        state.grid_id, state.incoming = state.incoming, None
        state.best, state.loading, state.labeled = None, False, False
        return True

    def take_next(self, client: str) -> bool:
        """Whether this tab's next grid is due (once per save: the events chained after every
        click ask, and only the one after a save gets True)."""
        state = self.tab(client)
        due, state.next_due = state.next_due, False
        return due

    def showing(self, client: str, grid_id: int) -> None:
        """Arrived and on screen at once (for callers without a browser in between)."""
        self.arrived(client, grid_id)
        self.ready(client)

    def settled(self, client: str) -> None:
        """No new grid is coming (sampling failed): clicks count again, on the grid still on
        screen unless it has been labeled (then they ask for a new grid)."""
        state = self.tab(client)
        state.loading, state.incoming = False, None
        if state.labeled:
            state.grid_id = None

    def _on_screen(self, client: str) -> tuple[TabState, Outcome | None]:
        """The tab's state, and why a click cannot count now (None: it can)."""
        state = self.tab(client)
        if state.loading:
            return state, Outcome(LOADING, False)
        if state.grid_id is None:
            return state, Outcome("Generate a grid first.", False)
        return state, None

    def select(self, client: str, index: int, labeler: str) -> Outcome:
        """A click (or key) on image ``index``: the best first, then the worst saves a pick."""
        state, refused = self._on_screen(client)
        if refused:
            return refused
        if state.best is None:
            state.best = index
            return Outcome(f"Best: image {index + 1}. Now click the **worst**.", False)
        if index == state.best:
            return Outcome("That is the best one; click a different image for the worst.", False)
        best, state.best = state.best, None
        return self._save(
            state,
            lambda: self.ctl.pick(state.grid_id, best, index, labeler=labeler),
            lambda pick_id: f"Saved pick {pick_id} (best {best + 1}, worst {index + 1}).",
        )

    def mark(self, client: str, kind: str, labeler: str) -> Outcome:
        """A tie or a skip of the grid on screen."""
        state, refused = self._on_screen(client)
        if refused:
            return refused
        state.best = None
        return self._save(
            state,
            lambda: getattr(self.ctl, kind)(state.grid_id, labeler=labeler),
            lambda pick_id: f"Saved {kind} ({pick_id}).",
        )

    def _save(self, state: TabState, action, said) -> Outcome:
        """Save a pick, tie or skip; on success the tab waits for its next grid."""
        pick_id, error = self.ctl.attempt(action)
        if error:
            return Outcome(error, False)
        state.loading = state.labeled = state.next_due = True
        return Outcome(f"{said(pick_id)} {LOADING}", True)
