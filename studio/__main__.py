"""``python -m studio``: open D3PO Studio in the browser on the embedded model by default."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import socket
import sys
import time
from dataclasses import asdict, dataclass

from d3po_core.errors import D3POError
from d3po_core.settings import (
    ModelArgs,
    SessionArgs,
    Settings,
    SettingsParser,
    model_folder,
    setting,
)

#: seconds the model load waits for a first browser to have the page up before it starts
FIRST_PAGE_GRACE_S = 3.0


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


def port_in_use(host: str, port: int) -> str | None:
    """The line to show when ``port`` cannot be served on ``host``, else None."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # as the server binds: a port whose last studio just closed (TIME_WAIT) is free
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return f"cannot serve on {host}:{port} ({exc.strerror}); pass another --host"
            return (
                f"port {port} is in use (another studio?); pass another one, e.g. "
                f"--port {port + 1 if port < 65535 else port - 1}"
            )
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    busy = port_in_use(args.host, args.port)
    if busy:  # before anything loads: a second studio fails in a second, not after a minute
        print(f"error: {busy}", file=sys.stderr)
        return 2
    try:  # a mistyped folder fails at once, before the page is served
        model_folder(args.model)
    except D3POError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .app import CSS, KEYS_JS, build_app
    from .starting import Starting

    ctl = Starting(args.session, model=args.model, device=args.device)
    app = build_app(ctl)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            auth=auth,
            share=False,
            js=KEYS_JS,
            css=CSS,
            prevent_thread_lock=True,
            quiet=True,
        )
    except OSError:  # taken in the meantime
        print(f"error: {port_in_use(args.host, args.port) or 'cannot serve'}", file=sys.stderr)
        ctl.close()
        return 2
    print(
        f"D3PO Studio is ready at http://{args.host}:{args.port}: open it in your browser "
        f"(page in {time.perf_counter() - start:.1f} s; loading the model…)",
        flush=True,
    )
    try:
        time.sleep(FIRST_PAGE_GRACE_S)  # the first page opened starts the load sooner
        ctl.start()
        try:
            controller = ctl.wait()
        except D3POError as exc:  # a missing model, a bad session folder, …
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(
            f"Model loaded in {ctl.load_seconds:.1f} s: {controller.model} "
            f"(session {controller.session_root})",
            flush=True,
        )
        app.block_thread()
    finally:
        app.close()
        ctl.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
