"""Command line: `python -m proxy --config FILE [--workers N] [--check]`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from proxy import __version__, compiled
from proxy.config import load
from proxy.errors import ConfigError

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="uvgate", description="uvgate API gateway")
    parser.add_argument("--config", "-c", required=True, help="TOML configuration file")
    parser.add_argument("--workers", "-w", type=int, help="worker processes (overrides server.workers)")
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    build = "mypyc-compiled" if compiled() else "pure Python"
    parser.add_argument("--version", action="version", version=f"uvgate {__version__} ({build})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s uvgate[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.workers is not None and args.workers < 1:
        print("uvgate: --workers must be at least 1", file=sys.stderr)
        return EXIT_CONFIG
    try:
        config = load(args.config, workers=args.workers)
    except ConfigError as exc:
        print(f"uvgate: invalid configuration {args.config}:", file=sys.stderr)
        for key, value, reason in exc.problems:
            shown = "" if value is None else f" (got {value!r})"
            print(f"  {key}: {reason}{shown}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"uvgate: {args.config} is valid")
        return 0
    from proxy.supervisor import Supervisor, systemd_listen_fds

    listen_fds = systemd_listen_fds(dict(os.environ), os.getpid())
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)  # meant for this process only, not for anything it starts
    supervisor = Supervisor(
        config,
        args.config,
        workers_override=args.workers,
        notify_socket=os.environ.get("NOTIFY_SOCKET"),
        listen_fds=listen_fds,
    )
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
