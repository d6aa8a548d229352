"""Serve one file over NBD on a unix socket: ``python -m common.nbd.serve FILE --socket PATH``.

For manual testing and the benchmarks; the agent and the broker embed :class:`NBDServer` in their
own processes. Runs until SIGINT or SIGTERM, then lets clients finish what is in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from common.logs import configure_logging, get_logger
from common.nbd.backend import FileExport
from common.nbd.server import NBDServer


async def serve(args: argparse.Namespace) -> None:
    """Serve ``args.file`` until a stop signal arrives."""
    export = FileExport(args.file, args.name, read_only=args.read_only)
    server = NBDServer([export], default_export=args.name, max_connections=args.max_connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.serve_unix(args.socket)
        await stop.wait()
    finally:
        await server.close()
        export.close()
        get_logger(__name__).info("nbd_serve_stopped")


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, pick the event loop, serve."""
    parser = argparse.ArgumentParser(prog="python -m common.nbd.serve", description=__doc__)
    parser.add_argument("file", help="image file or block device to export")
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--name", default="disk", help="export name (also the default export)")
    parser.add_argument("--read-only", action="store_true")
    parser.add_argument("--max-connections", type=int, default=100)
    parser.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(level=args.log_level)
    if args.no_uvloop:
        asyncio.run(serve(args))
    else:
        import uvloop  # noqa: PLC0415 - the loop is chosen at the entry point only

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
