"""CLI: ``python -m backend_stub --host 127.0.0.1 --port 8080 [--workers N]``."""

from __future__ import annotations

import argparse
import sys

from backend_stub.app import BackendApp
from backend_stub.runner import RunOptions, run


def parse_args(argv: list[str] | None = None) -> RunOptions:
    """Command line to ``RunOptions``; argparse exits with status 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m backend_stub", description="Fast HTTP/1.1 backend stub.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind, 0 for any free port (default 8080)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1: no fork)")
    parser.add_argument(
        "--drain-timeout", type=float, default=3.0, help="seconds to finish in-flight responses on SIGTERM (default 3)"
    )
    parser.add_argument(
        "--keep-alive-timeout", type=float, default=0.0, help="close idle connections after SECONDS (default 0: never)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.drain_timeout < 0 or args.keep_alive_timeout < 0:
        parser.error("timeouts must be >= 0")
    return RunOptions(
        name="backend_stub",
        host=args.host,
        port=args.port,
        workers=args.workers,
        drain_timeout=args.drain_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    return run(parse_args(argv), BackendApp)


if __name__ == "__main__":
    sys.exit(main())
