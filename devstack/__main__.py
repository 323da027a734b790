"""`python -m devstack run`: the whole stack on free ports until Ctrl-C / SIGTERM (`make run`)."""

from __future__ import annotations

import argparse
import atexit
import re
import signal
import sys
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from devstack.net import StackError, external_redis_url, http_post_json
from devstack.stack import PROJECT_ROOT, ProxyService, Stack

_RECORD = re.compile(r"^\d{4}-\d\d-\d\d ", re.MULTILINE)  # the start of a proxy log record


class _Stop(BaseException):
    """Raised from the SIGINT/SIGTERM handler to unwind out of startup or the wait loop."""


def fetch_token(auth_url: str, *, api_key: str = "demo", ttl: int = 3600) -> str:
    """A fresh access token from auth_stub's `POST /token`."""
    status, answer = http_post_json(auth_url + "/token", {"api_key": api_key, "ttl": ttl})
    if status != 200 or not isinstance(answer, dict) or not isinstance(answer.get("access_token"), str):
        raise StackError(f"POST {auth_url}/token answered {status}: {answer!r}")
    token: str = answer["access_token"]
    return token


class Reloader:
    """Reloads the proxy from the config file the user edits (not only its generated copy): when the file
    changes and on SIGHUP. Says so in the terminal, then what the proxy made of it (read from its log)."""

    def __init__(self, proxy: ProxyService, path: Path) -> None:
        self.proxy = proxy
        self.path = path
        self.mtime = self._mtime()
        self.requested = False  # set by the SIGHUP handler
        self.log_offset = -1  # while >= 0: the reload's outcome is looked for in the proxy log from there

    def _mtime(self) -> int:
        try:
            return self.path.stat().st_mtime_ns
        except OSError:
            return 0

    def poll(self) -> None:
        """Called by the main loop: reload if asked or the file changed; report an outcome logged since."""
        mtime = self._mtime()
        if mtime != self.mtime:
            self.mtime = mtime
            self.requested = True
        if self.requested:
            self.requested = False
            self._reload()
        if self.log_offset >= 0:
            self._outcome()

    def _reload(self) -> None:
        try:
            self.proxy.regenerate()
        except (OSError, tomllib.TOMLDecodeError) as exc:
            print(f"devstack: cannot read {self.path} ({exc}); the proxy keeps its configuration", flush=True)
            return
        self.log_offset = self.proxy.log_path.stat().st_size
        self.proxy.send_signal(signal.SIGHUP)
        print(f"devstack: reloading the proxy from {self.path} (generated: {self.proxy.config_path})", flush=True)

    def _outcome(self) -> None:
        with open(self.proxy.log_path, "rb") as fh:
            fh.seek(self.log_offset)
            text = fh.read().decode("utf-8", "replace")
        serving = re.search(r"generation (\d+) serving", text)
        if serving:
            print(f"devstack: the proxy serves {self.path} (generation {serving[1]})", flush=True)
            self.log_offset = -1
            return
        for failure in ("reload rejected", "reload aborted"):
            at = text.find(failure)
            if at >= 0:
                rest = text[at:]
                end = _RECORD.search(rest)
                record = rest[: end.start()] if end else rest
                record = record.rstrip()
                if "running configuration" not in record:
                    record = f"the proxy keeps its running configuration: {record}"
                print(f"devstack: {record}", flush=True)
                self.log_offset = -1
                return


def _summary(stack: Stack, token: str | None, token_error: str | None) -> str:
    lines = [f"uvgate dev stack is up; logs and generated config in {stack.run_dir}"]
    urls = stack.urls()
    labels = {"admin": "admin    (status, /metrics)"}
    lines += [f"  {labels.get(name, name):<27} {url}" for name, url in urls.items()]
    if stack.proxies:
        lines.append(f"  {'config':<27} {stack.config_path}")
    pids = " ".join(f"{p.name}={p.pid}" for p in stack.processes())
    lines.append(f"  {'pids':<27} {pids}")
    if stack.proxies:
        target = f"{stack.proxy.url}/api/resource"
        lines.append("")
        if token is not None:
            lines.append("Try (the route checks the token; /echo shows the identity headers the backend gets):")
            lines.append(f'  curl -H "Authorization: Bearer {token}" {target}')
            lines.append("and without the token (401, WWW-Authenticate: Bearer):")
            lines.append(f"  curl -i {target}")
            lines.append("and past the route's limit (10 requests per 10 s per api_key: 429 with Retry-After):")
            lines.append(
                f'  for i in $(seq 12); do curl -s -o /dev/null -w "%{{http_code}}\\n" '
                f'-H "Authorization: Bearer {token}" {target}; done'
            )
        else:
            lines.append(f"(no token: {token_error})")
            lines.append(f"  curl {target}")
    lines.append("")
    lines.append(
        "Ctrl-C (or SIGTERM) stops everything (the logs stay); editing the config (or SIGHUP) reloads the proxy."
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Start everything asked for, print how to use it, wait for a signal, stop everything."""
    stack = Stack(run_dir=args.run_dir)
    atexit.register(stack.stop)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signum)

    reloaders: list[Reloader] = []

    def on_hup(signum: int, frame: FrameType | None) -> None:
        for reloader in reloaders:
            reloader.requested = True

    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        if not args.no_redis:
            stack.start_redis(url=external_redis_url())
        stack.start_backend(workers=args.backend_workers)
        if not args.no_auth:
            stack.start_auth()
        reloaders.append(Reloader(stack.start_proxy(args.config, workers=args.workers), args.config))
        token: str | None = None
        token_error: str | None = None
        if stack.auth is not None:
            try:
                token = fetch_token(stack.auth.url)
            except (OSError, ValueError, StackError) as exc:
                token_error = str(exc)
        else:
            token_error = "auth_stub not started"
        print(_summary(stack, token, token_error), flush=True)
        while True:
            dead = stack.exited()
            if dead:
                for process in dead:
                    print(
                        f"{process.name} (pid {process.pid}) exited with status {process.exit_status()}; "
                        f"last log lines:\n{process.log_tail()}",
                        file=sys.stderr,
                        flush=True,
                    )
                return 1
            for reloader in reloaders:
                reloader.poll()
            time.sleep(0.5)
    except _Stop:
        print("stopping...", file=sys.stderr, flush=True)
        return 0
    except StackError as exc:
        print(f"devstack: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        stack.close(remove_run_dir=False)
        print(f"devstack: logs kept in {stack.run_dir}", file=sys.stderr, flush=True)
        atexit.unregister(stack.stop)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m devstack` command line."""
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="start Redis, the stubs and the proxy; stop them on Ctrl-C")
    run_p.add_argument("--config", type=Path, default=PROJECT_ROOT / "configs" / "dev.toml", help="template TOML")
    run_p.add_argument("--workers", type=int, default=None, help="proxy workers (default: from the config)")
    run_p.add_argument("--backend-workers", type=int, default=1, help="backend_stub workers (default 1)")
    run_p.add_argument("--no-redis", action="store_true", help="do not start a Redis-protocol server")
    run_p.add_argument("--no-auth", action="store_true", help="do not start auth_stub")
    run_p.add_argument("--run-dir", type=Path, default=None, help="logs and configs (default: a temp dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
