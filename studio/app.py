"""The Gradio app: five tabs over one StudioController (``python -m studio`` launches it).

The page's frame is here: the header, the labeler's name (remembered by the browser), the
status line and the keyboard shortcuts; each tab is one function in :mod:`studio.tabs`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio reads it

import gradio as gr  # noqa: E402

from . import tabs, views  # noqa: E402
from .starting import Starting  # noqa: E402

if TYPE_CHECKING:
    from .controller import StudioController

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


# small images are shown crisp (nearest neighbour), not blurred by the browser's smoothing;
# the grid is as tall as its rows (Gradio's gallery keeps a fixed 450 px otherwise); a pick's
# cell has its image's 2:1 shape (best beside worst), not a square that letterboxes it
CSS = """
#grid img, #pick-gallery img, #left-img img, #right-img img { image-rendering: pixelated; }
#grid .grid-wrap, #pick-gallery .grid-wrap { min-height: 0 !important; height: auto !important; }
#pick-gallery .thumbnail-item { aspect-ratio: 2 / 1; }
"""


def build_app(ctl: StudioController | Starting) -> gr.Blocks:
    """The Blocks app for a controller, loaded or still loading (not launched)."""
    if not isinstance(ctl, Starting):
        ctl = Starting.loaded(ctl)
    # no usage reports: a local tool for private pictures asks nothing of the network
    with gr.Blocks(title="D3PO Studio", analytics_enabled=False) as app:
        gr.Markdown("# D3PO Studio\nPick the best and the worst image of each grid; train a round.")
        model_info = gr.Markdown(
            ctl.peek(lambda c: views.model_line(c.model_info()), views.LOADING_MODEL),
            elem_id="model-info",
        )
        with gr.Accordion("Session folder", open=False), gr.Row():
            folder = gr.Textbox(
                value=str(ctl.peek(lambda c: c.session_root, ctl.requested_session)),
                label="Session folder (a new folder starts a new session)",
                scale=4,
                elem_id="session-folder",
            )
            open_btn = gr.Button("Open", elem_id="open-session")
        with gr.Row():
            labeler = gr.Textbox(label="Your name (saved with every pick)", scale=2)
            status = gr.Markdown(
                ctl.peek(lambda c: "Ready.", views.LOADING_MODEL), elem_id="status"
            )
        shared = tabs.Shared(labeler, status)
        with gr.Tab("Label", id="label"):
            tabs.label_tab(ctl, shared)
        with gr.Tab("Train", id="train"):
            trained = tabs.train_tab(ctl, shared)
        with gr.Tab("Compare", id="compare"):
            tabs.compare_tab(ctl, shared)
        with gr.Tab("History", id="history"):
            refresh_history = tabs.history_tab(ctl, shared)
        with gr.Tab("Export", id="export"):
            tabs.export_tab(ctl)
        trained.then(*refresh_history)  # a new round shows in Compare and History

        def open_session(path):
            said, error = ctl.attempt(ctl.switch_session, (path or "").strip())
            waiting = views.picks_waiting(ctl.picks_since_last_round())
            return views.model_line(ctl.model_info()), error or said, waiting

        opened = open_btn.click(
            open_session, [folder], [model_info, status, shared.picks_count], **tabs.GPU
        )
        opened.then(*refresh_history)

        def when_loaded():
            """The model line, status, pick count and sampling controls once the model is in
            (at once when it already is)."""
            ctl.start()  # the page is up: the model loads now, if it has not begun
            try:
                real = ctl.wait()
            except Exception as exc:  # the terminal says it too, and the studio stops
                failed = f"⚠️ The model could not be loaded: {exc}"
                return (failed, failed, gr.update(), *(gr.update() for _ in shared.sampling))
            sample = real.sample_settings
            notice = real.take_notice()
            return (
                views.model_line(real.model_info()),
                f"⚠️ {notice[0].upper()}{notice[1:]}." if notice else "Ready.",
                views.picks_waiting(real.picks_since_last_round()),
                *(getattr(sample, path) for path in shared.sampling),
            )

        loaded = app.load(
            when_loaded,
            None,
            [model_info, status, shared.picks_count, *shared.sampling.values()],
            concurrency_limit=None,
        )
        loaded.then(*refresh_history)
        stored_name = gr.BrowserState("", storage_key="d3po-labeler")
        labeler.change(lambda name: name, [labeler], [stored_name])
        app.load(lambda saved: saved or gr.update(), [stored_name], [labeler])
    app.queue(default_concurrency_limit=None)
    return app
