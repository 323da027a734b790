"""HAProxy and Caddy, uvgate's peers in `python -m bench` beside the NGINX reference (bench/nginx.py).

Each peer is one process in the foreground, in its own process group as a devstack `Process`, with its
config rendered from the template next to this file (`haproxy.cfg`, `caddy.json`: `$listen`,
`$backend`, `$threads`, `$keepalive`, `$run_dir`) into its own run directory. The configs are as
fair as nginx's: keep-alive to the clients and a keep-alive pool to the backend, one worker thread per
`threads` (HAProxy `nbthread`, Caddy `GOMAXPROCS`), no access log. bench/peers/README.md explains them.
"""

from __future__ import annotations

import os
import shutil
import string
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.nginx import bind_failed
from devstack import Process, Service, StackError, free_port, wait_http_ok

__all__ = [
    "CADDY",
    "HAPROXY",
    "PEERS",
    "PeerSpec",
    "find_peer",
    "peer_version",
    "render_peer_conf",
    "start_peer",
]

TEMPLATES = Path(__file__).resolve().parent
_BIND_RETRIES = 3


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """How to find, configure and run one peer proxy."""

    name: str
    """The target name in the table and on the command line."""
    env_var: str
    """An environment variable naming the binary, checked first (like $NGINX)."""
    template: str
    """The config template's file name in bench/peers/."""
    conf_name: str
    """The rendered config's file name in the run dir."""
    argv: Callable[[str, Path], list[str]]
    """`(binary, config path) -> command line`, in the foreground."""
    version_args: tuple[str, ...]
    """Arguments that print the version (first line kept)."""
    env: Callable[[int, Path], dict[str, str]]
    """`(threads, run dir) -> extra environment`."""

    @property
    def install_hint(self) -> str:
        """What to run to get it."""
        return f"apt-get install {self.name}, or set {self.env_var}=/path/to/{self.name}"

    @property
    def missing(self) -> str:
        """The one-line note printed when the peer is left out."""
        return f"{self.name} not found: skipping the {self.name} target ({self.install_hint})"


def _haproxy_argv(binary: str, conf: Path) -> list[str]:
    return [binary, "-db", "-f", str(conf)]


def _caddy_argv(binary: str, conf: Path) -> list[str]:
    return [binary, "run", "--config", str(conf)]


def _no_env(threads: int, run_dir: Path) -> dict[str, str]:
    return {}


def _caddy_env(threads: int, run_dir: Path) -> dict[str, str]:
    # GOMAXPROCS: Go threads running Go code at once; HOME/XDG_*: nothing written outside the run dir.
    return {
        "GOMAXPROCS": str(threads),
        "HOME": str(run_dir),
        "XDG_CONFIG_HOME": str(run_dir / "config"),
        "XDG_DATA_HOME": str(run_dir / "data"),
    }


HAPROXY = PeerSpec("haproxy", "HAPROXY", "haproxy.cfg", "haproxy.cfg", _haproxy_argv, ("-v",), _no_env)
CADDY = PeerSpec("caddy", "CADDY", "caddy.json", "caddy.json", _caddy_argv, ("version",), _caddy_env)
PEERS: dict[str, PeerSpec] = {HAPROXY.name: HAPROXY, CADDY.name: CADDY}
"""The peers by target name, in the order they run within a round."""


def find_peer(
    spec: PeerSpec,
    environ: Mapping[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
    fallback_dirs: Sequence[str] = ("/usr/sbin", "/usr/bin"),
) -> str | None:
    """$<ENV_VAR>, else the name on PATH, else /usr/sbin or /usr/bin if executable there, else None."""
    env = os.environ if environ is None else environ
    if env.get(spec.env_var):
        return env[spec.env_var]
    found = which(spec.name)
    if found:
        return found
    for directory in fallback_dirs:
        path = os.path.join(directory, spec.name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def peer_version(spec: PeerSpec, binary: str) -> str:
    """The first line of the peer's version output; StackError with the install hint if it does not run."""
    try:
        done = subprocess.run([binary, *spec.version_args], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise StackError(f"{spec.name} at {binary} does not run ({exc}); {spec.install_hint}") from None
    lines = (done.stdout + done.stderr).splitlines()
    if done.returncode != 0 or not lines:
        raise StackError(f"{binary} {' '.join(spec.version_args)} exited {done.returncode}; {spec.install_hint}")
    return lines[0].strip()


def render_peer_conf(
    spec: PeerSpec, *, run_dir: Path, listen: str, backend: str, threads: int = 1, keepalive: int = 256
) -> str:
    """The peer's config: its template with the listen and backend addresses, threads, pool size, run dir."""
    template = string.Template((TEMPLATES / spec.template).read_text(encoding="utf-8"))
    return template.substitute(
        listen=listen, backend=backend, threads=threads, keepalive=keepalive, run_dir=str(run_dir)
    )


def start_peer(
    spec: PeerSpec,
    binary: str,
    *,
    run_dir: Path,
    backend: str,
    probe_path: str,
    threads: int = 1,
    host: str = "127.0.0.1",
    cpus: Sequence[int] | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
    stop_timeout: float = 10.0,
) -> Service:
    """Start the peer in front of `backend` and wait until GET `probe_path` through it answers 200.

    The caller stops it (`Service.stop()`). StackError, with the log tail, if it exits or never answers.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    conf = run_dir / spec.conf_name
    child_env = {**(env if env is not None else os.environ), **spec.env(threads, run_dir)}
    for attempt in range(_BIND_RETRIES):
        port = free_port(host)
        text = render_peer_conf(spec, run_dir=run_dir, listen=f"{host}:{port}", backend=backend, threads=threads)
        conf.write_text(text, encoding="utf-8")
        process = Process(
            spec.name,
            spec.argv(binary, conf),
            log_path=run_dir / f"{spec.name}.log",
            env=child_env,
            cwd=run_dir,
            kill_mode="mixed",
            cpus=cpus,
        )
        service = Service(spec.name, process, host, port, stop_timeout)
        try:
            wait_http_ok(service.url + probe_path, time.monotonic() + startup_timeout, process=process)
        except BaseException as exc:
            retry = isinstance(exc, StackError) and bind_failed(process) and attempt + 1 < _BIND_RETRIES
            process.stop(2.0)
            if retry:
                continue
            raise
        return service
    raise AssertionError("unreachable")
