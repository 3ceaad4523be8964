"""``python -m studio``: open D3PO Studio in the browser on the embedded model by default."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from pathlib import Path

from d3po_core.errors import D3POError

DEFAULT_SESSION = Path("sessions") / "default"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m studio", description=__doc__)
    parser.add_argument(
        "--model", default=None, help="diffusers folder or hub id (default: embedded)"
    )
    parser.add_argument("--session", type=Path, default=DEFAULT_SESSION, help="session folder")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: loopback only)"
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--auth", default=None, help="USER:PASS, required for a non-loopback --host"
    )
    parser.add_argument("--device", default=None, help="cuda, cpu, … (default: auto)")
    args = parser.parse_args(argv)
    if args.auth is not None and ":" not in args.auth:
        parser.error("--auth must be USER:PASS")
    if not _is_loopback(args.host) and args.auth is None:
        parser.error(
            f"refusing to serve on {args.host} without --auth USER:PASS: anyone on the network "
            "could use the studio"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    from .app import KEYS_JS, build_app
    from .controller import StudioController

    try:
        controller = StudioController(args.session, model=args.model, device=args.device)
    except D3POError as exc:  # a missing model, a bad session folder, …
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = build_app(controller)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    app.launch(
        server_name=args.host,
        server_port=args.port,
        auth=auth,
        share=False,
        js=KEYS_JS,
        prevent_thread_lock=True,
        quiet=True,
    )
    print(
        f"D3PO Studio is ready at http://{args.host}:{args.port} (session {args.session}, "
        f"model {controller.model}; started in {time.perf_counter() - start:.1f} s)",
        flush=True,
    )
    try:
        app.block_thread()
    finally:
        controller.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
