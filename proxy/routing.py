"""Pure route table: (host, path prefix) -> target.

A request's Host (case and port ignored) selects that host's routes, longest prefix first; when none of
them matches, or the host has no routes, the hostless routes are tried, longest prefix first. So a
host's routes always win over hostless ones, like a virtual host in NGINX or Envoy.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Router(Generic[T]):
    """Matches a request target against routes; `T` is whatever the caller attaches to a route."""

    __slots__ = ("_by_host", "_default", "_has_hosts")

    def __init__(self, routes: Iterable[tuple[str | None, str, T]]) -> None:
        by_host: dict[bytes, list[tuple[bytes, T]]] = {}
        default: list[tuple[bytes, T]] = []
        for host, prefix, target in routes:
            entry = (prefix.encode(), target)
            if host is None:
                default.append(entry)
            else:
                by_host.setdefault(host.lower().encode(), []).append(entry)
        self._default = _longest_first(default)
        self._by_host = {host: _longest_first(entries) + self._default for host, entries in by_host.items()}
        self._has_hosts = bool(by_host)

    def match(self, host: bytes, target: bytes) -> T | None:
        """`host` as sent (port and case are ignored); `target` the request target (query included)."""
        routes = self._by_host.get(host_without_port(host), self._default) if self._has_hosts else self._default
        for prefix, value in routes:
            if target.startswith(prefix):
                return value
        return None


def _longest_first(entries: list[tuple[bytes, T]]) -> tuple[tuple[bytes, T], ...]:
    return tuple(sorted(entries, key=lambda e: len(e[0]), reverse=True))


def host_without_port(host: bytes) -> bytes:
    """`Example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`."""
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    return host.partition(b":")[0].lower()
