"""The hot half of authentication, without sockets: the Authorization value kept by the header scan, identity
headers dropped, the token cache's bound and deadlines, bearer parsing and the route step's cache path."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from proxy.auth.step import AuthStep, IdentityMapper, TokenCache, Verdict, bearer_token
from proxy.config import build
from proxy.errors import ProxyError
from proxy.exchange import Exchange
from proxy.http1.protocol import Http1Settings, HttpProtocol
from tests.fakes import MINIMAL_CONFIG, MockTransport, RecordingGateway, worker_state

JWT_CONFIG: dict[str, Any] = {
    **copy.deepcopy(MINIMAL_CONFIG),
    "auth": {
        "jwt": {
            "algorithms": ["HS256"],
            "secret": "s" * 32,
            "forward_claims": {"api_key": "X-Api-Key", "sub": "X-Auth-Subject"},
        }
    },
}


def parsed(raw: bytes, config: dict[str, Any] = JWT_CONFIG) -> Exchange:
    state = worker_state(build(config))
    gateway = RecordingGateway()
    state.gateway = gateway
    protocol = HttpProtocol(state, Http1Settings(state))
    protocol.connection_made(MockTransport())  # type: ignore[arg-type]
    protocol.data_received(raw)
    (exchange,) = gateway.exchanges
    return exchange


def test_the_scan_keeps_authorization_forwards_it_and_drops_client_identity_headers() -> None:
    exchange = parsed(
        b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer abc.def.ghi  \r\nX-Api-Key: admin\r\n"
        b"x-auth-subject: root\r\nAccept: */*\r\n\r\n"
    )
    assert exchange.authorization == b"Bearer abc.def.ghi"
    assert exchange.headers == [(b"Authorization", b"Bearer abc.def.ghi  "), (b"Accept", b"*/*")]
    assert exchange.subject == exchange.client, "without auth the subject is the client address"


def test_two_authorization_headers_make_one_unusable_value_and_no_header_means_none() -> None:
    exchange = parsed(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer a\r\nAuthorization: Bearer b\r\n\r\n")
    assert exchange.authorization == b"Bearer a, Bearer b" and bearer_token(exchange.authorization) == b""
    assert parsed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").authorization is None


def test_identity_headers_pass_when_no_claim_is_forwarded_under_their_name() -> None:
    exchange = parsed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Api-Key: k\r\n\r\n", copy.deepcopy(MINIMAL_CONFIG))
    assert exchange.headers == [(b"X-Api-Key", b"k")]


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (b"Bearer abc.def", b"abc.def"),
        (b"bearer   abc", b"abc"),
        (b"BEARER a-b_c~d+e/f==", b"a-b_c~d+e/f=="),
        (b"Bearer", b""),
        (b"Bearer ", b""),
        (b"Bearer a b", b""),
        (b"Bearer a,b", b""),
        (b"Basic dXNlcjpwdw==", None),
        (b"Bearerabc", None),
    ],
)
def test_bearer_credentials(header: bytes, token: bytes | None) -> None:
    assert bearer_token(header) == token


def test_the_cache_never_returns_an_expired_entry_and_stays_within_its_bound() -> None:
    cache = TokenCache(8)
    cache.put(b"old", Verdict(100.0), now=50.0)
    assert cache.get(b"old", 99.9) is not None and cache.get(b"old", 100.0) is None
    assert b"old" not in cache.entries, "an expired entry is dropped when looked up"
    for index in range(20):
        cache.put(b"t%d" % index, Verdict(1000.0 + index), now=50.0)
        assert len(cache) <= 8
    assert cache.get(b"t19", 60.0) is not None, "the newest entries stay"
    assert cache.get(b"t0", 60.0) is None and cache.evicted == 12


def test_values_sharing_the_key_tail_never_answer_for_each_other() -> None:
    cache = TokenCache(8)
    first, second = b"Bearer A" + b"x" * 40, b"Bearer B" + b"x" * 40
    cache.put(first, Verdict(100.0, subject=b"a"), now=1.0)
    assert cache.get(second, 2.0) is None, "same tail, another token: a miss"
    cache.put(second, Verdict(100.0, subject=b"b"), now=1.0)
    found = cache.get(second, 2.0)
    assert found is not None and found.subject == b"b" and cache.get(first, 2.0) is None and len(cache) == 1


def test_a_full_cache_drops_its_expired_entries_before_live_ones() -> None:
    cache = TokenCache(4)
    for index in range(3):
        cache.put(b"dead%d" % index, Verdict(10.0), now=5.0)
    cache.put(b"live", Verdict(100.0), now=5.0)
    cache.put(b"new", Verdict(100.0), now=20.0)
    assert set(cache.entries) == {b"live", b"new"} and cache.evicted == 0


class FakeAuthority:
    def __init__(self, verdict: Verdict) -> None:
        self.cache = TokenCache(10)
        self.verdict = verdict
        self.asked = 0

    def authenticate(self, exchange: Exchange, header: bytes, now: float) -> Verdict:
        self.asked += 1
        self.cache.put(header, self.verdict, now)
        return self.verdict


def test_the_step_applies_a_cached_identity_without_asking_its_authority_again() -> None:
    identity = IdentityMapper("r", "api_key", (("api_key", "x-api-key"), ("scope", "x-auth-scope"))).verdict(
        {"api_key": "k1", "scope": "read write", "exp": 2e9}, 2e9
    )
    authority = FakeAuthority(identity)
    step = AuthStep(authority, ("read",), "r")
    first = parsed(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer t\r\n\r\n")
    assert step.check(first) is None and authority.asked == 1
    second = parsed(b"GET / HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer t\r\n\r\n")
    assert step.check(second) is None and authority.asked == 1
    assert second.subject == b"k1"
    assert second.forward_lines.endswith(b"x-api-key: k1\r\nx-auth-scope: read write\r\n")
    denied = AuthStep(authority, ("admin",), "r").check(second)
    assert isinstance(denied, ProxyError) and denied.status == 403
    missing = step.check(parsed(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"))
    assert missing is not None and (missing.status, missing.headers) == (
        401,
        ((b"www-authenticate", b'Bearer realm="r"'),),
    )


def test_claims_that_cannot_be_header_values_or_a_missing_subject_reject_the_token() -> None:
    mapper = IdentityMapper("r", "sub", (("name", "x-name"),))
    assert mapper.verdict({"sub": "a", "name": "line\r\nbreak"}, 1.0).error is not None
    assert mapper.verdict({"name": "x"}, 1.0).error is not None
    ok = mapper.verdict({"sub": 42, "name": ["a", "b"], "scp": ["read"]}, 1.0)
    assert (ok.error, ok.subject, ok.lines, ok.scopes) == (None, b"42", b"x-name: a b\r\n", frozenset({"read"}))
