"""One base error for everything a user can act on; anything else is a bug and is logged.

Front ends (the Gradio app, the notebook panels, the CLI) catch :class:`D3POError` and show
its message as is. Any other exception is unexpected: :func:`report_unexpected` writes its
traceback to ``logs/errors.log`` in the session folder and returns a short line to show.
"""

from __future__ import annotations

import logging
import sys
import traceback
from pathlib import Path

LOG_FILE = Path("logs") / "errors.log"


class D3POError(Exception):
    """Bad input or a failed action; the message is one line a user can act on."""


class SettingsError(D3POError, ValueError):
    """A setting is out of its bounds or not one of its choices."""


class SessionError(D3POError):
    """Bad input or a bad session folder."""


class SessionBusy(SessionError):
    """Another process (or thread) is training a round on the same session."""


class DamagedFile(SessionError):
    """A file of the session (a trajectory, an image) cannot be read: damaged or missing."""


class ModelLoadError(D3POError):
    """A model or an adapter could not be loaded."""


class DamagedAdapter(ModelLoadError):
    """A saved adapter's files are missing or cannot be read (not: it fits another model)."""


class ScorerError(D3POError):
    """A scorer could not be loaded or gave an unusable value."""


class NoPicksError(D3POError):
    """There is nothing to train on."""


class RoundCancelled(D3POError):
    """The round was cancelled; the adapter is back where it stood before the round."""


def report_unexpected(exc: BaseException, session_root: str | Path | None) -> str:
    """Log an unexpected exception with its traceback; return a short message for the user.

    The log is ``logs/errors.log`` under the session folder; with no session folder the
    traceback goes to stderr. The message names the exception and where its details are.
    """
    if session_root is None:
        traceback.print_exception(exc, file=sys.stderr)
        return f"unexpected error ({type(exc).__name__}: {exc}); the traceback is above"
    path = Path(session_root) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("d3po_core.unexpected")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    try:
        logger.error("unexpected %s: %s", type(exc).__name__, exc, exc_info=exc)
    finally:
        logger.removeHandler(handler)
        handler.close()
    return f"unexpected error ({type(exc).__name__}: {exc}); the details are in {path}"
