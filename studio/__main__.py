"""``python -m studio``: open D3PO Studio in the browser on the embedded model by default."""

from __future__ import annotations

import argparse
import ipaddress
import sys
import time
from dataclasses import asdict, dataclass

from d3po_core.errors import D3POError
from d3po_core.settings import ModelArgs, SessionArgs, Settings, SettingsParser, setting


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerArgs(Settings):
    """Server"""

    host: str = setting("127.0.0.1", help="Address to bind; the default serves this machine only.")
    port: int = setting(7860, low=1, high=65535, help="Port of the page.")
    auth: str | None = setting(None, help="USER:PASS, required for a non-loopback --host.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The studio's options: the session and model (as every command line) and the server."""
    cli = SettingsParser((SessionArgs, ModelArgs, ServerArgs), prog="python -m studio")
    cli.parser.description = __doc__
    try:
        parsed = cli.parse(sys.argv[1:] if argv is None else argv)
    except D3POError as exc:
        cli.parser.error(str(exc))
    args = argparse.Namespace(**{k: v for part in parsed for k, v in asdict(part).items()})
    if args.auth is not None and ":" not in args.auth:
        cli.parser.error("--auth must be USER:PASS")
    if not _is_loopback(args.host) and args.auth is None:
        cli.parser.error(
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
