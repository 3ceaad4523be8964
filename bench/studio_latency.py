"""Studio latency in a real headless Chromium: start-up to a usable page, click to a 4-grid.

    python bench/studio_latency.py [--model PATH] [--repeats 4] [--starts 3] [--source DIR]

Starts ``python -m studio`` on a fresh session ``--starts`` times and measures, from the
launch of the process: the page usable in the browser (the Generate button there), the model
in (the page's model line says which), then clicks Generate ``--repeats`` times and reports
medians (needs Debian's chromium and playwright). ``--source`` runs the studio of another
checkout (e.g. a worktree of an older commit), for a before/after in one run.
"""

from __future__ import annotations

import argparse
import os
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


def start_once(args: argparse.Namespace, browser, clicks: int) -> dict[str, float | list[float]]:
    session = Path(tempfile.mkdtemp(prefix="d3po-bench-")) / "session"
    cmd = [sys.executable, "-m", "studio", "--session", str(session), "--port", str(args.port)]
    if args.model:
        cmd += ["--model", args.model]
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as a user's Python: sources compiled once
    if args.source:
        env["PYTHONPATH"] = str(Path(args.source).resolve())
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=args.source or None,
    )
    try:
        while "ready at" not in proc.stdout.readline():
            if proc.poll() is not None:
                raise SystemExit("the studio exited before it was ready")
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{args.port}", wait_until="domcontentloaded")
        page.wait_for_selector("#generate-btn")
        usable = time.perf_counter() - start
        expect(page.locator("#model-info")).to_contain_text("Model:", timeout=120_000)
        model = time.perf_counter() - start
        seconds = []
        for i in range(clicks):
            t0 = time.perf_counter()
            page.click("#generate-btn")
            expect(page.locator("#grid-info")).to_contain_text(f"Grid {i + 1}", timeout=120_000)
            page.wait_for_function("document.querySelectorAll('#grid img').length >= 4")
            seconds.append(time.perf_counter() - t0)
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(session.parent, ignore_errors=True)
    return {"usable": usable, "model": model, "clicks": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--port", type=int, default=7871)
    parser.add_argument("--repeats", type=int, default=4, help="Generate clicks on the last start")
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--source", default=None, help="a checkout whose studio to run")
    args = parser.parse_args()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        runs = [
            start_once(args, browser, args.repeats if i == args.starts - 1 else 0)
            for i in range(args.starts)
        ]
        browser.close()
    usable = [r["usable"] for r in runs]
    model = [r["model"] for r in runs]
    clicks = runs[-1]["clicks"]
    print(
        f"{args.source or 'this checkout'}: page usable median {statistics.median(usable):.1f} s "
        f"({min(usable):.1f}–{max(usable):.1f}); model in median {statistics.median(model):.1f} s; "
        f"Generate → visible 4-grid median {statistics.median(clicks):.2f} s ({len(runs)} starts)"
    )


if __name__ == "__main__":
    main()
