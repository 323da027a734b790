"""Build script: metadata lives in setup.cfg; this file only adds the compiled hot path.

The modules every request runs through are compiled to C extensions with mypyc (part of mypy):
the same type-checked source, run without the interpreter loop, at about half the CPU per
request. Set UVGATE_PURE_PYTHON=1 to install the pure-Python modules instead (no C compiler
needed); behaviour is identical, only slower.
"""

from __future__ import annotations

import os

from setuptools import setup

# The request path: parsing, pipeline, upstream pools, the access log line. Everything else (config, supervisor, admin,
# logging) runs at startup or off the hot path and stays interpreted. errors.py stays interpreted
# too: mypyc does not apply subclass overrides of class-level defaults on exception classes.
HOT_MODULES = [
    "proxy/accesslog.py",
    "proxy/auth/step.py",
    "proxy/exchange.py",
    "proxy/forwarding.py",
    "proxy/gateway.py",
    "proxy/metrics.py",
    "proxy/ratelimit/bucket.py",
    "proxy/ratelimit/ledger.py",
    "proxy/ratelimit/step.py",
    "proxy/ratelimit/window.py",
    "proxy/routing.py",
    "proxy/server.py",
    "proxy/http1/framing.py",
    "proxy/http1/protocol.py",
    "proxy/upstream/client.py",
    "proxy/upstream/pool.py",
]


# Hand-written C, small, held to a pure-Python reference by the tests: proxy/_native.c (the
# reference is proxy/native.py, which a pure-Python install uses instead).
C_SOURCES = {"proxy._native": "proxy/_native.c"}


def ext_modules() -> list[object]:
    if os.environ.get("UVGATE_PURE_PYTHON", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify
    from setuptools import Extension

    hand_written = [Extension(name, [path], extra_compile_args=["-O2"]) for name, path in C_SOURCES.items()]
    return [*mypycify(HOT_MODULES, opt_level="3", group_name="uvgate"), *hand_written]


setup(ext_modules=ext_modules())
