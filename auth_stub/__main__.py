"""CLI: ``python -m auth_stub --host 127.0.0.1 --port 8090 [--issuer ISS] [--audience AUD] ...``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from auth_stub.app import AuthApp
from auth_stub.issuer import DEFAULT_AUDIENCE, DEFAULT_HS_SECRET, DEFAULT_ISSUER, KeyRing, TokenIssuer
from backend_stub.httpcore import ServerState
from backend_stub.runner import RunOptions, run


@dataclass(frozen=True, slots=True)
class AuthOptions:
    """Token settings from the command line."""

    issuer: str
    audience: str
    hs_secret: str
    grace: float

    def app(self, state: ServerState) -> AuthApp:
        """App factory for the runner: keys are generated here, inside the serving process."""
        keys = KeyRing(grace=self.grace)
        issuer = TokenIssuer(keys, issuer=self.issuer, audience=self.audience, hs_secret=self.hs_secret)
        return AuthApp(state, issuer)


def parse_args(argv: list[str] | None = None) -> tuple[RunOptions, AuthOptions]:
    """Command line to options; argparse exits with status 2 on bad input."""
    parser = argparse.ArgumentParser(prog="python -m auth_stub", description="JWT issuer / JWKS / introspection stub.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to bind, 0 for any free port (default 8090)")
    parser.add_argument("--issuer", default=DEFAULT_ISSUER, help=f"iss claim (default {DEFAULT_ISSUER})")
    parser.add_argument("--audience", default=DEFAULT_AUDIENCE, help=f"default aud claim (default {DEFAULT_AUDIENCE})")
    parser.add_argument("--hs-secret", default=DEFAULT_HS_SECRET, help="HS256 secret (default: a development secret)")
    parser.add_argument(
        "--grace", type=float, default=300.0, help="seconds a rotated-out key stays in the JWKS (default 300)"
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=3.0, help="seconds to finish in-flight responses on SIGTERM (default 3)"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be 0..65535")
    if args.grace < 0 or args.drain_timeout < 0:
        parser.error("--grace and --drain-timeout must be >= 0")
    if len(args.hs_secret.encode()) < 32:
        parser.error("--hs-secret must be at least 32 bytes (RFC 7518 3.2)")
    run_options = RunOptions(name="auth_stub", host=args.host, port=args.port, drain_timeout=args.drain_timeout)
    return run_options, AuthOptions(args.issuer, args.audience, args.hs_secret, args.grace)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    run_options, auth_options = parse_args(argv)
    return run(run_options, auth_options.app)


if __name__ == "__main__":
    sys.exit(main())
