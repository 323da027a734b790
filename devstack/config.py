"""Proxy config generation: a template (file, TOML text or mapping) plus devstack's overrides."""

from __future__ import annotations

import copy
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ConfigSource", "load_config_source", "render_proxy_config"]

ConfigSource = str | Path | Mapping[str, Any]
"""A `Path` to a TOML template, TOML text (`str`), or an already parsed mapping."""


def load_config_source(source: ConfigSource) -> dict[str, Any]:
    """Parse `source` into a fresh dict (never the caller's object)."""
    if isinstance(source, Path):
        with open(source, "rb") as fh:
            return tomllib.load(fh)
    if isinstance(source, str):
        return tomllib.loads(source)
    return copy.deepcopy(dict(source))


def render_proxy_config(
    template: Mapping[str, Any],
    *,
    listen: str,
    admin_listen: str,
    workers: int | None = None,
    upstream_servers: Sequence[str] | None = None,
    redis_url: str | None = None,
    auth_url: str | None = None,
) -> dict[str, Any]:
    """A copy of `template` with the listeners, worker count, every upstream's servers, redis.url and the
    auth service's address (`auth_url`, e.g. http://127.0.0.1:8001: the scheme and address of
    auth.jwt.jwks_url and auth.introspect.url, their paths kept) replaced.

    `None` leaves the template's value alone (`upstream_servers=None` keeps the upstreams as written).
    """
    data = copy.deepcopy(dict(template))
    server = data.setdefault("server", {})
    server["listen"] = listen
    server["admin_listen"] = admin_listen
    if workers is not None:
        server["workers"] = workers
    if upstream_servers is not None:
        for upstream in data.get("upstreams", {}).values():
            upstream["servers"] = list(upstream_servers)
    if redis_url is not None:
        data.setdefault("redis", {})["url"] = redis_url
    if auth_url is not None:
        auth = data.get("auth", {})
        for section, key in (("jwt", "jwks_url"), ("introspect", "url")):
            table = auth.get(section)
            if isinstance(table, dict) and isinstance(table.get(key), str):
                table[key] = rebase_url(table[key], auth_url)
    return data


def rebase_url(url: str, base: str) -> str:
    """`url` with the scheme and address of `base` (its path and query kept)."""
    parts, new = urlsplit(url), urlsplit(base)
    return urlunsplit((new.scheme, new.netloc, parts.path, parts.query, ""))
