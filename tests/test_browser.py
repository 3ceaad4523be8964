"""End to end in a real headless Chromium on the embedded model: label with mouse and keys,
train, compare, vote.

Set D3PO_SCREENSHOTS=docs/screenshots to refresh the README's screenshots.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from d3po_core.session import Session

from .conftest import REPO, free_port, repo_env

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs a chromium binary (scripts/test.sh installs Debian's)"
)


@pytest.fixture
def studio(tmp_path):
    port = free_port()
    session = tmp_path / "session"
    # the network is blocked in the studio's process: whatever it asks of it is logged
    network_log = tmp_path / "network.log"
    env = repo_env(network_log=network_log)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "studio",
            "--session",
            str(session),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if "ready at" in line:
            break
        if proc.poll() is not None:
            raise AssertionError("the studio exited before it was ready")
    yield f"http://127.0.0.1:{port}", session, network_log
    proc.terminate()
    proc.wait(timeout=30)


def _shots() -> Path:
    target = os.environ.get("D3PO_SCREENSHOTS")
    path = Path(target) if target else Path(os.environ.get("TMPDIR", "/tmp")) / "d3po-shots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_label_train_compare_in_a_real_browser(studio):
    from playwright.sync_api import expect, sync_playwright

    url, session_dir, network_log = studio
    shots = _shots()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(url, wait_until="domcontentloaded")
        page.wait_for_selector("#prompt textarea", timeout=60_000)
        # the page is up before the model: its line says so, then names the model
        expect(page.locator("#model-info")).to_contain_text("Model:", timeout=120_000)
        page.get_by_label("Your name (saved with every pick)").fill("ana")
        page.fill("#prompt textarea", "a red circle")
        page.get_by_text("Sampling").click()  # shown settings, left alone, sample as declared
        page.click("#generate-btn")
        status = page.locator("#status")
        expect(status).to_contain_text("Click the best", timeout=120_000)
        # the grid is as tall as its row of images (no dead space) and drawn crisp
        page.wait_for_function(
            """() => {
              const wrap = document.querySelector('#grid .grid-wrap');
              const item = document.querySelector('#grid .thumbnail-item');
              if (!wrap || !item) return false;
              const h = item.getBoundingClientRect().height;
              return h > 100 && wrap.getBoundingClientRect().height < h + 60;
            }"""
        )
        rendering = page.locator("#grid img").first.evaluate(
            "e => getComputedStyle(e).imageRendering"
        )
        assert rendering == "pixelated"
        page.screenshot(path=str(shots / "label.png"), full_page=True)

        # grid 1 with the mouse: best = image 2, worst = image 4
        thumbs = page.locator("#grid .thumbnail-item")
        # a saved pick shows in the counter (the status line's "Saved pick" gives way to the
        # next grid's prompt as soon as it is sampled, too soon to wait on)
        counter, grid_info = page.locator("#pick-counter"), page.locator("#grid-info")
        thumbs.nth(1).click()
        expect(status).to_contain_text("Now click the worst")
        thumbs.nth(3).click()
        page.keyboard.press("2")  # at once, while the next grid loads: ignored, not applied
        expect(counter).to_contain_text("1 pick(s)")
        expect(grid_info).to_contain_text("Grid 2", timeout=120_000)
        expect(status).to_contain_text("Click the best")  # the key left no best behind

        # grids 2 and 3 with the keys: 1 = best, 3 = worst; then a tie with t
        page.locator("body").click(position={"x": 5, "y": 5})
        for n in (2, 3):
            page.keyboard.press("1")
            expect(status).to_contain_text("Now click the worst")
            page.keyboard.press("3")
            expect(counter).to_contain_text(f"{n} pick(s)")
            expect(grid_info).to_contain_text(f"Grid {n + 1}", timeout=120_000)
            # keys count once the grid is on screen (pressed while it loads, they are ignored)
            expect(status).to_contain_text("Click the best", timeout=120_000)
        page.keyboard.press("t")
        expect(grid_info).to_contain_text("Grid 5", timeout=120_000)  # a tie moves on too
        expect(counter).to_contain_text("3 pick(s)")  # and is no training pick

        # a second tab on the same session labels too: it sees the first tab's picks
        other = browser.new_page(viewport={"width": 1280, "height": 1000})
        other.goto(url, wait_until="domcontentloaded")
        expect(other.locator("#pick-counter")).to_contain_text("3 pick(s)", timeout=60_000)
        other.get_by_label("Your name (saved with every pick)").fill("ben")
        other.click("#generate-btn")
        expect(other.locator("#status")).to_contain_text("Click the best", timeout=120_000)
        other.locator("#grid .thumbnail-item").nth(0).click()
        other.locator("#grid .thumbnail-item").nth(1).click()
        expect(other.locator("#pick-counter")).to_contain_text("4 pick(s)")
        other.close()

        # train a round
        page.get_by_role("tab", name="Train").click()
        page.get_by_text("Advanced").click()  # shown settings, left alone, train as declared
        page.screenshot(path=str(shots / "train-before.png"), full_page=True)
        page.click("#train-btn")
        expect(page.locator("#train-status")).to_contain_text("Round 1 saved", timeout=300_000)
        page.screenshot(path=str(shots / "train.png"), full_page=True)

        # compare: a blind pair and a vote
        page.get_by_role("tab", name="History").click()
        page.get_by_role("button", name="Refresh").click()
        expect(page.locator("#rounds-table")).to_contain_text("yes", timeout=60_000)
        # what the model was taught: every pick's best beside its worst, and who picked
        expect(page.locator("#pick-gallery img")).to_have_count(4, timeout=60_000)
        cell = page.locator("#pick-gallery .thumbnail-item").first.bounding_box()
        assert cell and abs(cell["width"] / cell["height"] - 2) < 0.1  # best | worst, unboxed
        expect(page.locator("#labelers-table")).to_contain_text("ben")
        page.get_by_role("tab", name="Compare").click()
        page.click("#pair-btn")
        expect(page.locator("#reveal")).to_contain_text("Vote", timeout=120_000)
        page.click("#vote-left")
        expect(page.locator("#reveal")).to_contain_text(re.compile("Left was"))
        page.screenshot(path=str(shots / "compare.png"), full_page=True)
        page.get_by_role("tab", name="History").click()
        page.get_by_role("button", name="Refresh").click()
        expect(page.locator("#rounds-table")).to_contain_text("yes", timeout=60_000)
        expect(page.locator("#metrics-plot img")).to_be_visible(timeout=60_000)
        expect(page.locator("#pick-gallery img").first).to_be_visible()
        expect(page.get_by_text("processing |")).to_have_count(0, timeout=60_000)  # refreshed
        page.screenshot(path=str(shots / "history.png"), full_page=True)
        page.get_by_role("tab", name="Export").click()
        page.screenshot(path=str(shots / "export.png"), full_page=True)
        # the labeler's name is remembered by this browser
        page.reload(wait_until="domcontentloaded")
        name = page.get_by_label("Your name (saved with every pick)")
        expect(name).to_have_value("ana", timeout=60_000)
        expect(page.locator("#status")).to_have_text("Ready.", timeout=60_000)  # page loaded
        # a new session folder from the page: a fresh session, said and shown
        page.get_by_text("Session folder", exact=True).click()
        folder = page.locator("#session-folder textarea")
        second = str(session_dir.parent / "second")
        # typed as a person does, once the box shows the open session's folder (it has
        # mounted), and left with Tab: every keystroke and the change reach the page's state
        expect(folder).to_have_value(re.compile(r"session$"))
        folder.click()
        folder.press("Control+a")
        folder.press_sequentially(second)
        folder.press("Tab")
        expect(folder).to_have_value(second)
        page.click("#open-session")
        expect(page.locator("#status")).to_contain_text(f"Opened {second}", timeout=60_000)
        expect(page.locator("#pick-counter")).to_contain_text("0 pick(s)")
        expect(page.locator("#model-info")).to_contain_text(second)
        browser.close()

    with Session.open(session_dir) as session:
        picks = session.picks_df()
        assert list(picks["kind"]) == ["pick", "pick", "pick", "tie", "pick"]
        assert list(picks["labeler"]) == ["ana"] * 4 + ["ben"]
        assert list(picks["id"]) == [1, 2, 3, 4, 5]  # none lost, none duplicated
        assert (list(picks["best"][:3]), list(picks["worst"][:3])) == ([1, 0, 0], [3, 2, 2])
        assert session.last_round() == 1
        assert len(session.comparisons_df()) == 1
    assert not network_log.exists(), f"the studio asked the network: {network_log.read_text()}"
