"""Subprocesses of the tests (and of bench/faults.py): this checkout on their path, a free port.

Imports neither pytest nor torch, so a benchmark can use it too.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_env(network_log: Path | None = None) -> dict[str, str]:
    """The environment of a subprocess that imports this checkout's packages. With
    ``network_log``, the network is blocked in it (tests/_no_network) and whatever it asks of
    the network is logged to that file."""
    paths = [str(REPO), os.environ.get("PYTHONPATH")]
    env = dict(os.environ)
    if network_log is not None:
        paths.insert(0, str(REPO / "tests" / "_no_network"))
        env["D3PO_NETWORK_LOG"] = str(network_log)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    return env


def spawn_worker(script: str, *args, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """A worker script of tests/ in its own process, its stdout a text pipe."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "tests" / script), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=repo_env(),
        cwd=REPO,
    )


def free_port() -> int:
    """A port nothing listens on now (the OS's pick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
