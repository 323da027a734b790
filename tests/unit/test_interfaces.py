"""The interfaces of the request path are base classes (so that compiled callers reach their methods
through mypyc's vtable): a method the real implementation forgot to override would raise only when
called, so this checks that every one is overridden."""

from __future__ import annotations

import asyncio

import pytest

from proxy.exchange import Downstream, Upstream
from proxy.gateway import Gateway
from proxy.http1.protocol import HttpProtocol
from proxy.server import Pipeline
from proxy.upstream.client import UpstreamConnection
from proxy.upstream.pool import PooledConnection
from tests.fakes import FakeConn, FakeDownstream, RecordingGateway, make_exchange

ATTRIBUTES = {"write_paused", "idle_since"}  # data, set by the implementation's __init__


@pytest.mark.parametrize(
    ("interface", "implementation"),
    [
        (Downstream, HttpProtocol),
        (Upstream, UpstreamConnection),
        (PooledConnection, UpstreamConnection),
        (Pipeline, Gateway),
    ],
)
def test_the_implementation_overrides_every_method_of_its_interface(interface: type, implementation: type) -> None:
    assert issubclass(implementation, interface)
    methods = {name for name in vars(interface) if not name.startswith("__")} - ATTRIBUTES
    assert methods, "the interface has methods"
    missing = sorted(name for name in methods if getattr(implementation, name) is getattr(interface, name))
    assert missing == [], f"{implementation.__name__} leaves {missing} of {interface.__name__} unimplemented"


def test_the_shells_are_still_asyncio_protocols() -> None:
    # uvloop takes any object with the callbacks, but the type says what they are.
    assert issubclass(HttpProtocol, asyncio.Protocol) and issubclass(UpstreamConnection, asyncio.Protocol)


def test_an_interface_method_left_out_raises_rather_than_passing_silently() -> None:
    exchange = make_exchange(FakeDownstream())
    with pytest.raises(NotImplementedError):
        Downstream().response_end(exchange)
    with pytest.raises(RuntimeError, match="no gateway"):
        Pipeline().handle(exchange)


def test_the_doubles_subclass_the_interfaces() -> None:
    # Compiled code checks argument types: a double that only looked the part would be refused.
    assert isinstance(FakeDownstream(), Downstream) and not FakeDownstream().write_paused
    assert isinstance(FakeConn("c"), PooledConnection) and FakeConn("c").idle_since == 0.0
    assert isinstance(RecordingGateway(), Pipeline)
