"""Studio latency in a real headless Chromium: start-up to a usable page, click to a 4-grid.

    python bench/studio_latency.py [--model PATH] [--repeats 4]

Starts ``python -m studio`` on a fresh session, opens the page, clicks Generate ``--repeats``
times and reports medians (needs Debian's chromium and playwright).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    session = Path(tempfile.mkdtemp(prefix="d3po-bench-")) / "session"
    cmd = [sys.executable, "-m", "studio", "--session", str(session), "--port", str(args.port)]
    if args.model:
        cmd += ["--model", args.model]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        while "ready at" not in proc.stdout.readline():
            pass
        ready = time.perf_counter() - start
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{args.port}", wait_until="domcontentloaded")
            page.wait_for_selector("#generate-btn")
            usable = time.perf_counter() - start
            clicks = []
            for i in range(args.repeats):
                t0 = time.perf_counter()
                page.click("#generate-btn")
                expect(page.locator("#grid-info")).to_contain_text(f"Grid {i + 1}", timeout=60_000)
                page.wait_for_function("document.querySelectorAll('#grid img').length >= 4")
                clicks.append(time.perf_counter() - t0)
            browser.close()
    finally:
        proc.terminate()
    print(
        f"server ready {ready:.1f} s; page usable {usable:.1f} s; "
        f"Generate → visible 4-grid median {statistics.median(clicks):.2f} s"
    )


if __name__ == "__main__":
    main()
