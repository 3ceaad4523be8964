"""The studio's controller while the model loads: the page is served first, the model beside it.

Laying out the page needs only Gradio and the settings' declarations; the engine (torch,
diffusers) and the model take longer to load than the page takes to serve. :class:`Starting`
opens the session and loads the model in a background thread, started as soon as the first
browser has the page up (or a few seconds after it is served, if no browser comes): started
sooner, the load would only share the interpreter and the cores with the page, and the model
would be in no sooner. The page shows "Loading the model…" meanwhile; an action started before
the model is in waits for it, then runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .controller import StudioController

T = TypeVar("T")


class Starting:
    """A :class:`~studio.controller.StudioController` that may still be loading.

    Any controller attribute waits for the load (and raises its error if it failed);
    :meth:`peek` answers at once, for laying out a page.
    """

    def __init__(self, session_dir: str | Path, *, model: str | None = None, device=None) -> None:
        self.requested_session = Path(session_dir).expanduser()
        self.started = time.perf_counter()
        self.load_seconds: float | None = None
        self._controller: StudioController | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self._starting = threading.Lock()
        self._thread = threading.Thread(
            target=self._load, args=(model, device), name="d3po-load-model", daemon=True
        )

    @classmethod
    def loaded(cls, controller: StudioController) -> Starting:
        """A controller that is already there, e.g. one a test or a notebook built."""
        self = cls(controller.session_root)
        self._controller, self.load_seconds = controller, 0.0
        self._done.set()
        return self

    def start(self) -> Starting:
        """Open the session and load the model in the background (once; later calls return)."""
        with self._starting:
            if not self._thread.is_alive() and not self._done.is_set():
                self.started = time.perf_counter()
                self._thread.start()
        return self

    def _load(self, model: str | None, device) -> None:
        try:
            from diffusers.utils import logging as diffusers_logging
            from transformers.utils import logging as transformers_logging

            from .controller import StudioController  # the engine: torch, diffusers, …

            # the terminal has said where the page is; no progress bars after it
            diffusers_logging.disable_progress_bar()
            transformers_logging.disable_progress_bar()
            self._controller = StudioController(self.requested_session, model=model, device=device)
        except BaseException as exc:  # shown by wait(), in the page and on the terminal
            self._error = exc
        finally:
            self.load_seconds = time.perf_counter() - self.started
            self._done.set()

    @property
    def is_loaded(self) -> bool:
        return self._done.is_set() and self._error is None

    def wait(self) -> StudioController:
        """The controller once the model is in; the load's error if it failed."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._controller

    def peek(self, read: Callable[[StudioController], T], default: T) -> T:
        """``read(controller)`` when the model is in, else ``default``, without waiting."""
        return read(self._controller) if self.is_loaded else default

    def close(self) -> None:
        if self.is_loaded:
            self._controller.close()

    def __getattr__(self, name: str) -> Any:  # only names not defined above
        if name.startswith("_"):  # not set yet (copying, a half-built object): not forwarded
            raise AttributeError(name)
        return getattr(self.wait(), name)
